//! glance_fusion's test cases and f64 oracle, shared by its CPU tests
//! (tests/glance_fusion.rs) and GPU tests (tests/gpu/glance_fusion.rs).
//!
//! The oracle evaluates the SPEC's literal formula in f64: per token and
//! layer the mean over the instruction tokens of the dot products (S x M dot
//! products a token, not the mean-vector shortcut the op takes), the softmax
//! over the layers, the weighted sum. Beside each value it gives a bound on
//! the error of an f32 evaluation in any summation order (sequential on the
//! CPU, trees on the GPU), from the magnitudes of the summed terms:
//!
//! - the mean instruction vector: `(M + 17) u mean_m |e_m|` per channel (the
//!   GPU adds 16 interleaved partial sums);
//! - each score: `(M + dt + 50) u scale sum_c |v_c| mean_m |e_mc|`, plus `3 u |g|`;
//! - each weight, relative: twice the largest score error (the softmax's
//!   derivative) plus the f32 evaluation of `exp((g - max) - ln(sum))`;
//! - each output channel: the weights' errors times `|v|`, the weighted sum's
//!   own rounding, then the rounding to the element type.
//!
//! Every bound is doubled for safety; it stays orders of magnitude below
//! what a wrong layer, a missing term or a wrong scale would cost.

// The oracle indexes its tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use std::ops::RangeInclusive;

use foveal::glance_fusion::Lengths;
use foveal::DType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::{random_elem, to_f64, Tensor, TestElem};

/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// The sizes and lengths of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub layers: usize,
    pub batch: usize,
    pub tokens: usize,
    pub instr: usize,
    pub dim: usize,
    pub n_len: Vec<usize>,
    pub m_len: Vec<usize>,
}

impl Case {
    /// Ragged lengths drawn for each row: `n_len` in `0..=tokens` (full in
    /// about a third of the rows), `m_len` in `1..=instr`.
    pub fn random(
        r: &mut StdRng,
        layers: usize,
        batch: usize,
        tokens: usize,
        instr: usize,
        dim: usize,
    ) -> Case {
        assert!(instr >= 1, "every row needs an instruction token");
        let n_len = (0..batch)
            .map(|_| {
                if r.random_bool(0.35) {
                    tokens
                } else {
                    r.random_range(0..=tokens)
                }
            })
            .collect();
        let m_len = (0..batch).map(|_| r.random_range(1..=instr)).collect();
        Case {
            layers,
            batch,
            tokens,
            instr,
            dim,
            n_len,
            m_len,
        }
    }

    /// A case of sizes drawn from `[layers, batch, tokens, instr, dim]`
    /// ranges, its lengths as in [`Case::random`].
    pub fn draw(r: &mut StdRng, ranges: [RangeInclusive<usize>; 5]) -> Case {
        let [l, b, n, m, d] = ranges.map(|range| r.random_range(range));
        Case::random(r, l, b, n, m, d)
    }

    pub fn lengths(&self) -> Lengths {
        Lengths::new(&self.n_len, &self.m_len).expect("one length of each per row")
    }

    /// `[S, B, N, dt]`.
    pub fn vq_shape(&self) -> [usize; 4] {
        [self.layers, self.batch, self.tokens, self.dim]
    }

    /// `[S, B, M, dt]`.
    pub fn e_shape(&self) -> [usize; 4] {
        [self.layers, self.batch, self.instr, self.dim]
    }

    /// `[B, N, dt]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.batch, self.tokens, self.dim]
    }

    /// `[B, N, S]`.
    pub fn weights_shape(&self) -> [usize; 3] {
        [self.batch, self.tokens, self.layers]
    }
}

/// Strides of `shape` with its last dimension contiguous, the others in a
/// random order, each extent followed by a random gap; with `align`, the
/// row pitch and every gap are multiples of `align` elements (so every
/// stride is: the CUDA path's 16-byte accesses), without, any gap.
pub fn strides<const N: usize>(
    r: &mut StdRng,
    shape: [usize; N],
    align: Option<usize>,
) -> [usize; N] {
    let unit = align.unwrap_or(1);
    let mut order: Vec<usize> = (0..N - 1).collect();
    order.shuffle(r);
    let mut strides = [0usize; N];
    strides[N - 1] = 1;
    let mut extent = shape[N - 1].max(1).div_ceil(unit) * unit;
    for &dim in order.iter().rev() {
        extent += unit * r.random_range(0..=2);
        strides[dim] = extent;
        extent *= shape[dim].max(1);
    }
    strides
}

