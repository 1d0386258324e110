//! gaze_route_decode's random cases, shared by its CPU tests
//! (tests/tests/gaze_route_decode.rs) and GPU tests
//! (tests/tests/gpu/gaze_route_decode.rs). Keys and values no head of a KV
//! group attends (by the routes route_topk chooses) are NaN.

use foveal::gaze_route_decode::cpu::gaze_route_decode;
use foveal::route_topk::cpu::route_topk;
use foveal::{Element, GazeLayout, Layout, Routes, View};
use rand::rngs::StdRng;
use rand::Rng;

use crate::gaze_cases::{random_gaze_rows, GazeOpts};
pub use crate::gaze_decode::{attended, outputs};
use crate::{contiguous_strides, random_strides, rng, KvOrder, Tensor, TestElem};

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub seed: u64,
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    /// Integer-valued q and descriptors (exact scores, many ties) and now and
    /// then a NaN descriptor; otherwise uniform in [-1, 1).
    pub ties: bool,
    /// `top_k` at least every row's region count (dense attention).
    pub all: bool,
    pub scale: Option<f32>,
    /// Memory orders the CUDA kernel takes (q, desc contiguous, KV strides
    /// multiples of the head dim); otherwise any order with gaps.
    pub aligned: bool,
    /// Most units per row and their largest side (long rows for the GPU).
    pub opts: GazeOpts,
}

/// A case's inputs: layout, q `[B, Hq, D]`, k, v `[B, S, Hkv, D]`, desc
/// `[B, Hkv, R, D]`, top_k, and the routes route_topk chooses for them.
#[derive(Debug, Clone)]
pub struct Inputs<T> {
    pub layout: GazeLayout,
    pub q: Tensor<T, 3>,
    pub k: Tensor<T, 4>,
    pub v: Tensor<T, 4>,
    pub desc: Tensor<f32, 4>,
    pub top_k: usize,
    pub scale: Option<f32>,
    pub routes: Routes,
}

fn value<T: Element>(r: &mut StdRng, ties: bool, lo: i32, hi: i32) -> T {
    if ties {
        T::from_f32(r.random_range(lo..=hi) as f32)
    } else {
        T::from_f32(r.random_range(-1.0f32..1.0))
    }
}

impl<T: TestElem> Inputs<T> {
    pub fn new(c: &Case) -> Self {
        let mut r = rng(c.seed);
        let (seq, rows) = random_gaze_rows(&mut r, c.batch, c.opts);
        let layout = GazeLayout::new(seq, &rows).expect("valid rows");
        Self::with_layout(&mut r, c, layout)
    }

    /// Random tensors, top_k and the routes for a given layout (`c.opts`
    /// unused).
    pub fn with_layout(r: &mut StdRng, c: &Case, layout: GazeLayout) -> Self {
        let (hkv, d) = (c.kv_heads, c.head_dim);
        let hq = c.group * hkv;
        let q_shape = [c.batch, hq, d];
        let q_strides = if c.aligned {
            contiguous_strides(q_shape)
        } else {
            random_strides(r, q_shape)
        };
        let q = Tensor::from_fn(q_shape, q_strides, T::POISON, |_| {
            value::<T>(r, c.ties, -1, 1)
        });
        let r_desc = layout.max_regions() + r.random_range(0..2);
        let desc_shape = [c.batch, hkv, r_desc, d];
        let desc_strides = if c.aligned {
            contiguous_strides(desc_shape)
        } else {
            random_strides(r, desc_shape)
        };
        let nan_row = c.ties && r.random_bool(0.3);
        let mut desc = Tensor::from_fn(desc_shape, desc_strides, f32::NAN, |_| {
            value::<f32>(r, c.ties, -2, 2)
        });
        if nan_row && layout.max_regions() > 0 {
            let (b, h, reg) = (
                r.random_range(0..c.batch),
                r.random_range(0..hkv),
                r.random_range(0..layout.max_regions()),
            );
            let at = desc.offset([b, h, reg, r.random_range(0..d)]);
            desc.data[at] = f32::NAN;
        }
        let top_k = if c.all {
            layout.max_regions().max(1) + r.random_range(0..3)
        } else {
            r.random_range(1..=layout.max_regions() + 1)
        };
        let mut routes = Routes::new(&layout, 1, hq, top_k);
        route_topk(q4(&q), desc.view(), &layout, top_k, &mut routes).expect("route_topk");

        let kv_shape = [c.batch, layout.seq().max(1), hkv, d];
        let order = if c.aligned {
            KvOrder::pick_aligned(r)
        } else {
            KvOrder::pick(r)
        };
        let (k_strides, v_strides) = (order.strides(r, kv_shape), order.strides(r, kv_shape));
        let mut k = Tensor::from_fn(kv_shape, k_strides, T::POISON, |_| {
            T::from_f32(r.random_range(-1.0f32..1.0))
        });
        let mut v = Tensor::from_fn(kv_shape, v_strides, T::POISON, |_| {
            T::from_f32(r.random_range(-1.0f32..1.0))
        });
        for b in 0..c.batch {
            for kvh in 0..hkv {
                let mut used = vec![false; kv_shape[1]];
                for h in kvh * c.group..(kvh + 1) * c.group {
                    attended(&layout, &routes, b, h)
                        .into_iter()
                        .for_each(|p| used[p] = true);
                }
                for p in (0..kv_shape[1]).filter(|&p| !used[p]) {
                    for j in 0..d {
                        let (ok, ov) = (k.offset([b, p, kvh, j]), v.offset([b, p, kvh, j]));
                        k.data[ok] = T::POISON;
                        v.data[ov] = T::POISON;
                    }
                }
            }
        }
        Inputs {
            layout,
            q,
            k,
            v,
            desc,
            top_k,
            scale: c.scale,
            routes,
        }
    }
}

