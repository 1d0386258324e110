//! gaze_decode's random cases and f64 oracle, shared by its CPU tests
//! (tests/tests/gaze_decode.rs) and GPU tests (tests/tests/gpu/gaze_decode.rs).
//!
//! Keys and values no head of a KV group attends are NaN, so an
//! implementation that reads an unrouted region's tokens (or a position
//! outside the layout) fails.

use foveal::{Element, GazeLayout, GazeRow, RegionShape, Routes};
use rand::rngs::StdRng;
use rand::Rng;

use crate::{
    contiguous_strides, indices, random_strides, random_tensor, rng, to_f64, KvOrder, Poison,
    Tensor, TestElem, Tol,
};

// ---------------------------------------------------------------------------
// Random layouts, routes and tensors (shared with the GPU tests)
// ---------------------------------------------------------------------------

/// One random row starting at `pos`: optional text, 0 to 3 visual units
/// (images, or video frames with visible context tokens between them) of
/// random grids and region shapes, optional text after; a gap of unused
/// positions now and then. Returns the row and one past its last position.
fn random_row(r: &mut StdRng, mut pos: usize, long: bool) -> (GazeRow, usize) {
    let mut row = GazeRow::new();
    let text = |r: &mut StdRng| {
        if r.random_bool(0.3) {
            0
        } else {
            r.random_range(1..6)
        }
    };
    let n = text(r);
    row.push_visible(pos..pos + n);
    pos += n;
    for _ in 0..r.random_range(0..=3) {
        let (h, w) = if long {
            (r.random_range(20..40), r.random_range(20..40))
        } else {
            (r.random_range(1..7), r.random_range(1..7))
        };
        let frames = if r.random_bool(0.3) {
            r.random_range(2..4)
        } else {
            1
        };
        let shape = RegionShape {
            frames: r.random_range(1..3),
            height: r.random_range(1..5),
            width: r.random_range(1..5),
        };
        let shape = if long { RegionShape::default() } else { shape };
        let mut bases = Vec::new();
        for _ in 0..frames {
            bases.push(pos);
            pos += h * w;
            let context = r.random_range(0..3);
            row.push_visible(pos..pos + context);
            pos += context;
        }
        row.push_units(&bases, h, w, shape).expect("valid grid");
        pos += usize::from(r.random_bool(0.2)); // an unused position
    }
    let n = text(r);
    row.push_visible(pos..pos + n);
    (row, pos + n)
}

/// `batch` random rows (each with a random left offset) and the cache
/// capacity they need, plus 0 to 2 spare slots.
pub fn random_rows(r: &mut StdRng, batch: usize, long: bool) -> (Vec<GazeRow>, usize) {
    let mut seq = 0;
    let rows = (0..batch)
        .map(|_| {
            let start = r.random_range(0..3);
            let (row, end) = random_row(r, start, long);
            seq = seq.max(end);
            row
        })
        .collect();
    (rows, seq + r.random_range(0..3))
}

/// Routes `[B, 1, Hq, k]`: each list a random set of 0 to `k` of its row's
/// regions (the whole list most of the time), ascending, padded with -1.
pub fn random_routes(r: &mut StdRng, layout: &GazeLayout, q_heads: usize) -> Routes {
    let k = r.random_range(1..=layout.max_regions() + 1);
    let mut ids = Vec::with_capacity(layout.batch() * q_heads * k);
    for b in 0..layout.batch() {
        let regions = layout.regions(b);
        for _ in 0..q_heads {
            let most = k.min(regions);
            let n = if r.random_bool(0.7) {
                most
            } else {
                r.random_range(0..=most)
            };
            let mut pick: Vec<i32> = rand::seq::index::sample(r, regions, n)
                .into_iter()
                .map(|x| x as i32)
                .collect();
            pick.sort_unstable();
            pick.resize(k, -1);
            ids.extend(pick);
        }
    }
    Routes::from_ids(layout, 1, q_heads, k, &ids).expect("valid routes")
}

