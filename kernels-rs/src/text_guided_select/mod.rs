//! text_guided_select: FocusLLaVA's text-guided sampler (SPEC "FocusLLaVA /
//! text_guided_select", the paper's Eqs. 7 to 9).
//!
//! In: the text queries `q [B, T, Hq, D]` at the chosen layer (after RoPE),
//! the visual keys `k [B, N, Hkv, D]` of that layer (any memory order, head
//! dim contiguous; GQA: query head `h` reads KV head `h / G`, `G = Hq / Hkv`),
//! per row `t_len[b] <= T` valid text tokens and `n_len[b] <= N` valid visual
//! tokens ([`Lengths`]), and `gamma` in `(0, 1]` (default 0.85).
//!
//! Per row, over its valid tokens:
//! `A[h, j, i] = softmax_i(q[j, h] . k[i, h / G] / sqrt(D))`,
//! `S[i] = (1 / t_len) sum_j max_h A[h, j, i]`. The tokens are ranked by `S`
//! descending (ties: lower `i` first; a NaN lowest) and the row keeps the
//! smallest prefix whose sum exceeds `gamma * sum(S)`, all `n_len` tokens when
//! none does (with `gamma = 1`, or a row without text tokens, whose `S` is 0).
//!
//! The prefix sums are exact: `S` is taken to 32.32 fixed point
//! ([`quantize`]: `floor(S * 2^32)`, 0 for NaN and `S <= 0`, capped at 2) and
//! summed as integers, and "exceeds" is `prefix >= floor(gamma * total) + 1`
//! with `gamma * total` one f64 product. For given scores `S` the kept set
//! then does not depend on the order of summation ([`select_from_scores`] is
//! the rule on given scores; the GPU applies it to its own `S`, which differs
//! from the CPU's by rounding only). The quantisation moves a cumulative sum by at most
//! `n_len * 2^-32` while `sum(S) >= 1`.
//!
//! Out: the kept indices ascending `[B, N]` padded with -1, the count per row
//! `[B]`, and optionally `S` itself `[B, N]` f32 (0 past `n_len`). The GPU
//! path never materialises `A` (docs/ops/text_guided_select.md).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::cmp::Reverse;

use crate::error::{ensure, Error, Result};
use crate::select_keep::cpu::rank_key;

pub(crate) const OP: &str = "text_guided_select";

/// The paper's default threshold.
pub const DEFAULT_GAMMA: f32 = 0.85;

/// The valid text and visual tokens of each row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lengths {
    t_len: Vec<usize>,
    n_len: Vec<usize>,
}

impl Lengths {
    /// Per row `t_len[b]` text and `n_len[b]` visual tokens (checked against
    /// the tensors by the op).
    pub fn new(t_len: &[usize], n_len: &[usize]) -> Result<Self> {
        ensure(t_len.len() == n_len.len(), || {
            Error::shape(
                OP,
                "lengths",
                format!(
                    "{} text lengths, {} visual lengths",
                    t_len.len(),
                    n_len.len()
                ),
            )
        })?;
        Ok(Lengths {
            t_len: t_len.to_vec(),
            n_len: n_len.to_vec(),
        })
    }

    /// Every row full: `t` text and `n` visual tokens.
    pub fn full(batch: usize, t: usize, n: usize) -> Self {
        Lengths {
            t_len: vec![t; batch],
            n_len: vec![n; batch],
        }
    }

    /// Rows, `B`.
    pub fn batch(&self) -> usize {
        self.t_len.len()
    }

    /// Valid text tokens per row.
    pub fn t_len(&self) -> &[usize] {
        &self.t_len
    }

    /// Valid visual tokens per row.
    pub fn n_len(&self) -> &[usize] {
        &self.n_len
    }
}

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub text: usize,
    pub visual: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Checks q `[B, T, Hq, D]`, k `[B, N, Hkv, D]`, the lengths, gamma and the
