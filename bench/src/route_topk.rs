//! Inputs and baseline of the route_topk benchmarks.
//!
//! A case is one Gaze Attention routing step on Qwen2.5-VL-7B (28 query
//! heads, 4 KV heads, head dim 128): the layout of
//! [`region_descriptors`](crate::region_descriptors) (36 regions per 32 x 32
//! frame: 576 regions at 16K visual tokens), queries `q [B, Nq, Hq, D]` bf16
//! (`Nq = 1` while decoding), descriptors `[B, Hkv, R, D]` f32, and `k` a
//! tenth of the regions (the paper attends about 10% of the visual entries).

use foveal::{Element, GazeLayout, Layout, View};

use crate::region_descriptors::{self as rd};
use crate::{random_elems, rng, KvLayout, ModelDims, QWEN25_VL_7B};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub dims: ModelDims,
    pub batch: usize,
    /// Visual tokens per row (whole 32 x 32 frames).
    pub visual: usize,
    /// Queries per row.
    pub queries: usize,
    /// Regions routed per (row, query, head).
    pub k: usize,
    pub seed: u64,
}

impl Case {
    /// One decode query per row, k = ceil(R / 10).
    pub fn new(batch: usize, visual: usize) -> Self {
        let regions = visual / (rd::SIDE * rd::SIDE) * 36;
        Case {
            dims: QWEN25_VL_7B,
            batch,
            visual,
            queries: 1,
            k: regions.div_ceil(10),
            seed: 0x2047,
        }
    }

    pub fn with_queries(mut self, queries: usize) -> Self {
        self.queries = queries;
        self
    }

    /// `B1 Nq1 N16384 k58`.
    pub fn label(&self) -> String {
        format!(
            "B{} Nq{} N{} k{}",
            self.batch, self.queries, self.visual, self.k
        )
    }

    /// The region layout of region_descriptors' case of the same size.
    pub fn layout(&self) -> GazeLayout {
        rd::Case::new(self.batch, self.visual, KvLayout::Bshd).layout()
    }

    /// `[B, Nq, Hq, D]`, contiguous.
    pub fn q_shape(&self) -> [usize; 4] {
        [
            self.batch,
            self.queries,
            self.dims.q_heads,
            self.dims.head_dim,
        ]
    }

    /// `[B, Hkv, R, D]` for `regions` regions per row, contiguous.
    pub fn desc_shape(&self, regions: usize) -> [usize; 4] {
        [self.batch, self.dims.kv_heads, regions, self.dims.head_dim]
    }

    /// `[B, Nq, Hq, k]`.
    pub fn routes_len(&self) -> usize {
        self.batch * self.queries * self.dims.q_heads * self.k
    }
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub layout: GazeLayout,
    pub q: Vec<T>,
    pub desc: Vec<f32>,
}

impl<T: Element> Input<T> {
    pub fn q_view(&self) -> View<'_, T, 4> {
        View::contiguous(&self.q, self.case.q_shape()).expect("generated to fit")
    }

    pub fn desc_view(&self) -> View<'_, f32, 4> {
        View::new(
            &self.desc,
            Layout::contiguous(self.case.desc_shape(self.layout.max_regions())),
        )
        .expect("generated to fit")
    }
}

/// Queries and descriptors uniform in [-1, 1).
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let mut r = rng(case.seed);
    let layout = case.layout();
    let q = random_elems(&mut r, case.q_shape().iter().product(), -1.0, 1.0);
    let desc = random_elems(
        &mut r,
        case.desc_shape(layout.max_regions()).iter().product(),
        -1.0,
        1.0,
    );
    Input {
        case: *case,
        layout,
        q,
        desc,
    }
}

/// Bytes the op must move: q and the descriptors read once, the region
/// counts read, the routes `[B, Nq, Hq, k]` i32 written.
pub fn floor_bytes(case: &Case, regions: usize, elem_bytes: usize) -> u64 {
    let q = case.q_shape().iter().product::<usize>() * elem_bytes;
    let desc = case.desc_shape(regions).iter().product::<usize>() * 4;
    (q + desc + case.batch * 4 + case.routes_len() * 4) as u64
}

/// The framework way: the descriptors repeated per query head (`repeat_kv`,
/// `[Hq, R, D]`), the scores `q . desc^T` per head, a full stable argsort
/// descending, the first `k`, sorted ascending. Returns the routes `[B, Nq,
/// Hq, k]` (-1 padded).
pub fn baseline<T: Element>(
    q: View<'_, T, 4>,
    desc: View<'_, f32, 4>,
    layout: &GazeLayout,
    k: usize,
) -> Vec<i32> {
    let [b, nq, hq, d] = q.shape();
    let g = hq / desc.shape()[1];
    let mut routes = vec![-1i32; b * nq * hq * k];
    for bi in 0..b {
        let regions = layout.regions(bi);
        let mut repeated = vec![0f32; hq * regions * d];
        for h in 0..hq {
            for r in 0..regions {
                repeated[(h * regions + r) * d..][..d].copy_from_slice(desc.row([bi, h / g, r, 0]));
            }
        }
        for n in 0..nq {
            for h in 0..hq {
                let qh: Vec<f32> = q.row([bi, n, h, 0]).iter().map(|x| x.to_f32()).collect();
                let scores: Vec<f32> = (0..regions)
                    .map(|r| {
                        qh.iter()
                            .zip(&repeated[(h * regions + r) * d..][..d])
                            .map(|(a, c)| a * c)
                            .sum()
                    })
                    .collect();
                let mut order: Vec<usize> = (0..regions).collect();
                order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]));
                order.truncate(k);
                order.sort_unstable();
                for (slot, &r) in routes[((bi * nq + n) * hq + h) * k..]
                    .iter_mut()
                    .zip(&order)
                {
                    *slot = r as i32;
                }
            }
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::route_topk::cpu;
    use foveal::Routes;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        let case = Case::new(2, 2048).with_queries(3);
        assert_eq!(case.k, 8, "72 regions");
        let input = generate::<bf16>(&case);
        let mut routes = Routes::new(&input.layout, 3, case.dims.q_heads, case.k);
        cpu::route_topk(
            input.q_view(),
            input.desc_view(),
            &input.layout,
            case.k,
            &mut routes,
        )
        .unwrap();
        assert_eq!(
            baseline(input.q_view(), input.desc_view(), &input.layout, case.k),
            routes.ids()
        );
    }
}
