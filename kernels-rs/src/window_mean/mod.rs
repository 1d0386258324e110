//! window_mean: one vector per w x w window of a channels-last feature map
//! (SPEC "FocusLLaVA / Vision-guided sampler": the paper's `pool(X_i)`).
//!
//! `x [B, Hx, Wx, C]` is cut into windows of `w x w` cells (default 4), in
//! raster order: window `m = my * ceil(Wx / w) + mx` covers rows
//! `my*w .. min(my*w + w, Hx)` and columns `mx*w .. min(mx*w + w, Wx)`, so the
//! border windows are smaller. Out `P [B, M, C]` in the input type, `M =
//! ceil(Hx / w) * ceil(Wx / w)`:
//!
//! - [`Pool::Mean`] (default): the mean over the window's existing cells,
//!   summed in f32 in raster order, then divided by the cell count;
//! - [`Pool::Max`]: the maximum; NaN cells are skipped, as by `fmaxf` (a
//!   window of NaN only gives -inf).
//!
//! One grid size for the whole batch.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};

pub(crate) const OP: &str = "window_mean";

/// The default window: 4 x 4 cells (the paper's).
pub const DEFAULT_WINDOW: usize = 4;

/// How a window is reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// The mean of the window's cells (the paper's `pool`).
    #[default]
    Mean,
    /// The maximum of the window's cells (NaN skipped).
    Max,
}

/// The number of windows of a `height x width` map: `ceil(h / w) * ceil(w / w)`
/// (a window of 0 counts as 1; saturating at `usize::MAX`).
pub fn num_windows(height: usize, width: usize, window: usize) -> usize {
    height
        .div_ceil(window.max(1))
        .saturating_mul(width.div_ceil(window.max(1)))
}

/// The sizes of a window_mean call, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub window: usize,
    pub windows: usize,
}

/// Checks a feature map `[B, Hx, Wx, C]` and a window (shared by window_mean
/// and multiscale_gather).
pub(crate) fn check_map(op: &'static str, x: [usize; 4], window: usize) -> Result<Dims> {
    let [batch, height, width, channels] = x;
    ensure(window >= 1, || {
        Error::value(op, "window", "the window must be at least 1 cell")
    })?;
    ensure(
        batch <= i32::MAX as usize
            && height.saturating_mul(width) <= i32::MAX as usize
            && channels <= i32::MAX as usize,
        || {
            Error::Unsupported {
            op,
            msg: format!(
                "a batch of {batch} {height} x {width} x {channels} maps exceeds the kernels' 32-bit indices"
            ),
        }
        },
    )?;
    ensure(window <= i32::MAX as usize, || {
        Error::value(op, "window", format!("{window} is too large"))
    })?;
    Ok(Dims {
        batch,
        height,
        width,
        channels,
        window,
        windows: num_windows(height, width, window),
    })
}

/// Checks x `[B, Hx, Wx, C]` and out `[B, M, C]`.
pub(crate) fn check(x: [usize; 4], out: [usize; 3], window: usize) -> Result<Dims> {
    let dims = check_map(OP, x, window)?;
    let want = [dims.batch, dims.windows, dims.channels];
    ensure(out == want, || {
        Error::shape(OP, "out", format!("shape {out:?}, expected {want:?}"))
    })?;
    Ok(dims)
}