/// outputs `keep [B, N]`, `count [B]`, `scores [B, N]`.
pub(crate) fn check(
    q: [usize; 4],
    k: [usize; 4],
    lengths: &Lengths,
    gamma: f32,
    keep: [usize; 2],
    count: [usize; 1],
    scores: Option<[usize; 2]>,
) -> Result<Dims> {
    let [b, t, hq, d] = q;
    let [kb, n, hkv, kd] = k;
    ensure(gamma > 0.0 && gamma <= 1.0, || {
        Error::value(OP, "gamma", format!("{gamma} is outside (0, 1]"))
    })?;
    ensure(kb == b, || {
        Error::shape(OP, "k_vis", format!("batch {kb}, q_text has {b}"))
    })?;
    ensure(d > 0 && kd == d, || {
        Error::shape(OP, "k_vis", format!("head dim {kd}, q_text has {d}"))
    })?;
    ensure(hkv > 0 && hq > 0 && hq % hkv == 0, || {
        Error::shape(
            OP,
            "q_text",
            format!("{hq} query heads are not a multiple of {hkv} KV heads"),
        )
    })?;
    ensure(lengths.batch() == b, || {
        Error::shape(
            OP,
            "lengths",
            format!("{} rows, the batch has {b}", lengths.batch()),
        )
    })?;
    for row in 0..b {
        ensure(lengths.t_len[row] <= t, || {
            Error::index(
                OP,
                "t_len",
                format!(
                    "row {row}: {} text tokens, q_text holds {t}",
                    lengths.t_len[row]
                ),
            )
        })?;
        ensure(lengths.n_len[row] <= n, || {
            Error::index(
                OP,
                "n_len",
                format!(
                    "row {row}: {} visual tokens, k_vis holds {n}",
                    lengths.n_len[row]
                ),
            )
        })?;
    }
    ensure(keep == [b, n], || {
        Error::shape(OP, "keep", format!("shape {keep:?}, expected {:?}", [b, n]))
    })?;
    ensure(count == [b], || {
        Error::shape(OP, "count", format!("shape {count:?}, expected [{b}]"))
    })?;
    if let Some(s) = scores {
        ensure(s == [b, n], || {
            Error::shape(OP, "scores", format!("shape {s:?}, expected {:?}", [b, n]))
        })?;
    }
    ensure(
        t <= i32::MAX as usize
            && n <= i32::MAX as usize
            && hq <= i32::MAX as usize
            && d <= i32::MAX as usize,
        || Error::Unsupported {
            op: OP,
            msg: "sizes past the kernels' 32-bit indices".into(),
        },
    )?;
    Ok(Dims {
        batch: b,
        text: t,
        visual: n,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
    })
}

/// `S` in 32.32 fixed point: `floor(min(S, 2) * 2^32)`, 0 for NaN and `S <= 0`
/// (the kernel's `quantize`).
pub fn quantize(s: f32) -> u64 {
    if s > 0.0 {
        (s.min(2.0) as f64 * 4_294_967_296.0) as u64
    } else {
        0
    }
}

/// The selection rule on given scores `S` of one row: the smallest top-k
/// (ranked by `S` descending, ties to the lower index, NaN lowest) whose
/// fixed-point sum exceeds `gamma` times the total; every index when none
/// does. Returns the kept indices ascending.
pub fn select_from_scores(s: &[f32], gamma: f32) -> Vec<usize> {
    let q: Vec<u64> = s.iter().map(|&v| quantize(v)).collect();
    let total: u64 = q.iter().sum();
    // (the cast saturates: a huge or infinite gamma needs more than the total,
    // a NaN one needs 1)
    let need = ((gamma as f64 * total as f64).floor() as u64).saturating_add(1);
    if need > total {
        return (0..s.len()).collect();
    }
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_unstable_by_key(|&i| (Reverse(rank_key(s[i])), i));
    let mut acc = 0u64;
    let k = order.iter().position(|&i| {
        acc += q[i];
        acc >= need
    });
    let mut kept = order[..k.expect("need <= total") + 1].to_vec();
    kept.sort_unstable();
    kept
}