/// The inputs of a case: `vq` uniform in `[-spread, spread)`; `e` a random
/// per-layer centre (uniform in [-2, 2)) plus noise in [-1, 1), so that the
/// mean instruction vectors do not average out and the weights differ
/// between layers (`spread` 3 makes some tokens pick one layer).
pub fn inputs<T: TestElem>(
    r: &mut StdRng,
    case: &Case,
    align: Option<usize>,
    spread: f32,
) -> (Tensor<T, 4>, Tensor<T, 4>) {
    let vs = strides(r, case.vq_shape(), align);
    let vq = Tensor::from_fn(case.vq_shape(), vs, T::POISON, |_| {
        random_elem(r, -spread, spread)
    });
    let centre: Vec<f32> = (0..case.layers * case.batch * case.dim)
        .map(|_| r.random_range(-2.0..2.0))
        .collect();
    let es = strides(r, case.e_shape(), align);
    let e = Tensor::from_fn(case.e_shape(), es, T::POISON, |[s, b, _, c]| {
        T::from_f32(centre[(s * case.batch + b) * case.dim + c] + r.random_range(-1.0..1.0))
    });
    (vq, e)
}

/// The oracle's values with their error bounds, `[B, N, dt]` and `[B, N, S]`
/// row-major; rows past a row's `n_len` are 0 with bound 0.
#[derive(Debug, Clone)]
pub struct Expected {
    pub dims: [usize; 4],
    pub out: Vec<f64>,
    pub out_err: Vec<f64>,
    pub weights: Vec<f64>,
    pub weights_err: Vec<f64>,
}

/// The literal formula in f64, with the bounds of the module docs. Finite
/// inputs only.
pub fn oracle<T: TestElem>(vq: &Tensor<T, 4>, e: &Tensor<T, 4>, lengths: &Lengths) -> Expected {
    let [layers, batch, tokens, dim] = vq.shape;
    let scale = 1.0 / (dim as f64).sqrt();
    let mut x = Expected {
        dims: [layers, batch, tokens, dim],
        out: vec![0.0; batch * tokens * dim],
        out_err: vec![0.0; batch * tokens * dim],
        weights: vec![0.0; batch * tokens * layers],
        weights_err: vec![0.0; batch * tokens * layers],
    };
    for b in 0..batch {
        let (n_len, m_len) = (lengths.n_len()[b], lengths.m_len()[b]);
        let e_abs: Vec<Vec<f64>> = (0..layers)
            .map(|s| {
                (0..dim)
                    .map(|c| {
                        (0..m_len)
                            .map(|m| to_f64(e.get([s, b, m, c])).abs())
                            .sum::<f64>()
                            / m_len as f64
                    })
                    .collect()
            })
            .collect();
        for n in 0..n_len {
            let v: Vec<Vec<f64>> = (0..layers)
                .map(|s| (0..dim).map(|c| to_f64(vq.get([s, b, n, c]))).collect())
                .collect();
            let mut g = vec![0.0; layers];
            let mut dg = vec![0.0; layers];
            for s in 0..layers {
                let dots: f64 = (0..m_len)
                    .map(|m| {
                        (0..dim)
                            .map(|c| v[s][c] * to_f64(e.get([s, b, m, c])))
                            .sum::<f64>()
                    })
                    .sum();
                g[s] = dots / m_len as f64 * scale;
                let mag: f64 = (0..dim).map(|c| v[s][c].abs() * e_abs[s][c]).sum();
                dg[s] = 2.0 * ((m_len + dim + 50) as f64 * U * scale * mag + 3.0 * U * g[s].abs());
            }
            let max = g.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = g.iter().map(|x| (x - max).exp()).sum();
            let max_dg = dg.iter().copied().fold(0.0, f64::max);
            let row = b * tokens + n;
            let mut w_err = vec![0.0; layers];
            for s in 0..layers {
                let w = (g[s] - max).exp() / sum;
                let rel = 2.0 * max_dg
                    + U * (2.0 * (g[s] - max).abs() + 3.0 * sum.ln().abs() + layers as f64 + 6.0);
                x.weights[row * layers + s] = w;
                w_err[s] = 2.0 * w * rel;
                x.weights_err[row * layers + s] = w_err[s];
            }
            for c in 0..dim {
                let (mut o, mut mag, mut err) = (0.0, 0.0, 0.0);
                for s in 0..layers {
                    let w = x.weights[row * layers + s];
                    o += w * v[s][c];
                    mag += w * v[s][c].abs();
                    err += w_err[s] * v[s][c].abs();
                }
                x.out[row * dim + c] = o;
                x.out_err[row * dim + c] = err + 2.0 * (layers + 2) as f64 * U * mag;
            }
        }
    }
    x
}

