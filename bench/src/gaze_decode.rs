//! Inputs of the gaze_decode benchmarks: one decode step of a
//! Qwen2.5-VL-7B-style model over a cache holding, per row, 32 text tokens,
//! one square image of `nv` visual tokens in 6 x 6 regions, its 4 context
//! tokens and a 28-token question (64 always-visible tokens).
//!
//! "Attended" is the share of the visual entries a KV group reads: per (row,
//! KV head) a random pool of that share of the regions; each of the group's
//! query heads routes a random three quarters of the pool (so heads differ
//! and the kernel's per-head masks are exercised), and the group reads the
//! union of its heads' routes, which is the pool unless no head picked some
//! pool region ([`attended_entries`] counts it exactly).
//!
//! The dense baseline is the same op over the same cache with every position
//! of the row visible and no region ([`Plan::dense`]): dense decode attention
//! by the same flash-decoding kernel, so the ratio measures what skipping
//! unrouted regions saves.

use foveal::{Element, GazeLayout, GazeRow, Layout, RegionShape, Routes, View};
use rand::seq::index::sample;

use crate::{random_elems, rng, KvLayout, ModelDims, QWEN25_VL_7B};

/// Text tokens before the image, context tokens after it, question tokens.
pub const TEXT_BEFORE: usize = 32;
pub const CONTEXT: usize = 4;
pub const QUESTION: usize = 28;

/// Attended shares of the visual entries the GPU benchmark sweeps, in percent.
pub const ATTENDED_PCT: [usize; 4] = [5, 10, 25, 50];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub dims: ModelDims,
    pub batch: usize,
    /// Visual tokens per row: a square grid.
    pub nv: usize,
    /// Share of the regions each KV group reads, in percent.
    pub attended_pct: usize,
    pub kv_layout: KvLayout,
    pub seed: u64,
}

impl Case {
    pub fn new(batch: usize, nv: usize, attended_pct: usize, kv_layout: KvLayout) -> Self {
        Case {
            dims: QWEN25_VL_7B,
            batch,
            nv,
            attended_pct,
            kv_layout,
            seed: 0x6a2e,
        }
    }

    /// `B1 Nv16384 10% bshd`.
    pub fn label(&self) -> String {
        format!(
            "B{} Nv{} {}% {}",
            self.batch,
            self.nv,
            self.attended_pct,
            self.kv_layout.name()
        )
    }

    /// The side of the square grid.
    pub fn side(&self) -> usize {
        let side = (self.nv as f64).sqrt().round() as usize;
        assert_eq!(
            side * side,
            self.nv,
            "{self:?}: the visual tokens must fill a square grid"
        );
        side
    }

    /// Positions per row (the cache capacity).
    pub fn seq(&self) -> usize {
        TEXT_BEFORE + self.nv + CONTEXT + QUESTION
    }
}

/// The index structures and tensor layouts of a case.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dims: ModelDims,
    pub layout: GazeLayout,
    pub routes: Routes,
    /// `[B, Hq, D]` contiguous (q and o).
    pub q_layout: Layout<3>,
    /// `[B, S, Hkv, D]` in the case's memory order (k and v).
    pub kv_layout: Layout<4>,
}

impl Plan {
    /// The dense baseline over the same cache: every position visible, no region.
    pub fn dense(&self) -> Plan {
        let rows: Vec<GazeRow> = (0..self.layout.batch())
            .map(|b| {
                let mut row = GazeRow::new();
                row.push_visible(0..self.layout.end(b));
                row
            })
            .collect();
        let layout = GazeLayout::new(self.layout.seq(), &rows).expect("dense rows");
        let hq = self.dims.q_heads;
        let routes = Routes::from_ids(&layout, 1, hq, 1, &vec![-1; layout.batch() * hq])
            .expect("empty routes");
        Plan {
            dims: self.dims,
            layout,
            routes,
            ..self.clone()
        }
    }

    pub fn o_shape(&self) -> [usize; 3] {
        self.q_layout.shape()
    }

    /// Bytes the op must move: q, each KV group's attended keys and values
    /// once, o.
    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        let d = self.dims.head_dim;
        let q_and_o = 2 * self.q_layout.numel() * elem_bytes;
        (q_and_o + attended_entries(self) * 2 * d * elem_bytes) as u64
    }

    /// The share of the visual entries read, over every (row, KV head).
    pub fn attended_share(&self) -> f64 {
        let g = self.dims.group();
        let mut visual = 0usize;
        let mut read = 0usize;
        for b in 0..self.layout.batch() {
            let all: usize = (0..self.layout.regions(b))
                .map(|r| self.layout.region(b, r).len())
                .sum();
            for kvh in 0..self.dims.kv_heads {
                visual += all;
                read += union_regions(self, b, kvh * g..(kvh + 1) * g)
                    .iter()
                    .map(|&r| self.layout.region(b, r).len())
                    .sum::<usize>();
            }
        }
        if visual == 0 {
            0.0
        } else {
            read as f64 / visual as f64
        }
    }
}

/// The regions routed by any of `heads` in row `b`, ascending.
fn union_regions(plan: &Plan, b: usize, heads: std::ops::Range<usize>) -> Vec<usize> {
    let mut u: Vec<usize> = heads
        .flat_map(|h| plan.routes.get(b, 0, h).iter().map(|&r| r as usize))
        .collect();
    u.sort_unstable();
    u.dedup();
    u
}