/// q `[B, Hq, D]` as route_topk's `[B, 1, Hq, D]`.
pub fn q4<T: Element>(q: &Tensor<T, 3>) -> View<'_, T, 4> {
    let [b, hq, d] = q.shape;
    let [sb, sh, sd] = q.strides;
    View::new(
        &q.data[q.base..],
        Layout::strided([b, 1, hq, d], [sb, sh, sh, sd]).expect("layout"),
    )
    .expect("view")
}

/// The CPU reference: o, lse and routes.
pub fn run_cpu<T: TestElem>(
    inp: &Inputs<T>,
    o_like: &Tensor<T, 3>,
    lse_like: &Tensor<f32, 2>,
) -> (Tensor<T, 3>, Tensor<f32, 2>, Routes) {
    let (mut o, mut lse) = (o_like.clone(), lse_like.clone());
    let hq = inp.q.shape[1];
    let mut routes = Routes::new(&inp.layout, 1, hq, inp.top_k);
    gaze_route_decode(
        inp.q.view(),
        inp.k.view(),
        inp.v.view(),
        inp.desc.view(),
        &inp.layout,
        inp.top_k,
        inp.scale,
        &mut o.view_mut(),
        Some(&mut lse.view_mut()),
        &mut routes,
    )
    .expect("valid call");
    (o, lse, routes)
}

/// Issue 11's minimal case ([`crate::gaze_decode::inf_value_case`]) for
/// the fused op: q and descriptors chosen so that route_topk (top_k 1)
/// routes head 0 to region 0 and head 1 to region 1; `V[1]` all +inf, which
/// only head 0 attends.
pub fn inf_value_case<T: TestElem>() -> Inputs<T> {
    let base = crate::gaze_decode::inf_value_case::<T>();
    let d = base.q.shape[2];
    // head 0 along +e0, head 1 along -e0; region 0's descriptor +e0, region 1's -e0
    let q = Tensor::from_fn(
        [1, 2, d],
        contiguous_strides([1, 2, d]),
        T::POISON,
        |[_, h, j]| {
            let sign = if h == 0 { 1.0 } else { -1.0 };
            T::from_f32(if j == 0 {
                sign
            } else {
                0.25 * (j as f32 - 3.5) / 4.0
            })
        },
    );
    let desc = Tensor::from_fn(
        [1, 1, 2, d],
        contiguous_strides([1, 1, 2, d]),
        f32::NAN,
        |[_, _, r, j]| {
            if j == 0 {
                if r == 0 {
                    1.0
                } else {
                    -1.0
                }
            } else {
                0.0
            }
        },
    );
    let mut routes = Routes::new(&base.layout, 1, 2, 1);
    route_topk(q4(&q), desc.view(), &base.layout, 1, &mut routes).expect("route_topk");
    assert_eq!(
        routes.ids(),
        &[0, 1],
        "head 0 routes region 0, head 1 region 1"
    );
    Inputs {
        layout: base.layout,
        q,
        k: base.k,
        v: base.v,
        desc,
        top_k: 1,
        scale: None,
        routes,
    }
}
