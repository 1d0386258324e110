//! Inputs of the gaze_route_decode benchmarks: gaze_decode's decode step
//! ([`crate::gaze_decode`]: Qwen2.5-VL-7B heads, 64 visible text tokens, one
//! square image in 6 x 6 regions) with descriptors in place of given routes.
//!
//! The attended share is set through the scores: q is positive and each
//! region's descriptor is a random multiple of the all-ones vector, so every
//! query head of a KV group ranks the regions alike and routes the same
//! `top_k = ceil(pct% of the regions)`: the group reads exactly that share
//! (border regions aside). The plan's routes are the ones route_topk chooses
//! (the CPU reference, computed here), so [`crate::gaze_decode::Plan`]'s
//! floor, share and dense baseline apply unchanged.

use foveal::route_topk::cpu::route_topk;
use foveal::{Element, Layout, Routes, View};

use crate::gaze_decode::{self as gd, Case, Input};
use crate::{random_elems, rng};

/// A case's host tensors: gaze_decode's input (q positive, the plan's routes
/// those chosen by route_topk), the descriptors and `top_k`.
#[derive(Debug, Clone)]
pub struct FusedInput<T> {
    pub input: Input<T>,
    /// `[B, Hkv, R, D]` f32, contiguous.
    pub desc: Vec<f32>,
    pub desc_layout: Layout<4>,
    pub top_k: usize,
}

impl<T: Element> FusedInput<T> {
    pub fn desc_view(&self) -> View<'_, f32, 4> {
        View::new(&self.desc, self.desc_layout).expect("generated to fit")
    }

    /// q `[B, Hq, D]` as route_topk's `[B, 1, Hq, D]` (contiguous).
    pub fn q4_layout(&self) -> Layout<4> {
        let [b, hq, d] = self.input.plan.q_layout.shape();
        Layout::contiguous([b, 1, hq, d])
    }
}

/// `top_k` for `case`: its attended share of the row's regions.
pub fn top_k(regions: usize, attended_pct: usize) -> usize {
    (regions * attended_pct)
        .div_ceil(100)
        .clamp(1, regions.max(1))
}

/// The input of `case` (gaze_decode's, with q in [0, 1) and descriptors).
pub fn generate<T: Element>(case: &Case) -> FusedInput<T> {
    let mut input = gd::generate::<T>(case);
    let mut r = rng(case.seed ^ 0x5bd1_e995);
    input.q = random_elems(&mut r, input.plan.q_layout.span(), 0.0, 1.0);
    let dims = case.dims;
    let regions = input.plan.layout.max_regions();
    let desc_layout = Layout::contiguous([case.batch, dims.kv_heads, regions, dims.head_dim]);
    let scalars: Vec<f32> = random_elems(&mut r, case.batch * dims.kv_heads * regions, -1.0, 1.0);
    let desc: Vec<f32> = scalars
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c, dims.head_dim))
        .collect();
    let top_k = top_k(regions, case.attended_pct);
    let mut fused = FusedInput {
        input,
        desc,
        desc_layout,
        top_k,
    };
    let mut routes = Routes::new(&fused.input.plan.layout, 1, dims.q_heads, top_k);
    let q4 = View::new(&fused.input.q, fused.q4_layout()).expect("q");
    route_topk(
        q4,
        fused.desc_view(),
        &fused.input.plan.layout,
        top_k,
        &mut routes,
    )
    .expect("route_topk");
    fused.input.plan.routes = routes;
    fused
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvLayout;
    use half::bf16;

    #[test]
    fn heads_of_a_group_route_alike_and_the_share_follows_the_case() {
        for pct in gd::ATTENDED_PCT {
            let f = generate::<bf16>(&Case::new(1, 4096, pct, KvLayout::Bshd));
            let plan = &f.input.plan;
            let g = plan.dims.group();
            for h in 0..plan.dims.q_heads {
                assert_eq!(
                    plan.routes.get(0, 0, h),
                    plan.routes.get(0, 0, h / g * g),
                    "head {h}"
                );
            }
            let share = plan.attended_share();
            assert!(
                share > 0.6 * pct as f64 / 100.0 && share < 1.4 * pct as f64 / 100.0,
                "{pct}%: {share}"
            );
        }
    }
}