/// The positions query head `h` of row `b` attends: the visible ranges, then
/// its routed regions.
pub fn attended(layout: &GazeLayout, routes: &Routes, b: usize, h: usize) -> Vec<usize> {
    let mut p: Vec<usize> = layout.visible(b).flatten().collect();
    for &r in routes.get(b, 0, h) {
        p.extend(layout.region(b, r as usize).iter().map(|&x| x as usize));
    }
    p
}

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub seed: u64,
    pub batch: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub scale: Option<f32>,
    /// Rows of 400 to 1,600 visual tokens per unit in 6 x 6 regions.
    pub long: bool,
    /// Memory orders the CUDA kernels take (q contiguous, KV strides
    /// multiples of the head dim); otherwise any order with gaps.
    pub aligned: bool,
}

/// A case's inputs: the rows, layout and routes, q `[B, Hq, D]` and k, v
/// `[B, S, Hkv, D]` (uniform in [-1, 1); NaN wherever no head of the KV
/// group attends).
#[derive(Debug, Clone)]
pub struct Inputs<T> {
    pub layout: GazeLayout,
    pub routes: Routes,
    pub q: Tensor<T, 3>,
    pub k: Tensor<T, 4>,
    pub v: Tensor<T, 4>,
    pub scale: Option<f32>,
}

impl<T: TestElem> Inputs<T> {
    pub fn new(c: &Case) -> Self {
        let mut r = rng(c.seed);
        let (rows, seq) = random_rows(&mut r, c.batch, c.long);
        let layout = GazeLayout::new(seq, &rows).expect("valid rows");
        let hq = c.group * c.kv_heads;
        let routes = random_routes(&mut r, &layout, hq);
        Self::with(&mut r, c, layout, routes)
    }

