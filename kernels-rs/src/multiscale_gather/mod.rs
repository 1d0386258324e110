//! multiscale_gather: FocusLLaVA's vision-guided sampler after its selector
//! (SPEC "FocusLLaVA / Vision-guided sampler", the paper's Eq. 2).
//!
//! In: the feature map `x [B, Hx, Wx, C]` cut into `w x w` windows as in
//! [`window_mean`](crate::window_mean) (`M` per row, raster order, border
//! windows smaller), the selector logits `z [B, M, S]` f32 and a
//! [`ScaleSet`] of `S` pooling kernels `(kh, kw)`, each dividing `w`.
//!
//! Per window: `c = argmax_s z[s]` (ties to the first listed scale; a NaN
//! ranks below every number, as in select_keep). The window is cut into
//! cells of `kh x kw` from its top-left corner; a cell that lies partly past
//! the map pools over its existing pixels, a cell entirely outside gives no
//! token, so a window of `h x w` existing pixels gives `ceil(h/kh) *
//! ceil(w/kw)` tokens: the max over each cell, in raster order of the cells,
//! times `softmax(z)[c]` when `scale_by_prob` (Eq. 2's training form:
//! `1 / sum_s exp(z[s] - z[c])`, summed in scale order in f32). A window's
//! tokens start at the exclusive prefix sum of the token counts of the
//! windows before it.
//!
//! Out: `tokens [B, N_out_max, C]` (input type), `positions [B, N_out_max]`
//! i32 (`y * Wx + x` of each token's cell's top-left pixel, for position ids)
//! and `count [B]` i32. `N_out_max` ([`max_tokens`]) is the host-known bound:
//! every window at its scale with the most tokens. Slots past a row's count
//! hold zero tokens and position -1. On the GPU the counts stay on the device.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};
use crate::window_mean::{check_map, Dims};

pub(crate) const OP: &str = "multiscale_gather";

/// Most scales in one set.
pub const MAX_SCALES: usize = 16;

/// The pooling kernels `(kh, kw)` among which the selector chooses, in the
/// order of the logits' last dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleSet {
    scales: Vec<(usize, usize)>,
}

impl ScaleSet {
    /// A set of 1 to [`MAX_SCALES`] kernels, each at least 1 x 1 (that each
    /// divides the window is checked by the op).
    pub fn new(scales: &[(usize, usize)]) -> Result<Self> {
        ensure(!scales.is_empty(), || {
            Error::value(OP, "scales", "the scale set is empty")
        })?;
        ensure(scales.len() <= MAX_SCALES, || {
            Error::value(
                OP,
                "scales",
                format!("{} scales, at most {MAX_SCALES}", scales.len()),
            )
        })?;
        ensure(scales.iter().all(|&(h, w)| h >= 1 && w >= 1), || {
            Error::value(
                OP,
                "scales",
                format!("every kernel must be at least 1 x 1: {scales:?}"),
            )
        })?;
        Ok(ScaleSet {
            scales: scales.to_vec(),
        })
    }

    /// The paper's default: (4, 4), (2, 2), (1, 1).
    pub fn three() -> Self {
        ScaleSet {
            scales: vec![(4, 4), (2, 2), (1, 1)],
        }
    }

    /// The 7-branch set: the default plus (4, 2), (2, 4), (2, 1), (1, 2).
    pub fn seven() -> Self {
        ScaleSet {
            scales: vec![(4, 4), (2, 2), (1, 1), (4, 2), (2, 4), (2, 1), (1, 2)],
        }
    }

    /// The kernels `(kh, kw)`, in the order of the logits.
    pub fn scales(&self) -> &[(usize, usize)] {
        &self.scales
    }

    /// Scales in the set, `S` (1 to [`MAX_SCALES`]).
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// Always false: a set holds at least one scale.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }
}

impl Default for ScaleSet {
    fn default() -> Self {
        Self::three()
    }
}

