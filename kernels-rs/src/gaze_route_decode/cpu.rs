//! CPU reference of gaze_route_decode: the CPU route_topk, then the CPU
//! gaze_decode on the routes it chose.

use super::{check, renamed};
use crate::dtype::Element;
use crate::error::Result;
use crate::gaze_decode::cpu::gaze_decode;
use crate::gaze_layout::{GazeLayout, Routes};
use crate::layout::{Layout, View, ViewMut};
use crate::route_topk::cpu::route_topk;

/// Routes each query head to its `top_k` best regions and attends its row's
/// visible keys and those regions (module docs), into `o [B, Hq, D]`, `lse
/// [B, Hq]` when given, and `routes` (made by `Routes::new(layout, 1, Hq,
/// top_k)`; tied to `layout` after the call).
#[allow(clippy::too_many_arguments)]
pub fn gaze_route_decode<T: Element>(
    q: View<'_, T, 3>,
    k: View<'_, T, 4>,
    v: View<'_, T, 4>,
    desc: View<'_, f32, 4>,
    layout: &GazeLayout,
    top_k: usize,
    scale: Option<f32>,
    o: &mut ViewMut<'_, T, 3>,
    lse: Option<&mut ViewMut<'_, f32, 2>>,
    routes: &mut Routes,
) -> Result<()> {
    let [b, hq, d] = q.shape();
    check(
        q.shape(),
        k.shape(),
        v.shape(),
        desc.shape(),
        layout,
        top_k,
        routes.shape(),
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    let [sb, sh, sd] = q.layout().strides();
    let q4 = View::new(
        q.data(),
        Layout::strided([b, 1, hq, d], [sb, sh, sh, sd]).map_err(renamed)?,
    )
    .map_err(renamed)?;
    route_topk(q4, desc, layout, top_k, routes).map_err(renamed)?;
    gaze_decode(q, k, v, layout, routes, scale, o, lse).map_err(renamed)
}