/// Unit roundoff of an element type, and half its smallest subnormal step.
fn rounding(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (U, 0.0),
        DType::F16 => (1.0 / 2048.0, 2f64.powi(-25)),
        DType::BF16 => (1.0 / 256.0, 0.0),
    }
}

/// The bound on `|got - want|` of an output element: the oracle's bound
/// (`err`), then the rounding of the element type.
pub fn out_bound<T: TestElem>(want: f64, err: f64) -> f64 {
    let (u, sub) = rounding(T::DTYPE);
    err + u * (want.abs() + err) + sub + 1e-30
}

/// Asserts `out [B, N, dt]` and the weights `[B, N, S]` (when given) within
/// `factor` times the oracle's bounds of `want` (then the rounding of the
/// element type), rows past `n_len` exactly 0.
pub fn assert_matches<T: TestElem>(
    out: &Tensor<T, 3>,
    weights: Option<&Tensor<f32, 3>>,
    want: &Expected,
    factor: f64,
    what: &str,
) {
    let [layers, batch, tokens, dim] = want.dims;
    for b in 0..batch {
        for n in 0..tokens {
            let row = b * tokens + n;
            for c in 0..dim {
                let got = to_f64(out.get([b, n, c]));
                let (w, err) = (
                    want.out[row * dim + c],
                    factor * want.out_err[row * dim + c],
                );
                let bound = out_bound::<T>(w, err);
                assert!(
                    (got - w).abs() <= bound,
                    "{what}: out[{b}, {n}, {c}] = {got}, want {w} (|diff| {:e}, bound {bound:e})",
                    (got - w).abs()
                );
            }
            if let Some(wt) = weights {
                for s in 0..layers {
                    let got = wt.get([b, n, s]) as f64;
                    let (w, err) = (
                        want.weights[row * layers + s],
                        factor * want.weights_err[row * layers + s] + 1e-30,
                    );
                    assert!(
                        (got - w).abs() <= err,
                        "{what}: weights[{b}, {n}, {s}] = {got}, want {w} (bound {err:e})"
                    );
                }
            }
        }
    }
}

/// The CPU reference's outputs as the expectation of another backend: its
/// values, with twice the oracle's bounds (each backend is within them of
/// the exact result) plus the reference's own rounding to the element type.
pub fn around_reference<T: TestElem>(
    oracle: &Expected,
    out: &Tensor<T, 3>,
    weights: &Tensor<f32, 3>,
) -> Expected {
    let [layers, batch, tokens, dim] = oracle.dims;
    let mut x = oracle.clone();
    for b in 0..batch {
        for n in 0..tokens {
            let row = b * tokens + n;
            for c in 0..dim {
                let i = row * dim + c;
                let v = to_f64(out.get([b, n, c]));
                x.out[i] = v;
                x.out_err[i] = out_bound::<T>(v, 2.0 * oracle.out_err[i]);
            }
            for s in 0..layers {
                let i = row * layers + s;
                x.weights[i] = weights.get([b, n, s]) as f64;
                x.weights_err[i] = 2.0 * oracle.weights_err[i];
            }
        }
    }
    x
}
