//! cross_attention's random cases and f64 oracle, shared by its CPU tests
//! (tests/tests/cross_attention.rs) and GPU tests
//! (tests/tests/gpu/cross_attention.rs).
//!
//! The oracle is the framework composition written out in f64 loops: the KV
//! heads repeated to the query heads (`repeat_kv`), `S = scale * Q K^T`
//! over the valid keys, a row softmax, `O = P V`. Keys and values past a
//! row's `kv_len` are NaN, so an implementation that reads one fails.

use foveal::{Element, SeqLens};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::{
    contiguous_strides, indices, random_strides, random_tensor, rng, to_f64, KvOrder, Poison,
    Tensor, TestElem, Tol,
};

#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub seed: u64,
    pub batch: usize,
    /// Query slots `Nq` and key slots `Nk` per row.
    pub queries: usize,
    pub keys: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub scale: Option<f32>,
    /// Memory orders the CUDA kernels take (every stride but the head dim's a
    /// multiple of 16 bytes); otherwise any order with gaps.
    pub aligned: bool,
    /// Every row full (no ragged lengths).
    pub full: bool,
}

/// A case's inputs: lengths, q `[B, Nq, Hq, D]`, k and v `[B, Nk, Hkv, D]`
/// (uniform in [-1, 1); NaN past each row's kv_len and q_len).
#[derive(Debug, Clone)]
pub struct Inputs<T> {
    pub lens: SeqLens,
    pub q: Tensor<T, 4>,
    pub k: Tensor<T, 4>,
    pub v: Tensor<T, 4>,
    pub scale: Option<f32>,
}

/// A random length in `0..=cap`: the full capacity half of the time, 0 now
/// and then.
fn random_len(r: &mut StdRng, cap: usize) -> usize {
    match r.random_range(0..10) {
        0 => 0,
        1..=5 => cap,
        _ => r.random_range(0..=cap),
    }
}

impl<T: TestElem> Inputs<T> {
    pub fn new(c: &Case) -> Self {
        let mut r = rng(c.seed);
        let (q_lens, kv_lens): (Vec<usize>, Vec<usize>) = (0..c.batch)
            .map(|_| {
                if c.full {
                    (c.queries, c.keys)
                } else {
                    (random_len(&mut r, c.queries), random_len(&mut r, c.keys))
                }
            })
            .unzip();
        let lens = SeqLens::new(&q_lens, &kv_lens).expect("lengths");
        Self::with(&mut r, c, lens)
    }

    /// Random tensors for given lengths.
    pub fn with(r: &mut StdRng, c: &Case, lens: SeqLens) -> Self {
        let hq = c.kv_heads * c.group;
        let q_shape = [c.batch, c.queries, hq, c.head_dim];
        let kv_shape = [c.batch, c.keys, c.kv_heads, c.head_dim];
        let q_strides = if c.aligned {
            aligned_strides::<T, 4>(r, q_shape)
        } else {
            random_strides(r, q_shape)
        };
        let order = if c.aligned {
            KvOrder::pick_aligned(r)
        } else {
            KvOrder::pick(r)
        };
        let (ks, vs) = (order.strides(r, kv_shape), order.strides(r, kv_shape));
        let mut q: Tensor<T, 4> = random_tensor(r, q_shape, q_strides, -1.0, 1.0);
        let mut k: Tensor<T, 4> = random_tensor(r, kv_shape, ks, -1.0, 1.0);
        let mut v: Tensor<T, 4> = random_tensor(r, kv_shape, vs, -1.0, 1.0);
        for [b, j, h, e] in indices(kv_shape) {
            if j >= lens.kv()[b] {
                let (ok, ov) = (k.offset([b, j, h, e]), v.offset([b, j, h, e]));
                k.data[ok] = T::POISON;
                v.data[ov] = T::POISON;
            }
        }
        for idx @ [b, i, _, _] in indices(q_shape) {
            if i >= lens.q()[b] {
                let o = q.offset(idx);
                q.data[o] = T::POISON;
            }
        }
        Inputs {
            lens,
            q,
            k,
            v,
            scale: c.scale,
        }
    }
}

