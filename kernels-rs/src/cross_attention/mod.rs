//! cross_attention: non-causal attention of a few queries over many keys
//! (SPEC "VISOR / cross_attention"; the paper's `CrossAttn`, Eqs. 2 and 3).
//!
//! In: queries `q [B, Nq, Hq, D]`, keys and values `k, v [B, Nk, Hkv, D]`
//! (any memory order, head dim contiguous: the flash/vLLM `[B, S, H, D]` and
//! the candle/HF `[B, H, S, D]` caches are both read in place; GQA: query
//! head `h` reads KV head `h / G`, `G = Hq / Hkv`), per row the number of
//! valid queries `q_len[b] <= Nq` and keys `kv_len[b] <= Nk` ([`SeqLens`]:
//! each a prefix of its row, as flash-attn's `seqused_k`), and `scale`
//! (default `1 / sqrt(D)`).
//!
//! Math, for every row `b`, query `i < q_len[b]` and query head `h`:
//! `s_j = scale * q[b, i, h] . k[b, j, h / G]` over the keys `j < kv_len[b]`,
//! `o[b, i, h] = sum_j softmax(s)_j v[b, j, h / G]`,
//! `lse[b, h, i] = ln sum_j exp(s_j)`. No mask beyond the lengths: every
//! query sees every valid key (not causal; the queries need not come from
//! the keys' sequence: VISOR's text over visual tokens, Glance2Gaze's learned
//! queries). A query that attends nothing (`kv_len[b] = 0`) and every query
//! slot past `q_len[b]` get `o = 0` and `lse = -inf`.
//!
//! Out: `o [B, Nq, Hq, D]` in the input type, optionally
//! `lse [B, Hq, Nq]` f32 (natural log). f32 accumulation.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};

pub(crate) const OP: &str = "cross_attention";

/// The valid queries and keys of each row: `q[b]` queries and `kv[b]` keys,
/// each a prefix of its row (checked against the tensors by the op).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqLens {
    q: Vec<usize>,
    kv: Vec<usize>,
}

impl SeqLens {
    /// Per row `q_lens[b]` valid queries and `kv_lens[b]` valid keys.
    pub fn new(q_lens: &[usize], kv_lens: &[usize]) -> Result<Self> {
        ensure(q_lens.len() == kv_lens.len(), || {
            Error::shape(
                OP,
                "lens",
                format!(
                    "{} query lengths, {} key lengths",
                    q_lens.len(),
                    kv_lens.len()
                ),
            )
        })?;
        Ok(SeqLens {
            q: q_lens.to_vec(),
            kv: kv_lens.to_vec(),
        })
    }

    /// Every row full: `nq` queries over `nk` keys.
    pub fn full(batch: usize, nq: usize, nk: usize) -> Self {
        SeqLens {
            q: vec![nq; batch],
            kv: vec![nk; batch],
        }
    }

    /// Rows, `B`.
    pub fn batch(&self) -> usize {
        self.q.len()
    }

    /// Valid queries per row.
    pub fn q(&self) -> &[usize] {
        &self.q
    }

    /// Valid keys per row.
    pub fn kv(&self) -> &[usize] {
        &self.kv
    }
}

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub batch: usize,
    /// Query slots per row, `Nq`.
    pub queries: usize,
    /// Key slots per row, `Nk`.
    pub keys: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl Dims {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Checks q `[B, Nq, Hq, D]`, k and v `[B, Nk, Hkv, D]`, the lengths, the
/// scale and the outputs o `[B, Nq, Hq, D]`, lse `[B, Hq, Nq]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
    lens: &SeqLens,
    scale: Option<f32>,
    o: [usize; 4],
    lse: Option<[usize; 3]>,
) -> Result<Dims> {
    let [b, nq, hq, d] = q;
    let [kb, nk, hkv, kd] = k;
    ensure(kb == b && kd == d, || {
        Error::shape(OP, "k", format!("shape {k:?}, q is {q:?}"))
    })?;
    ensure(v == k, || {
        Error::shape(OP, "v", format!("shape {v:?}, k is {k:?}"))
    })?;
    ensure(d > 0 && hkv > 0 && hq > 0 && hq % hkv == 0, || {
        Error::shape(
            OP,
            "q",
            format!("{hq} query heads are not a multiple of {hkv} KV heads (head dim {d})"),
        )
    })?;
    ensure(lens.batch() == b, || {
        Error::shape(OP, "lens", format!("{} rows, q has {b}", lens.batch()))
    })?;
    for row in 0..b {
        ensure(lens.q[row] <= nq, || {
            Error::index(
                OP,
                "q_len",
                format!("row {row}: {} queries, q holds {nq}", lens.q[row]),
            )
        })?;
        ensure(lens.kv[row] <= nk, || {
            Error::index(
                OP,
                "kv_len",
                format!("row {row}: {} keys, k holds {nk}", lens.kv[row]),
            )
        })?;
    }
    if let Some(sc) = scale {
        ensure(sc.is_finite() && sc > 0.0, || {
            Error::value(OP, "scale", format!("{sc} is not a finite positive number"))
        })?;
    }
    ensure(o == q, || {
        Error::shape(OP, "o", format!("shape {o:?}, expected {q:?}"))
    })?;
    if let Some(l) = lse {
        ensure(l == [b, hq, nq], || {
            Error::shape(
                OP,
                "lse",
                format!("shape {l:?}, expected [{b}, {hq}, {nq}]"),
            )
        })?;
    }
    // The kernels index rows (query x group) and keys with 32-bit integers.
    ensure(
        nq.saturating_mul(hq) <= i32::MAX as usize && nk <= i32::MAX as usize,
        || Error::Unsupported {
            op: OP,
            msg: "sizes past the kernels' 32-bit indices".into(),
        },
    )?;
    Ok(Dims {
        batch: b,
        queries: nq,
        keys: nk,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        scale: scale.unwrap_or(1.0 / (d as f32).sqrt()),
    })
}