    /// Random tensors for a given layout and routes.
    pub fn with(r: &mut StdRng, c: &Case, layout: GazeLayout, routes: Routes) -> Self {
        let (hkv, d) = (c.kv_heads, c.head_dim);
        let hq = c.group * hkv;
        let q_shape = [c.batch, hq, d];
        let q_strides = if c.aligned {
            contiguous_strides(q_shape)
        } else {
            random_strides(r, q_shape)
        };
        let q = random_tensor(r, q_shape, q_strides, -1.0, 1.0);
        let kv_shape = [c.batch, layout.seq().max(1), hkv, d];
        let order = if c.aligned {
            KvOrder::pick_aligned(r)
        } else {
            KvOrder::pick(r)
        };
        let (k_strides, v_strides) = (order.strides(r, kv_shape), order.strides(r, kv_shape));
        let mut k = random_tensor(r, kv_shape, k_strides, -1.0, 1.0);
        let mut v = random_tensor(r, kv_shape, v_strides, -1.0, 1.0);
        for b in 0..c.batch {
            for kvh in 0..hkv {
                let mut used = vec![false; kv_shape[1]];
                for h in kvh * c.group..(kvh + 1) * c.group {
                    attended(&layout, &routes, b, h)
                        .into_iter()
                        .for_each(|p| used[p] = true);
                }
                for (p, _) in used.iter().enumerate().filter(|(_, &u)| !u) {
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
            routes,
            q,
            k,
            v,
            scale: c.scale,
        }
    }
}

// ---------------------------------------------------------------------------
// The oracle
// ---------------------------------------------------------------------------

/// What the oracle says about one (row, query head).
#[derive(Debug, Clone)]
pub struct Want {
    pub o: Vec<f64>,
    pub lse: f64,
    /// The largest |v| attended: the scale of the output's error.
    pub v_max: f64,
    /// `scale * max_p sum_d |q_d k_d|`: the size of the logits' terms.
    pub magnitude: f64,
}

impl Want {
    /// The bound on `|got - want[d]|` for a result stored as `T` after f32
    /// accumulation (`slack` times the accumulation error allowed).
    pub fn bound<T: Element>(&self, d: usize, slack: f64) -> f64 {
        let storage = Tol::for_elem::<T>();
        storage.abs
            + storage.rel * self.o[d].abs()
            + slack * Tol::F32.rel * (1.0 + self.magnitude) * self.v_max
    }

    pub fn lse_bound(&self, slack: f64) -> f64 {
        Tol::F32.abs + slack * Tol::F32.rel * (1.0 + self.magnitude + self.lse.abs())
    }
}

/// SPEC math in f64 over a list of positions per (row, head): `s_p = scale *
/// q . k[p]`, `o = sum_p softmax(s)_p v[p]`, `lse = ln sum_p exp s_p`; no
/// position: `o = 0`, `lse = -inf`. Indexed `[b * Hq + h]`.
pub fn oracle<T: Element>(
    q: &Tensor<T, 3>,
    k: &Tensor<T, 4>,
    v: &Tensor<T, 4>,
    scale: Option<f32>,
    positions: impl Fn(usize, usize) -> Vec<usize>,
) -> Vec<Want> {
    let [batch, hq, d] = q.shape;
    let group = hq / k.shape[2];
    let scale = scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let mut out = Vec::new();
    for b in 0..batch {
        for h in 0..hq {
            let kvh = h / group;
            let ps = positions(b, h);
            let (mut logits, mut magnitude, mut v_max) = (Vec::new(), 0f64, 0f64);
            for &p in &ps {
                let (mut s, mut m) = (0.0, 0.0);
                for j in 0..d {
                    let t = to_f64(q.get([b, h, j])) * to_f64(k.get([b, p, kvh, j]));
                    s += t;
                    m += t.abs();
                    v_max = v_max.max(to_f64(v.get([b, p, kvh, j])).abs());
                }
                logits.push(scale * s);
                magnitude = magnitude.max(scale * m);
            }
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = (0..d)
                .map(|j| {
                    if ps.is_empty() {
                        0.0
                    } else {
                        ps.iter()
                            .zip(&w)
                            .map(|(&p, w)| w * to_f64(v.get([b, p, kvh, j])))
                            .sum::<f64>()
                            / sum
                    }
                })
                .collect();
            let lse = if ps.is_empty() {
                f64::NEG_INFINITY
            } else {
                max + sum.ln()
            };
            out.push(Want {
                o,
                lse,
                v_max,
                magnitude,
            });
        }
    }
    out
}

/// The oracle of gaze_decode: each head over its own attended positions.
pub fn gaze_oracle<T: Element>(inp: &Inputs<T>) -> Vec<Want> {
    oracle(&inp.q, &inp.k, &inp.v, inp.scale, |b, h| {
        attended(&inp.layout, &inp.routes, b, h)
    })
}

/// Output tensors o `[B, Hq, D]` (random strides unless `aligned`) and lse
/// `[B, Hq]`, poisoned.
pub fn outputs<T: TestElem>(
    r: &mut StdRng,
    shape: [usize; 3],
    aligned: bool,
) -> (Tensor<T, 3>, Tensor<f32, 2>) {
    let o_strides = if aligned {
        contiguous_strides(shape)
    } else {
        random_strides(r, shape)
    };
    let lse_shape = [shape[0], shape[1]];
    let lse_strides = if aligned {
        contiguous_strides(lse_shape)
    } else {
        random_strides(r, lse_shape)
    };
    (
        Tensor::filled(shape, o_strides, T::POISON),
        Tensor::filled(lse_shape, lse_strides, f32::POISON),
    )
}

/// Asserts `o` and `lse` match `want` within `slack` times the f32 accumulation
/// tolerance, and that nothing outside the views was written.
pub fn assert_matches<T: TestElem>(
    o: &Tensor<T, 3>,
    lse: &Tensor<f32, 2>,
    want: &[Want],
    slack: f64,
    what: &str,
) {
    assert_matches_tainted(o, lse, want, &[], slack, what);
}

/// [`assert_matches`] where some heads attend a poisoned row (`taint`,
/// indexed `[b * Hq + h]`; empty: none does): such a head's `o` must be
/// non-finite in every element, its `lse` as [`Taint`] says; every other
/// head must match the oracle as in [`assert_matches`].
pub fn assert_matches_tainted<T: TestElem>(
    o: &Tensor<T, 3>,
    lse: &Tensor<f32, 2>,
    want: &[Want],
    taint: &[Taint],
    slack: f64,
    what: &str,
) {
    let hq = o.shape[1];
    let taint_of = |b: usize, h: usize| taint.get(b * hq + h).copied().unwrap_or(Taint::Clean);
    for [b, h, j] in indices(o.shape) {
        let w = &want[b * hq + h];
        let got = to_f64(o.get([b, h, j]));
        if taint_of(b, h) != Taint::Clean {
            assert!(
                !got.is_finite(),
                "{what}: o[{b}, {h}, {j}] = {got}: head {h} attends a poisoned row, its output must not be finite"
            );
            continue;
        }
        let bound = w.bound::<T>(j, slack);
        assert!(
            (got - w.o[j]).abs() <= bound,
            "{what}: o[{b}, {h}, {j}] = {got}, want {} (bound {bound:e}){}",
            w.o[j],
            if taint.is_empty() {
                ""
            } else {
                "; this head attends no poisoned row"
            }
        );
    }
    for [b, h] in indices(lse.shape) {
        let w = &want[b * hq + h];
        let got = lse.get([b, h]) as f64;
        let ok = if taint_of(b, h) == Taint::Key {
            !got.is_finite()
        } else if w.lse.is_infinite() {
            got == w.lse
        } else {
            (got - w.lse).abs() <= w.lse_bound(slack)
        };
        assert!(
            ok,
            "{what}: lse[{b}, {h}] = {got}, want {} ({:?})",
            w.lse,
            taint_of(b, h)
        );
    }
    for off in o.gap_offsets() {
        assert!(
            o.data[off].bits() == T::POISON.bits(),
            "{what}: o storage offset {off} outside the view was written"
        );
    }
    for off in lse.gap_offsets() {
        assert!(
            lse.data[off].to_bits() == f32::POISON.to_bits(),
            "{what}: lse storage offset {off} outside the view was written"
        );
    }
}

// ---------------------------------------------------------------------------
// Rows some heads of a group attend, poisoned
// ---------------------------------------------------------------------------

/// Whether a head attends a poisoned row, and which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taint {
    Clean,
    /// A value row holding +inf, -inf or NaN (the keys are fine: `lse`
    /// stays finite, `o` does not).
    Value,
    /// A key row of NaN (its score is NaN: `o` and `lse` are not finite).
    Key,
}

/// Poisons the value (+inf, -inf or NaN) or, with `keys`, also key (NaN)
/// rows of up to `per_group` positions of each (row, KV head) that some
/// heads of the group attend but not all of them (`attended(b, h)`: the
/// positions head `h` of row `b` attends). Returns each head's [`Taint`],
/// `[b * Hq + h]`. A kernel that lets a row one head attends reach another
/// head of its group (0 x inf in a shared accumulation) gives that head a
/// non-finite output where the oracle's is finite; one that drops a NaN
/// score gives a finite output where the oracle's is NaN.
pub fn poison_shared_rows<T: TestElem>(
    r: &mut StdRng,
    k: &mut Tensor<T, 4>,
    v: &mut Tensor<T, 4>,
    group: usize,
    per_group: usize,
    keys: bool,
    attended: impl Fn(usize, usize) -> Vec<usize>,
) -> Vec<Taint> {
    let [batch, seq, hkv, d] = k.shape;
    let hq = hkv * group;
    let sets: Vec<Vec<bool>> = (0..batch * hq)
        .map(|bh| {
            let mut set = vec![false; seq];
            attended(bh / hq, bh % hq)
                .into_iter()
                .for_each(|p| set[p] = true);
            set
        })
        .collect();
    let mut taint = vec![Taint::Clean; batch * hq];
    for b in 0..batch {
        for kvh in 0..hkv {
            let heads = kvh * group..(kvh + 1) * group;
            let partly: Vec<usize> = (0..seq)
                .filter(|&p| {
                    let n = heads.clone().filter(|&h| sets[b * hq + h][p]).count();
                    n > 0 && n < group
                })
                .collect();
            let n = per_group.min(partly.len());
            for i in rand::seq::index::sample(r, partly.len(), n) {
                let p = partly[i];
                let key = keys && r.random_bool(0.3);
                let bad = if key {
                    f32::NAN
                } else {
                    [f32::INFINITY, f32::NEG_INFINITY, f32::NAN][r.random_range(0..3)]
                };
                for j in 0..d {
                    let t = if key { &mut *k } else { &mut *v };
                    let o = t.offset([b, p, kvh, j]);
                    t.data[o] = T::from_f32(bad);
                }
                for h in heads.clone().filter(|&h| sets[b * hq + h][p]) {
                    let t = &mut taint[b * hq + h];
                    if key {
                        *t = Taint::Key;
                    } else if *t == Taint::Clean {
                        *t = Taint::Value;
                    }
                }
            }
        }
    }
    taint
}

/// Issue 11's minimal case of a value row one head of a KV group attends: 1
/// row, 2 query heads on 1 KV head, D 8, a cache of 4; visible {0}, region
/// 0 = {1}, region 1 = {2}, position 3 unused (NaN); head 0 routes region 0,
/// head 1 region 1; `V[1]` all +inf. Head 1's output must be finite, the
/// attention over {0, 2}; head 0's is +inf.
pub fn inf_value_case<T: TestElem>() -> Inputs<T> {
    let mut row = GazeRow::new();
    row.push_visible(0..1);
    row.regions = vec![vec![1], vec![2]];
    let layout = GazeLayout::new(4, &[row]).expect("layout");
    let routes = Routes::from_ids(&layout, 1, 2, 1, &[0, 1]).expect("routes");
    let d = 8;
    let mut r = rng(11);
    let q = random_tensor(&mut r, [1, 2, d], contiguous_strides([1, 2, d]), -1.0, 1.0);
    let kv = |r: &mut StdRng, pos_inf: bool| {
        Tensor::from_fn(
            [1, 4, 1, d],
            contiguous_strides([1, 4, 1, d]),
            T::POISON,
            |[_, p, _, _]| match p {
                3 => T::POISON,
                1 if pos_inf => T::from_f32(f32::INFINITY),
                _ => T::from_f32(r.random_range(-1.0f32..1.0)),
            },
        )
    };
    let k = kv(&mut r, false);
    let v = kv(&mut r, true);
    Inputs {
        layout,
        routes,
        q,
        k,
        v,
        scale: None,
    }
}

/// Rows with no unused position: text, then one image of `h x w` in 6 x 6
/// regions (plus context tokens), then text; with every region routed for
/// every head, gaze_decode is plain softmax attention over `0..end`.
pub fn gapless_rows(r: &mut StdRng, batch: usize) -> (Vec<GazeRow>, usize) {
    let mut seq = 0;
    let rows = (0..batch)
        .map(|_| {
            let mut row = GazeRow::new();
            let (pre, h, w, post) = (
                r.random_range(0..9),
                r.random_range(1..20),
                r.random_range(1..20),
                r.random_range(0..9),
            );
            row.push_visible(0..pre);
            row.push_units(&[pre], h, w, RegionShape::default())
                .expect("grid");
            row.push_visible(pre + h * w..pre + h * w + 4 + post);
            seq = seq.max(pre + h * w + 4 + post);
            row
        })
        .collect();
    (rows, seq)
}

/// Routes `[B, 1, Hq, max_regions]` naming every region of each row.
pub fn all_routes(layout: &GazeLayout, q_heads: usize) -> Routes {
    let k = layout.max_regions().max(1);
    let mut ids = Vec::new();
    for b in 0..layout.batch() {
        for _ in 0..q_heads {
            let mut list: Vec<i32> = (0..layout.regions(b) as i32).collect();
            list.resize(k, -1);
            ids.extend(list);
        }
    }
    Routes::from_ids(layout, 1, q_heads, k, &ids).expect("routes")
}

/// Logits of `1000 b` plus small integers (issue 11, fault 4: 1e3 to 1e6
/// for b = 1 to 1,000), exact in every element type and in f32: two rows of
/// 1,500 and 298 visible keys, no region (long enough for several splits),
/// GQA 3 on 2 KV heads, D 16, scale 1; q rows `[1000, c_h, 0, ...]`, key
/// rows `[b, e_p, 0, ...]` with `c_h` in 1..=3 and `e_p` in -6..=6, values
/// uniform in [-1, 1).
pub fn large_logit_case<T: TestElem>(b: f32) -> Inputs<T> {
    let mut rows = vec![GazeRow::new(), GazeRow::new()];
    rows[0].push_visible(0..1500);
    rows[1].push_visible(2..300);
    let layout = GazeLayout::new(1500, &rows).expect("layout");
    let (hkv, g, d) = (2, 3, 16);
    let hq = hkv * g;
    let routes = Routes::from_ids(&layout, 1, hq, 1, &vec![-1; 2 * hq]).expect("routes");
    let mut r = rng(b as u64);
    let q = Tensor::from_fn(
        [2, hq, d],
        contiguous_strides([2, hq, d]),
        T::POISON,
        |[_, h, j]| {
            T::from_f32(match j {
                0 => 1000.0,
                1 => (1 + h % 3) as f32,
                _ => 0.0,
            })
        },
    );
    let kv_shape = [2, 1500, hkv, d];
    let k = Tensor::from_fn(
        kv_shape,
        contiguous_strides(kv_shape),
        T::POISON,
        |[_, _, _, j]| {
            T::from_f32(match j {
                0 => b,
                1 => r.random_range(-6..=6) as f32,
                _ => 0.0,
            })
        },
    );
    let v = random_tensor(&mut r, kv_shape, contiguous_strides(kv_shape), -1.0, 1.0);
    Inputs {
        layout,
        routes,
        q,
        k,
        v,
        scale: Some(1.0),
    }
}

/// Outputs that cancel between large values of similar weight, where the
/// tensor cores' weights must keep more bits than one rounding to `T` gives
/// (the mma path splits P into a high and a low part, each rounded to `T`):
/// 1 row, 8 query heads on 1 KV head (the mma path for bf16/f16), D 16,
/// scale 1, visible {0, 1}, no region. Head h: q = `[c_h, 0, ...]` with
/// `c_h = 0.1 (h + 1)`; k0 = `[1, 0, ...]`, k1 = 0; so its weights are
/// `1 : e^-c_h`. Column d < 8 of v0 is 1000 and of v1 `-1000 e^c_d` (rounded
/// to `T`): head d's output column d cancels to about 1 against terms of
/// 1000 to 2,226. One rounding of `e^-c` to bf16 (f16) errs by up to
/// 2^-9 (2^-11) of it, 0.17 to 2.3 (0.004 to 0.17) in those columns; the
/// hi/lo split, by about 0.01.
pub fn cancellation_case<T: TestElem>() -> Inputs<T> {
    let mut row = GazeRow::new();
    row.push_visible(0..2);
    let layout = GazeLayout::new(2, &[row]).expect("layout");
    let (hq, d) = (8, 16);
    let routes = Routes::from_ids(&layout, 1, hq, 1, &vec![-1; hq]).expect("routes");
    let c = |h: usize| 0.1 * (h + 1) as f32;
    let q = Tensor::from_fn(
        [1, hq, d],
        contiguous_strides([1, hq, d]),
        T::POISON,
        |[_, h, j]| T::from_f32(if j == 0 { c(h) } else { 0.0 }),
    );
    let kv_shape = [1, 2, 1, d];
    let k = Tensor::from_fn(
        kv_shape,
        contiguous_strides(kv_shape),
        T::POISON,
        |[_, p, _, j]| T::from_f32(if p == 0 && j == 0 { 1.0 } else { 0.0 }),
    );
    let v = Tensor::from_fn(
        kv_shape,
        contiguous_strides(kv_shape),
        T::POISON,
        |[_, p, _, j]| {
            T::from_f32(match (p, j) {
                (_, 8..) => 0.0,
                (0, _) => 1000.0,
                (_, j) => -1000.0 * c(j).exp(),
            })
        },
    );
    Inputs {
        layout,
        routes,
        q,
        k,
        v,
        scale: Some(1.0),
    }
}

/// Asserts `o` and `lse` of [`large_logit_case`] match the oracle with
/// bounds that do not grow with the logits: the storage type's tolerance
/// plus 1e-5 for `o` (a weighted mean of values in [-1, 1)), a few f32 ulps
/// of `lse` (itself about 1e6).
pub fn assert_large_logits<T: TestElem>(
    o: &Tensor<T, 3>,
    lse: &Tensor<f32, 2>,
    want: &[Want],
    what: &str,
) {
    let hq = o.shape[1];
    let storage = Tol::for_elem::<T>();
    for [b, h, j] in indices(o.shape) {
        let (got, w) = (to_f64(o.get([b, h, j])), want[b * hq + h].o[j]);
        let bound = storage.abs + storage.rel * w.abs() + 1e-5;
        assert!(
            (got - w).abs() <= bound,
            "{what}: o[{b}, {h}, {j}] = {got}, want {w}"
        );
    }
    for [b, h] in indices(lse.shape) {
        let (got, w) = (lse.get([b, h]) as f64, want[b * hq + h].lse);
        assert!(
            (got - w).abs() <= 3e-7 * w.abs() + 1e-5,
            "{what}: lse[{b}, {h}] = {got}, want {w}"
        );
    }
}
