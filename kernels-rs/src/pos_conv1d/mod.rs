//! pos_conv1d: VISOR's conditional position embedding of the visual tokens
//! (SPEC "VISOR / pos_conv1d"; the paper's §4.2.1, after Chu et al.'s
//! conditional positional encodings, in 1D).
//!
//! In: the visual tokens `x [B, N, C]` (any strides, channels contiguous),
//! the valid tokens of each row `len[b] <= N` (a prefix of the row), the
//! depthwise kernel `weight [C, 7]` (PyTorch's `Conv1d(C, C, 7, padding=3,
//! groups=C)` weight `[C, 1, 7]` without its middle dimension) and
//! `bias [C]`, all in the input type.
//!
//! Math, for `i < len[b]` and every channel `c`, with f32 accumulation:
//! `out[b, i, c] = x[b, i, c] + (bias[c] + sum_{t=0..7} weight[c, t] *
//! x[b, i + t - 3, c])`, where a tap outside `0..len[b]` is skipped (the
//! zero padding of the row's own tokens: padding tokens of a batch never leak
//! into a row). The sum runs over `t` in order, each product rounded to f32
//! and added (no fused multiply-add), so the CPU and CUDA paths agree bit for
//! bit. Slots past `len[b]` are written as 0.
//!
//! Out: `out [B, N, C]` in the input type (a separate tensor: the op reads
//! each token's neighbours).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};

pub(crate) const OP: &str = "pos_conv1d";

/// The kernel size (the paper's 7).
pub const KERNEL_SIZE: usize = 7;
/// The zero padding on each side of a row (3).
pub const PADDING: usize = 3;

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
}

/// Checks x `[B, N, C]`, the lengths, weight `[C, 7]`, bias `[C]` and out
/// `[B, N, C]`.
pub(crate) fn check(
    x: [usize; 3],
    lens: &[usize],
    weight: [usize; 2],
    bias: [usize; 1],
    out: [usize; 3],
) -> Result<Dims> {
    let [b, n, c] = x;
    ensure(lens.len() == b, || {
        Error::shape(OP, "lens", format!("{} rows, x has {b}", lens.len()))
    })?;
    if let Some(row) = lens.iter().position(|&l| l > n) {
        return Err(Error::index(
            OP,
            "lens",
            format!("row {row}: {} tokens, x holds {n}", lens[row]),
        ));
    }
    ensure(weight == [c, KERNEL_SIZE], || {
        Error::shape(
            OP,
            "weight",
            format!("shape {weight:?}, expected [{c}, {KERNEL_SIZE}]"),
        )
    })?;
    ensure(bias == [c], || {
        Error::shape(OP, "bias", format!("shape {bias:?}, expected [{c}]"))
    })?;
    ensure(out == x, || {
        Error::shape(OP, "out", format!("shape {out:?}, expected {x:?}"))
    })?;
    ensure(n <= i32::MAX as usize && c <= i32::MAX as usize, || {
        Error::Unsupported {
            op: OP,
            msg: "sizes past the kernel's 32-bit indices".into(),
        }
    })?;
    Ok(Dims {
        batch: b,
        tokens: n,
        channels: c,
    })
}