/// KV entries (one key and one value of one KV head) a call reads: per (row,
/// KV head) the visible keys plus the union of its query heads' regions.
pub fn attended_entries(plan: &Plan) -> usize {
    let g = plan.dims.group();
    (0..plan.layout.batch())
        .map(|b| {
            (0..plan.dims.kv_heads)
                .map(|kvh| {
                    plan.layout.visible_len(b)
                        + union_regions(plan, b, kvh * g..(kvh + 1) * g)
                            .iter()
                            .map(|&r| plan.layout.region(b, r).len())
                            .sum::<usize>()
                })
                .sum::<usize>()
        })
        .sum()
}

/// The rows, routes and layouts of `case`.
pub fn plan(case: &Case) -> Plan {
    let side = case.side();
    let seq = case.seq();
    let mut row = GazeRow::new();
    row.push_visible(0..TEXT_BEFORE);
    row.push_units(&[TEXT_BEFORE], side, side, RegionShape::default())
        .expect("grid");
    row.push_visible(TEXT_BEFORE + case.nv..seq);
    let layout = GazeLayout::new(seq, &vec![row; case.batch]).expect("rows");

    let ModelDims {
        q_heads,
        kv_heads,
        head_dim,
        ..
    } = case.dims;
    let g = case.dims.group();
    let regions = layout.max_regions();
    let pool_size = (regions * case.attended_pct)
        .div_ceil(100)
        .clamp(1, regions);
    let k = (3 * pool_size).div_ceil(4);
    let mut r = rng(case.seed);
    let mut ids = Vec::with_capacity(case.batch * q_heads * k);
    for _ in 0..case.batch {
        for _ in 0..kv_heads {
            let pool = sample(&mut r, regions, pool_size).into_vec();
            for _ in 0..g {
                let mut pick: Vec<i32> = sample(&mut r, pool_size, k)
                    .into_iter()
                    .map(|i| pool[i] as i32)
                    .collect();
                pick.sort_unstable();
                ids.extend(pick);
            }
        }
    }
    let routes = Routes::from_ids(&layout, 1, q_heads, k, &ids).expect("routes");
    Plan {
        dims: case.dims,
        layout,
        routes,
        q_layout: Layout::contiguous([case.batch, q_heads, head_dim]),
        kv_layout: case.kv_layout.layout(case.batch, seq, kv_heads, head_dim),
    }
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub plan: Plan,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn q_view(&self) -> View<'_, T, 3> {
        View::new(&self.q, self.plan.q_layout).expect("generated to fit")
    }

    pub fn k_view(&self) -> View<'_, T, 4> {
        View::new(&self.k, self.plan.kv_layout).expect("generated to fit")
    }

    pub fn v_view(&self) -> View<'_, T, 4> {
        View::new(&self.v, self.plan.kv_layout).expect("generated to fit")
    }
}

/// The plan of `case` and random q, k, v uniform in [-1, 1).
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let plan = plan(case);
    let mut r = rng(case.seed ^ 0x9e37_79b9_7f4a_7c15);
    let q = random_elems(&mut r, plan.q_layout.span(), -1.0, 1.0);
    let k = random_elems(&mut r, plan.kv_layout.span(), -1.0, 1.0);
    let v = random_elems(&mut r, plan.kv_layout.span(), -1.0, 1.0);
    Input { plan, q, k, v }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::gaze_decode::cpu::gaze_decode;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn attended_share_follows_the_case() {
        for pct in ATTENDED_PCT {
            let p = plan(&Case::new(2, 4096, pct, KvLayout::Bshd));
            let share = p.attended_share();
            // the pool is pct% of the regions (border regions are smaller)
            assert!(
                share > 0.6 * pct as f64 / 100.0 && share < 1.4 * pct as f64 / 100.0,
                "{pct}%: {share}"
            );
        }
        let p = plan(&Case::new(1, 1024, 10, KvLayout::Bshd));
        assert_eq!(p.dense().attended_share(), 0.0);
        assert_eq!(attended_entries(&p.dense()), 4 * p.layout.end(0));
    }

    /// The dense plan is plain attention over the row: with every region
    /// routed, the sparse plan gives the same output.
    #[test]
    fn dense_plan_matches_all_regions_routed() {
        let mut case = Case::new(1, 144, 100, KvLayout::Bhsd);
        case.dims = ModelDims {
            layers: 1,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let mut input = generate::<bf16>(&case);
        let all: Vec<i32> = (0..input.plan.layout.regions(0) as i32).collect();
        let k = all.len();
        let ids: Vec<i32> = (0..4).flat_map(|_| all.clone()).collect();
        input.plan.routes = Routes::from_ids(&input.plan.layout, 1, 4, k, &ids).unwrap();
        let run = |plan: &Plan| {
            let mut o = vec![bf16::ZERO; plan.q_layout.numel()];
            gaze_decode(
                input.q_view(),
                input.k_view(),
                input.v_view(),
                &plan.layout,
                &plan.routes,
                None,
                &mut ViewMut::contiguous(&mut o, plan.o_shape()).unwrap(),
                None,
            )
            .unwrap();
            o
        };
        let (sparse, dense) = (run(&input.plan), run(&input.plan.dense()));
        for (s, d) in sparse.iter().zip(&dense) {
            assert!(
                (s.to_f32() - d.to_f32()).abs() <= 1e-2 * d.to_f32().abs().max(0.05),
                "{s} vs {d}"
            );
        }
    }
}
