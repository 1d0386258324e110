//! gaze_route_decode: route_topk (one decode query) and gaze_decode in one
//! op (SPEC "Gaze Attention / gaze_decode", its last bullet: "a fused variant
//! that scores the descriptors and routes inside the same launch").
//!
//! In: the new token's queries `q [B, Hq, D]` (after RoPE), one layer's cache
//! `k, v [B, S, Hkv, D]` (any memory order, head dim contiguous; GQA: query
//! head `h` reads KV head `h / G`), the descriptors `desc [B, Hkv, R, D]` f32
//! (region_descriptors, `R >= layout.max_regions()`), the [`GazeLayout`] and
//! the number of regions `top_k` each query head routes to.
//!
//! Math: exactly route_topk then gaze_decode. `score[h, r] = q_h . desc[h /
//! G, r]` (f32 products and sums, `d` ascending); each query head keeps its
//! `min(top_k, regions(b))` best regions (ties: the lower id; NaN lowest);
//! then exact softmax attention of the head over its row's visible keys and
//! the tokens of its routed regions (`scale` defaulting to `1 / sqrt(D)`).
//! With `top_k >= regions` it is dense attention over the row.
//!
//! Out: `o [B, Hq, D]` in the input type, optionally `lse [B, Hq]` f32, and
//! the [`Routes`](crate::Routes) `[B, 1, Hq, top_k]` it chose (ascending, -1 padded; tied to
//! `layout`), equal to route_topk's.
//!
//! Errors are those of route_topk and gaze_decode (reported under this op's
//! name), checked before anything is written.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{Error, Result};
use crate::gaze_decode::{self, Dims};
use crate::gaze_layout::GazeLayout;
use crate::route_topk;

pub(crate) const OP: &str = "gaze_route_decode";

/// The error of a check shared with route_topk / gaze_decode, under this op's name.
fn renamed(e: Error) -> Error {
    match e {
        Error::Shape { arg, msg, .. } => Error::Shape { op: OP, arg, msg },
        Error::Index { arg, msg, .. } => Error::Index { op: OP, arg, msg },
        Error::Value { arg, msg, .. } => Error::Value { op: OP, arg, msg },
        Error::Unsupported { msg, .. } => Error::Unsupported { op: OP, msg },
        Error::Cuda { msg, .. } => Error::Cuda { op: OP, msg },
    }
}

/// Checks q `[B, Hq, D]`, k and v `[B, S, Hkv, D]`, desc `[B, Hkv, R, D]`,
/// the layout, `top_k`, the routes `[B, 1, Hq, top_k]`, the scale and the
/// outputs o `[B, Hq, D]`, lse `[B, Hq]`: both ops' checks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    q: [usize; 3],
    k: [usize; 4],
    v: [usize; 4],
    desc: [usize; 4],
    layout: &GazeLayout,
    top_k: usize,
    routes: [usize; 4],
    scale: Option<f32>,
    o: [usize; 3],
    lse: Option<[usize; 2]>,
) -> Result<Dims> {
    let [b, hq, d] = q;
    let dims = gaze_decode::check(q, k, v, layout, routes, scale, o, lse).map_err(renamed)?;
    route_topk::check([b, 1, hq, d], desc, layout, top_k, routes).map_err(renamed)?;
    Ok(dims)
}
