//! gaze_decode: Gaze Attention's sparse decode attention (SPEC "Gaze
//! Attention / gaze_decode", the paper's Eqs. 3 and 4).
//!
//! In: the new token's queries `q [B, Hq, D]`, one layer's cache `k, v
//! [B, S, Hkv, D]` (any memory order, head dim contiguous; GQA: query head `h`
//! reads KV head `h / G`), the [`GazeLayout`] (always-visible ranges and
//! regions) and the [`Routes`](crate::Routes) `[B, 1, Hq, k]` of this step (route_topk).
//!
//! Math: exact softmax attention of query head `h` over the keys of row `b`'s
//! visible ranges plus the tokens of the regions routed for `(b, h)`:
//! `o = sum_p softmax_p(scale * q . k[p]) v[p]`, `lse = log sum_p
//! exp(scale * q . k[p])` (natural log, f32), `scale` defaulting to
//! `1 / sqrt(D)`. With every region routed it is dense attention over the
//! row. A head that attends nothing (no visible key, no region) gets `o = 0`
//! and `lse = -inf`.
//!
//! Out: `o [B, Hq, D]` in the input type, optionally `lse [B, Hq]` f32.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};
use crate::gaze_layout::GazeLayout;

pub(crate) const OP: &str = "gaze_decode";

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub k: usize,
    pub scale: f32,
}

/// Checks q `[B, Hq, D]`, k and v `[B, S, Hkv, D]`, the layout, the routes
/// `[B, 1, Hq, k]`, the scale and the outputs o `[B, Hq, D]`, lse `[B, Hq]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    q: [usize; 3],
    k: [usize; 4],
    v: [usize; 4],
    layout: &GazeLayout,
    routes: [usize; 4],
    scale: Option<f32>,
    o: [usize; 3],
    lse: Option<[usize; 2]>,
) -> Result<Dims> {
    let [b, hq, d] = q;
    let [kb, s, hkv, kd] = k;
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
    ensure(layout.batch() == b, || {
        Error::shape(OP, "layout", format!("{} rows, q has {b}", layout.batch()))
    })?;
    ensure(layout.seq() <= s, || {
        Error::index(
            OP,
            "layout",
            format!("positions index a cache of {}, k holds {s}", layout.seq()),
        )
    })?;
    ensure(routes[0] == b && routes[1] == 1 && routes[2] == hq, || {
        Error::shape(
            OP,
            "routes",
            format!("shape {routes:?}, expected [{b}, 1, {hq}, k]"),
        )
    })?;
    if let Some(sc) = scale {
        ensure(sc.is_finite() && sc > 0.0, || {
            Error::value(OP, "scale", format!("{sc} is not a finite positive number"))
        })?;
    }
    ensure(o == q, || {
        Error::shape(OP, "o", format!("shape {o:?}, expected {q:?}"))
    })?;
    if let Some(l) = lse {
        ensure(l == [b, hq], || {
            Error::shape(OP, "lse", format!("shape {l:?}, expected [{b}, {hq}]"))
        })?;
    }
    ensure(
        d <= i32::MAX as usize && hq <= i32::MAX as usize && routes[3] <= i32::MAX as usize,
        || Error::Unsupported {
            op: OP,
            msg: "sizes past 32-bit indices".into(),
        },
    )?;
    Ok(Dims {
        batch: b,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        k: routes[3],
        scale: scale.unwrap_or(1.0 / (d as f32).sqrt()),
    })
}
