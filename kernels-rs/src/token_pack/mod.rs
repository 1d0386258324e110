//! token_pack: VISOR-TR's token packing at any reduction ratio (SPEC "VISOR /
//! token_pack"; the paper's Appendix I): a bilinear resize of each row's
//! `h x w` grid of visual tokens, then space-to-depth by 2.
//!
//! In: `x [B, h, w, C]` (channels last, any strides, channels contiguous),
//! the reduction ratio `rho > 0` (the token count shrinks about `rho`-fold).
//!
//! Sizes: `H' = 2 * round(h / sqrt(rho))`, `W' = 2 * round(w / sqrt(rho))`,
//! computed in f64, where `round` rounds half to even (Python's `round` and
//! `torch.round`, which the authors' PyTorch code would use; see
//! docs/ops/token_pack.md); both must be at least 2 ([`resized_grid`]).
//!
//! Math: `Y [H', W', C]` is `x` resized as `torch.nn.functional.interpolate(
//! mode="bilinear", align_corners=False, antialias=False)` with an explicit
//! output size: for an output row `yo`, the source row is
//! `sy = max(0, (h / H') * (yo + 0.5) - 0.5)` (f32, each operation rounded,
//! `h / H'` one f32 division), `y0 = floor(sy)`, `y1 = min(y0 + 1, h - 1)`,
//! `ly = sy - y0`; likewise for columns; then (f32, unfused, in this order)
//! `Y = (1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1]) +
//! ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1])`. The CPU and CUDA paths
//! compute exactly these operations, so they agree bit for bit; with
//! `H' = h` (`rho = 4`, `h` even) the resize is the identity.
//!
//! Out: `out [B, H'/2, W'/2, 4C]` in the input type,
//! `out[b, i, j, (2 dy + dx) C + c] = Y[b, 2i + dy, 2j + dx, c]` (the
//! channel order of a `[2, 2, C]` block flattened row-major, as
//! `x.view(B, H'/2, 2, W'/2, 2, C).permute(0, 1, 3, 2, 4, 5)` gives it).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};

pub(crate) const OP: &str = "token_pack";

/// The resized side `2 * round(side / sqrt(rho))` (round half to even, f64).
pub fn resized_side(side: usize, rho: f64) -> Result<usize> {
    ensure(rho.is_finite() && rho > 0.0, || {
        Error::value(OP, "rho", format!("{rho} is not a finite positive ratio"))
    })?;
    let half = (side as f64 / rho.sqrt()).round_ties_even();
    ensure(half >= 1.0, || {
        Error::value(
            OP,
            "rho",
            format!("ratio {rho} leaves no token of a side of {side}"),
        )
    })?;
    ensure(half <= (i32::MAX / 2) as f64, || Error::Unsupported {
        op: OP,
        msg: format!("a side of {side} at ratio {rho} exceeds 32-bit indices"),
    })?;
    Ok(2 * half as usize)
}

/// The resized grid `[H', W']` of an `h x w` grid at ratio `rho`; the packed
/// grid is half of it on each side.
pub fn resized_grid(h: usize, w: usize, rho: f64) -> Result<[usize; 2]> {
    Ok([resized_side(h, rho)?, resized_side(w, rho)?])
}

/// The source rows (or columns) of output row `dst` of a resize from
/// `in_size` to `out_size`, and the weight of the second: `(i0, i1, l1)`.
/// f32, each operation rounded (the CUDA kernel computes the same). With no
/// source (`in_size` 0) both rows are 0.
pub fn source_index(dst: usize, in_size: usize, out_size: usize) -> (usize, usize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (src as usize).min(in_size.saturating_sub(1));
    let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f32)
}

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    /// `H'`, `W'`.
    pub out_height: usize,
    pub out_width: usize,
}

/// Checks x `[B, h, w, C]`, rho and out `[B, H'/2, W'/2, 4C]`.
pub(crate) fn check(x: [usize; 4], rho: f64, out: [usize; 4]) -> Result<Dims> {
    let [b, h, w, c] = x;
    let [oh, ow] = resized_grid(h, w, rho)?;
    let want = [b, oh / 2, ow / 2, c.saturating_mul(4)];
    ensure(out == want, || {
        Error::shape(OP, "out", format!("shape {out:?}, expected {want:?}"))
    })?;
    ensure(
        b <= i32::MAX as usize
            && h.saturating_mul(w) <= i32::MAX as usize
            && oh.saturating_mul(ow) <= i32::MAX as usize
            && c.saturating_mul(4) <= i32::MAX as usize,
        || Error::Unsupported {
            op: OP,
            msg: "sizes past the kernel's 32-bit indices".into(),
        },
    )?;
    Ok(Dims {
        batch: b,
        height: h,
        width: w,
        channels: c,
        out_height: oh,
        out_width: ow,
    })
}
