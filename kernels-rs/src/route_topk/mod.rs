//! route_topk: Gaze Attention's per-head region routing (SPEC "Gaze Attention
//! / route_topk", the paper's Eq. 2).
//!
//! In: queries `q [B, Nq, Hq, D]` (after RoPE, any memory order, head dim
//! contiguous), descriptors `desc [B, Hkv, R, D]` f32 from
//! region_descriptors, the [`GazeLayout`] (each row's region count) and `k`.
//! GQA: query head `h` reads KV head `h / G`, `G = Hq / Hkv`.
//!
//! Math: `score[r] = q[b, n, h] . desc[b, h / G, r]` (f32), for the row's
//! regions `r < regions(b)`; the `min(k, regions(b))` highest scores win
//! (ties: the lower region id; a NaN score ranks lowest).
//!
//! Out: [`Routes`](crate::Routes) `[B, Nq, Hq, k]`, each list of region ids ascending and
//! padded with -1. No scale: it would not change the ranking.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};
use crate::gaze_layout::GazeLayout;

pub(crate) const OP: &str = "route_topk";

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub queries: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub k: usize,
}

/// Checks q `[B, Nq, Hq, D]`, desc `[B, Hkv, R, D]`, the layout, `k` and the
/// routes' shape.
pub(crate) fn check(
    q: [usize; 4],
    desc: [usize; 4],
    layout: &GazeLayout,
    k: usize,
    routes: [usize; 4],
) -> Result<Dims> {
    let [b, nq, hq, d] = q;
    let [db, hkv, r, dd] = desc;
    ensure(k > 0, || Error::value(OP, "k", "k must be at least 1"))?;
    ensure(db == b && dd == d, || {
        Error::shape(OP, "desc", format!("shape {desc:?}, q is {q:?}"))
    })?;
    ensure(d > 0 && hkv > 0 && hq > 0 && hq % hkv == 0, || {
        Error::shape(
            OP,
            "q",
            format!("{hq} query heads are not a multiple of {hkv} KV heads (head dim {d})"),
        )
    })?;
    ensure(layout.batch() == b, || {
        Error::shape(OP, "layout", format!("{} rows, q has {b}", layout.batch()))
    })?;
    ensure(r >= layout.max_regions(), || {
        Error::shape(
            OP,
            "desc",
            format!(
                "{r} descriptors per head, the layout has up to {} regions",
                layout.max_regions()
            ),
        )
    })?;
    ensure(routes == [b, nq, hq, k], || {
        Error::shape(
            OP,
            "routes",
            format!("shape {routes:?}, expected {:?}", [b, nq, hq, k]),
        )
    })?;
    ensure(
        k <= i32::MAX as usize && d <= i32::MAX as usize && nq <= i32::MAX as usize,
        || Error::Unsupported {
            op: OP,
            msg: "sizes past 32-bit indices".into(),
        },
    )?;
    Ok(Dims {
        batch: b,
        queries: nq,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        k,
    })
}
