//! CPU reference of route_topk: f32 dot products, a selection of the top k
//! per list (by score descending, then region id), then the k ids sorted.

use std::cmp::Reverse;

use super::check;
use crate::dtype::Element;
use crate::error::Result;
use crate::gaze_layout::{GazeLayout, Routes};
use crate::layout::View;
use crate::select_keep::cpu::rank_key;

/// Routes every (row, query, query head) to its `k` best regions (module
/// docs), into `routes` (made by `Routes::new(layout, Nq, Hq, k)`).
pub fn route_topk<T: Element>(
    q: View<'_, T, 4>,
    desc: View<'_, f32, 4>,
    layout: &GazeLayout,
    k: usize,
    routes: &mut Routes,
) -> Result<()> {
    let d = check(q.shape(), desc.shape(), layout, k, routes.shape())?;
    let g = d.q_heads / d.kv_heads;
    let mut order = Vec::new();
    let mut scores = Vec::new();
    let mut qh = Vec::with_capacity(d.head_dim);
    for b in 0..d.batch {
        let regions = layout.regions(b);
        for n in 0..d.queries {
            for h in 0..d.q_heads {
                qh.clear();
                qh.extend(q.row([b, n, h, 0]).iter().map(|x| x.to_f32()));
                scores.clear();
                scores.extend((0..regions).map(|r| {
                    qh.iter()
                        .zip(desc.row([b, h / g, r, 0]))
                        .map(|(a, c)| a * c)
                        .sum::<f32>()
                }));
                order.clear();
                order.extend(0..regions);
                let key = |&r: &usize| (Reverse(rank_key(scores[r])), r);
                if k < regions {
                    order.select_nth_unstable_by_key(k - 1, key);
                    order.truncate(k);
                }
                order.sort_unstable();
                let list = &mut routes.ids[((b * d.queries + n) * d.q_heads + h) * k..][..k];
                for (j, slot) in list.iter_mut().enumerate() {
                    *slot = order.get(j).map_or(-1, |&r| r as i32);
                }
            }
        }
    }
    routes.layout_id = layout.id();
    Ok(())
}