/// Strides of `shape` in a random memory order (the last dimension
/// contiguous) whose every other stride is a multiple of 16 bytes, with gaps
/// of whole 16-byte vectors now and then, as the CUDA kernels' vector loads
/// want them.
pub fn aligned_strides<T, const N: usize>(r: &mut StdRng, shape: [usize; N]) -> [usize; N] {
    let vec = 16 / std::mem::size_of::<T>();
    let mut order: Vec<usize> = (0..N - 1).collect();
    order.shuffle(r);
    let mut strides = [1usize; N];
    let mut extent = shape[N - 1].div_ceil(vec) * vec + vec * r.random_range(0..2);
    for &dim in order.iter().rev() {
        strides[dim] = extent;
        extent = extent * shape[dim].max(1) + vec * r.random_range(0..2);
    }
    strides
}

// ---------------------------------------------------------------------------
// The oracle
// ---------------------------------------------------------------------------

/// What the oracle says about one (row, query, query head).
#[derive(Debug, Clone)]
pub struct Want {
    pub o: Vec<f64>,
    pub lse: f64,
    /// The largest |v| attended: the scale of the output's error.
    pub v_max: f64,
    /// `scale * max_j sum_d |q_d k_d|`: the size of the logits' terms.
    pub magnitude: f64,
}

impl Want {
    /// The bound on `|got - want[d]|` for a result stored as `T` after f32
    /// accumulation (`slack` times the accumulation error allowed), plus
    /// `p_round` times the largest |v| (the rounding of the probabilities
    /// to `T` before the tensor-core product P V).
    pub fn bound<T: Element>(&self, d: usize, slack: f64, p_round: f64) -> f64 {
        let storage = Tol::for_elem::<T>();
        storage.abs
            + storage.rel * self.o[d].abs()
            + (slack * Tol::F32.rel * (1.0 + self.magnitude) + p_round) * self.v_max
    }

    pub fn lse_bound(&self, slack: f64) -> f64 {
        Tol::F32.abs + slack * Tol::F32.rel * (1.0 + self.magnitude + self.lse.abs())
    }
}

/// SPEC math in f64, as the framework composes it: `repeat_kv`, then per row
/// and query head `S = scale * Q K^T` (`[q_len, kv_len]`), `P = softmax(S)`
/// row by row, `O = P V`, `lse = ln sum exp S`. A query that attends nothing
/// (past q_len, or no key) has `o = 0`, `lse = -inf`. Indexed
/// `[(b * Nq + i) * Hq + h]`.
pub fn oracle<T: Element>(inp: &Inputs<T>) -> Vec<Want> {
    let [batch, nq_cap, hq, d] = inp.q.shape;
    let hkv = inp.k.shape[2];
    let group = hq / hkv;
    let scale = inp.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let empty = || Want {
        o: vec![0.0; d],
        lse: f64::NEG_INFINITY,
        v_max: 0.0,
        magnitude: 0.0,
    };
    let mut out = vec![empty(); batch * nq_cap * hq];
    for b in 0..batch {
        let (nq, nk) = (inp.lens.q()[b], inp.lens.kv()[b]);
        // repeat_kv: K_h, V_h [nk, d] for every query head
        let rep = |t: &Tensor<T, 4>| -> Vec<Vec<Vec<f64>>> {
            (0..hq)
                .map(|h| {
                    (0..nk)
                        .map(|j| {
                            (0..d)
                                .map(|e| to_f64(t.get([b, j, h / group, e])))
                                .collect()
                        })
                        .collect()
                })
                .collect()
        };
        let (kr, vr) = (rep(&inp.k), rep(&inp.v));
        for h in 0..hq {
            let v_max = vr[h].iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
            for i in 0..nq {
                if nk == 0 {
                    continue;
                }
                let qi: Vec<f64> = (0..d).map(|e| to_f64(inp.q.get([b, i, h, e]))).collect();
                // S = scale * Q K^T (one row)
                let s: Vec<f64> = kr[h]
                    .iter()
                    .map(|kj| scale * qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f64>())
                    .collect();
                let magnitude = kr[h]
                    .iter()
                    .map(|kj| scale * qi.iter().zip(kj).map(|(a, c)| (a * c).abs()).sum::<f64>())
                    .fold(0f64, f64::max);
                // P = softmax(S)
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                // O = P V
                let o = (0..d)
                    .map(|e| p.iter().zip(&vr[h]).map(|(pj, vj)| pj * vj[e]).sum())
                    .collect();
                out[(b * nq_cap + i) * hq + h] = Want {
                    o,
                    lse: m + z.ln(),
                    v_max,
                    magnitude,
                };
            }
        }
    }
    out
}

