//! glimpse_scores: the glimpse token's attention to the visual tokens at
//! layer K, per query head (SPEC "GlimpsePrune / glimpse_scores").
//!
//! The glimpse token is the last valid position of each row (`end - 1`); its
//! query `q [B, Hq, D]` is taken after RoPE, and `k [B, S, Hkv, D]` already
//! holds its own key. For each visual token `i` of row `b` and query head `h`
//! (reading KV head `h / G`), with `s = scale * q[b, h] . k[b, vis_pos[b, i], h / G]`:
//!
//! - [`ScoreMode::Logits`]: `s` (Qwen2.5-VL);
//! - [`ScoreMode::LogSoftmax`]: `s - logsumexp` over ALL valid keys of the row,
//!   text, visual and the glimpse token itself (LLaVA);
//! - [`ScoreMode::Softmax`]: `exp` of that.
//!
//! Out: `a [B, Nv_max, Hq]` f32, token-major as the predictor consumes it;
//! entries past a row's visual count are 0.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};
use crate::rows::RowLayout;

pub(crate) const OP: &str = "glimpse_scores";

/// What glimpse_scores returns per (visual token, head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreMode {
    /// The scaled logit `scale * q . k`.
    Logits,
    /// The logit minus the log-sum-exp over every valid key of the row.
    #[default]
    LogSoftmax,
    /// The attention probability: `exp` of the log-softmax.
    Softmax,
}

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub nv_max: usize,
    pub scale: f32,
}

impl Dims {
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Checks the shapes of q `[B, Hq, D]`, k `[B, S, Hkv, D]` and out
/// `[B, Nv_max, Hq]` against `rows`, and resolves the scale.
pub(crate) fn check(
    q: [usize; 3],
    k: [usize; 4],
    out: [usize; 3],
    rows: &RowLayout,
    scale: Option<f32>,
) -> Result<Dims> {
    let [b, hq, d] = q;
    let [kb, s, hkv, kd] = k;
    ensure(b == rows.batch(), || {
        Error::shape(
            OP,
            "q",
            format!("batch {b} but the row layout has {}", rows.batch()),
        )
    })?;
    ensure(kb == b, || {
        Error::shape(OP, "k", format!("batch {kb}, q has {b}"))
    })?;
    ensure(s == rows.seq(), || {
        Error::shape(
            OP,
            "k",
            format!(
                "sequence capacity {s}, the row layout indexes {}",
                rows.seq()
            ),
        )
    })?;
    ensure(d > 0 && kd == d, || {
        Error::shape(OP, "k", format!("head dim {kd}, q has {d}"))
    })?;
    ensure(hkv > 0 && hq > 0 && hq % hkv == 0, || {
        Error::shape(
            OP,
            "q",
            format!("{hq} query heads are not a multiple of {hkv} KV heads"),
        )
    })?;
    ensure(out == [b, rows.nv_max(), hq], || {
        Error::shape(
            OP,
            "out",
            format!("shape {out:?}, expected {:?}", [b, rows.nv_max(), hq]),
        )
    })?;
    for row in 0..b {
        let glimpse = rows.end(row) - 1;
        ensure(
            rows.visual(row).iter().all(|&p| (p as usize) < glimpse),
            || {
                Error::index(OP, "rows", format!("row {row}: the glimpse token (position {glimpse}, the last valid one) is listed as visual"))
            },
        )?;
    }
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
    ensure(scale.is_finite(), || {
        Error::value(OP, "scale", format!("{scale} is not finite"))
    })?;
    Ok(Dims {
        batch: b,
        seq: s,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        nv_max: rows.nv_max(),
        scale,
    })
}