/// Tokens of a window of `h x w` existing pixels at kernel `(kh, kw)`
/// (saturating; a [`ScaleSet`]'s kernels are at least 1).
pub(crate) fn tokens_of(h: usize, w: usize, (kh, kw): (usize, usize)) -> usize {
    h.div_ceil(kh).saturating_mul(w.div_ceil(kw))
}

/// The window's pixel extent `(y0, x0, y1, x1)`.
pub(crate) fn window_extent(d: &Dims, m: usize) -> (usize, usize, usize, usize) {
    let wins_x = d.width.div_ceil(d.window);
    let (y0, x0) = ((m / wins_x) * d.window, (m % wins_x) * d.window);
    (
        y0,
        x0,
        (y0 + d.window).min(d.height),
        (x0 + d.window).min(d.width),
    )
}

/// `N_out_max` of a `height x width` map: the tokens of every window at its
/// scale with the most tokens (the capacity of the outputs); 0 for a window
/// of 0, saturating at `usize::MAX`. Windows come in at most four sizes (full,
/// the right column's, the bottom row's, the corner), so this is O(scales).
pub fn max_tokens(height: usize, width: usize, window: usize, scales: &ScaleSet) -> usize {
    if window == 0 {
        return 0;
    }
    let most = |h: usize, w: usize| {
        scales
            .scales
            .iter()
            .map(|&k| tokens_of(h, w, k))
            .max()
            .unwrap_or(0)
    };
    let (full_y, rest_y) = (height / window, height % window);
    let (full_x, rest_x) = (width / window, width % window);
    let part = |n: usize, h: usize, w: usize| {
        if n == 0 || h == 0 || w == 0 {
            0
        } else {
            n.saturating_mul(most(h, w))
        }
    };
    part(full_y.saturating_mul(full_x), window, window)
        .saturating_add(part(full_y, window, rest_x))
        .saturating_add(part(full_x, rest_y, window))
        .saturating_add(part(1, rest_y, rest_x))
}

/// Checks x `[B, Hx, Wx, C]`, z `[B, M, S]`, tokens `[B, N_out_max, C]`,
/// positions `[B, N_out_max]`, count `[B]` and the scales against the window.
pub(crate) fn check(
    x: [usize; 4],
    z: [usize; 3],
    window: usize,
    scales: &ScaleSet,
    tokens: [usize; 3],
    positions: [usize; 2],
    count: [usize; 1],
) -> Result<(Dims, usize)> {
    let d = check_map(OP, x, window)?;
    ensure(!scales.is_empty() && scales.len() <= MAX_SCALES, || {
        Error::value(OP, "scales", "1 to 16 scales")
    })?;
    for &(kh, kw) in scales.scales() {
        ensure(
            kh >= 1 && kw >= 1 && window % kh == 0 && window % kw == 0,
            || {
                Error::value(
                    OP,
                    "scales",
                    format!("the kernel ({kh}, {kw}) does not divide the window {window}"),
                )
            },
        )?;
    }
    let want_z = [d.batch, d.windows, scales.len()];
    ensure(z == want_z, || {
        Error::shape(OP, "z", format!("shape {z:?}, expected {want_z:?}"))
    })?;
    let n_out = max_tokens(d.height, d.width, window, scales);
    let want = [d.batch, n_out, d.channels];
    ensure(tokens == want, || {
        Error::shape(OP, "tokens", format!("shape {tokens:?}, expected {want:?}"))
    })?;
    ensure(positions == [d.batch, n_out], || {
        Error::shape(
            OP,
            "positions",
            format!("shape {positions:?}, expected {:?}", [d.batch, n_out]),
        )
    })?;
    ensure(count == [d.batch], || {
        Error::shape(
            OP,
            "count",
            format!("shape {count:?}, expected [{}]", d.batch),
        )
    })?;
    Ok((d, n_out))
}

/// The chosen scale of a window's logits: argmax, ties to the first, NaN
/// below every number (the kernel's rule).
pub(crate) fn choose(z: &[f32]) -> usize {
    let mut c = 0;
    for s in 1..z.len() {
        if !z[s].is_nan() && (z[c].is_nan() || z[s] > z[c]) {
            c = s;
        }
    }
    c
}
