//! foveal-candle: foveal's ops inside models.
