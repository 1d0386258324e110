//! foveal-candle: foveal's ops inside models.
//!
//! For now it holds the GlimpsePrune kernel pipeline on synthetic inputs
//! ([`glimpse_pipeline`]), which the main job runs; the candle CustomOps and
//! the small vision-language models of the five methods build on it.

pub mod glimpse_pipeline;