/// Output tensors o `[B, Nq, Hq, D]` and lse `[B, Hq, Nq]`, poisoned; in
/// random memory orders with gaps unless `aligned` (then o's strides are
/// multiples of 16 bytes).
pub fn outputs<T: TestElem>(
    r: &mut StdRng,
    q_shape: [usize; 4],
    aligned: bool,
) -> (Tensor<T, 4>, Tensor<f32, 3>) {
    let [b, nq, hq, _] = q_shape;
    let lse_shape = [b, hq, nq];
    let (os, ls) = if aligned {
        (
            aligned_strides::<T, 4>(r, q_shape),
            contiguous_strides(lse_shape),
        )
    } else {
        (random_strides(r, q_shape), random_strides(r, lse_shape))
    };
    (
        Tensor::filled(q_shape, os, T::POISON),
        Tensor::filled(lse_shape, ls, f32::POISON),
    )
}

/// Asserts `o` and `lse` match `want` (see [`Want::bound`]), that `o = +0`
/// and `lse = -inf` exactly where nothing is attended, and that nothing
/// outside the views was written.
pub fn assert_matches<T: TestElem>(
    o: &Tensor<T, 4>,
    lse: &Tensor<f32, 3>,
    want: &[Want],
    slack: f64,
    p_round: f64,
    what: &str,
) {
    let [_, nq, hq, _] = o.shape;
    for [b, i, h, e] in indices(o.shape) {
        let w = &want[(b * nq + i) * hq + h];
        let got = to_f64(o.get([b, i, h, e]));
        if w.lse == f64::NEG_INFINITY {
            assert!(
                o.get([b, i, h, e]).bits() == T::from_f32(0.0).bits(),
                "{what}: o[{b}, {i}, {h}, {e}] = {got}, want +0 (nothing attended)"
            );
            continue;
        }
        let bound = w.bound::<T>(e, slack, p_round);
        assert!(
            (got - w.o[e]).abs() <= bound,
            "{what}: o[{b}, {i}, {h}, {e}] = {got}, want {} (bound {bound:e})",
            w.o[e]
        );
    }
    for [b, h, i] in indices(lse.shape) {
        let w = &want[(b * nq + i) * hq + h];
        let got = lse.get([b, h, i]) as f64;
        let ok = if w.lse.is_infinite() {
            got == w.lse
        } else {
            (got - w.lse).abs() <= w.lse_bound(slack)
        };
        assert!(ok, "{what}: lse[{b}, {h}, {i}] = {got}, want {}", w.lse);
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

/// The unit roundoff of `T` (the probabilities' rounding before the
/// tensor-core P V product): 2^-8 for bf16, 2^-11 for f16, 0 for f32 (whose
/// path has no such rounding).
pub fn p_round<T: Element>() -> f64 {
    match T::DTYPE {
        foveal::DType::BF16 => 2f64.powi(-8),
        foveal::DType::F16 => 2f64.powi(-11),
        foveal::DType::F32 => 0.0,
    }
}

// ---------------------------------------------------------------------------
// Large logits (issue 11, fault 4's kind in the attention tiles)
// ---------------------------------------------------------------------------

/// Inputs whose logits are `a b + c_h e_j`, exact in every element type and
/// in f32: q rows `[a, c_h, 0, ...]` (a = 1000, c_h = 1 + h % 3), key rows
/// `[b, e_j, 0, ...]` (e_j in -6..=6), scale 1, so `logit = a b` (1e3 to
/// 1e6) sets the size and the differences between logits are small
/// integers. Value rows start with `e_j` and go on with small integers, so
/// that the output follows the weights of the distinct logits. Two rows
/// (300 keys and 41 of them, the rest NaN), 2 KV heads of 3 query heads,
/// head dim 16; `queries` 1 gives the decode tile (keys split across
/// blocks on the GPU), 50 the prefill tiles.
pub fn large_logit_inputs<T: TestElem>(logit: f64, queries: usize) -> Inputs<T> {
    let (batch, keys, hkv, g, d) = (2, 300, 2, 3, 16);
    let hq = hkv * g;
    let a = 1000.0;
    let b = (logit / a) as f32;
    let mut r = rng(logit as u64 + queries as u64);
    let lens = SeqLens::new(&[queries, queries], &[keys, 41]).expect("lengths");
    let e: Vec<f32> = (0..batch * keys * hkv)
        .map(|_| r.random_range(-6..=6) as f32)
        .collect();
    let w: Vec<f32> = (0..batch * keys * hkv * d)
        .map(|_| r.random_range(-8..=8) as f32)
        .collect();
    let q_shape = [batch, queries, hq, d];
    let kv_shape = [batch, keys, hkv, d];
    let q = Tensor::from_fn(
        q_shape,
        contiguous_strides(q_shape),
        T::POISON,
        |[_, _, h, x]| {
            T::from_f32(match x {
                0 => a as f32,
                1 => (1 + h % 3) as f32,
                _ => 0.0,
            })
        },
    );
    let past = |bi: usize, j: usize| j >= lens.kv()[bi];
    let k = Tensor::from_fn(
        kv_shape,
        contiguous_strides(kv_shape),
        T::POISON,
        |[bi, j, kvh, x]| {
            if past(bi, j) {
                return T::POISON;
            }
            T::from_f32(match x {
                0 => b,
                1 => e[(bi * keys + j) * hkv + kvh],
                _ => 0.0,
            })
        },
    );
    let v = Tensor::from_fn(
        kv_shape,
        contiguous_strides(kv_shape),
        T::POISON,
        |[bi, j, kvh, x]| {
            if past(bi, j) {
                return T::POISON;
            }
            let row = (bi * keys + j) * hkv + kvh;
            T::from_f32(if x == 0 { e[row] } else { w[row * d + x] })
        },
    );
    Inputs {
        lens,
        q,
        k,
        v,
        scale: Some(1.0),
    }
}

/// The oracle of [`large_logit_inputs`], with each query's `magnitude` the
/// spread of its logits (largest minus smallest) instead of their size: the
/// softmax sees only the differences `s - m`, exact here, so a kernel that
/// keeps their precision is within the usual bound of them, whatever the
/// size of the logits. One that scales the logits by log2 e before
/// subtracting rounds them at their size (an ulp of 0.125 at 1.4e6, weights
/// off by up to 4%) and fails it.
pub fn large_logit_oracle<T: Element>(inp: &Inputs<T>) -> Vec<Want> {
    let mut want = oracle(inp);
    let [batch, nq, hq, d] = inp.q.shape;
    let group = hq / inp.k.shape[2];
    for b in 0..batch {
        for i in 0..inp.lens.q()[b] {
            for h in 0..hq {
                let s: Vec<f64> = (0..inp.lens.kv()[b])
                    .map(|j| {
                        (0..d)
                            .map(|x| {
                                to_f64(inp.q.get([b, i, h, x]))
                                    * to_f64(inp.k.get([b, j, h / group, x]))
                            })
                            .sum()
                    })
                    .collect();
                let hi = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lo = s.iter().copied().fold(f64::INFINITY, f64::min);
                want[(b * nq + i) * hq + h].magnitude = hi - lo;
            }
        }
    }
    want
}
