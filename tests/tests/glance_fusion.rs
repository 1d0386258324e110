//! glance_fusion: the CPU reference against an f64 oracle of the SPEC's
//! literal formula ("Glance2Gaze / glance_fusion"; the oracle and its error
//! bounds are in foveal_tests::glance_fusion), against the same formula in
//! candle ops, its exact cases (one layer, equal layers), its non-finite
//! cases, and its argument checks.

use candle_core::{Device, Tensor as Candle};
use foveal::glance_fusion::cpu::glance_fusion;
use foveal::glance_fusion::{layer_softmax, Lengths};
use foveal::{Error, Layout, View, ViewMut};
use foveal_tests::glance_fusion::{assert_matches, inputs, oracle, out_bound, strides, Case};
use foveal_tests::{contiguous_strides, rng, to_f64, Bits, Poison, Tensor, TestElem};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;

/// Runs the reference on poisoned outputs in random strided layouts.
fn run<T: TestElem>(
    r: &mut StdRng,
    vq: &Tensor<T, 4>,
    e: &Tensor<T, 4>,
    lengths: &Lengths,
) -> (Tensor<T, 3>, Tensor<f32, 3>) {
    let [s, b, n, dt] = vq.shape;
    let mut out = Tensor::filled([b, n, dt], strides(r, [b, n, dt], None), T::POISON);
    let mut w = Tensor::filled([b, n, s], strides(r, [b, n, s], None), f32::POISON);
    glance_fusion(
        vq.view(),
        e.view(),
        lengths,
        &mut out.view_mut(),
        Some(&mut w.view_mut()),
    )
    .expect("glance_fusion");
    for o in out.gap_offsets() {
        assert_eq!(out.data[o].bits(), T::POISON.bits(), "out gap {o} written");
    }
    for o in w.gap_offsets() {
        assert_eq!(
            w.data[o].bits(),
            f32::POISON.bits(),
            "weights gap {o} written"
        );
    }
    (out, w)
}

#[derive(Debug, Clone)]
struct Sizes {
    seed: u64,
    layers: usize,
    batch: usize,
    tokens: usize,
    instr: usize,
    dim: usize,
    spread: f32,
}

fn sizes() -> impl Strategy<Value = Sizes> {
    (
        any::<u64>(),
        prop_oneof![Just(1usize), 2usize..=5, 6usize..=10],
        1usize..4,
        1usize..7,
        1usize..6,
        1usize..40,
        prop_oneof![Just(1.0f32), Just(3.0f32)],
    )
        .prop_map(|(seed, layers, batch, tokens, instr, dim, spread)| Sizes {
            seed,
            layers,
            batch,
            tokens,
            instr,
            dim,
            spread,
        })
}

fn check_case<T: TestElem>(z: Sizes) {
    let mut r = rng(z.seed);
    let case = Case::random(&mut r, z.layers, z.batch, z.tokens, z.instr, z.dim);
    let (vq, e) = inputs::<T>(&mut r, &case, None, z.spread);
    let lengths = case.lengths();
    let (out, w) = run(&mut r, &vq, &e, &lengths);
    let want = oracle(&vq, &e, &lengths);
    assert_matches(&out, Some(&w), &want, 1.0, &format!("{z:?}"));
}

foveal_tests::oracle_proptests!(48, sizes(), check_case);

/// The same literal formula in candle ops (f32, on the CPU), row by row over
/// the valid tokens: S matrix products `vq[s] e[s]^T` (`[n_len, m_len]`
/// logits, S x N x M dot products), their mean over the instruction tokens,
/// 1/sqrt(dt), a softmax over the layers, the weighted sum.
fn candle_formula<T: TestElem>(
    vq: &Tensor<T, 4>,
    e: &Tensor<T, 4>,
    lengths: &Lengths,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let [layers, batch, _, dt] = vq.shape;
    let dev = Device::Cpu;
    let gather = |t: &Tensor<T, 4>, b: usize, rows: usize| -> Candle {
        let data: Vec<f32> = (0..layers)
            .flat_map(|s| (0..rows).flat_map(move |i| (0..dt).map(move |c| (s, i, c))))
            .map(|(s, i, c)| t.get([s, b, i, c]).to_f32())
            .collect();
        Candle::from_vec(data, (layers, rows, dt), &dev).expect("candle tensor")
    };
    (0..batch)
        .map(|b| {
            let (n, m) = (lengths.n_len()[b], lengths.m_len()[b]);
            if n == 0 {
                return (Vec::new(), Vec::new());
            }
            let v = gather(vq, b, n);
            let ins = gather(e, b, m);
            let run = || -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
                let logits = v.matmul(&ins.t()?)?; // [S, n, m]
                let g = (logits.mean_keepdim(2)? / (dt as f64).sqrt())?; // [S, n, 1]
                let ex = g.broadcast_sub(&g.max_keepdim(0)?)?.exp()?;
                let w = ex.broadcast_div(&ex.sum_keepdim(0)?)?; // [S, n, 1]
                let out = v.broadcast_mul(&w)?.sum(0)?; // [n, dt]
                let w = w.squeeze(2)?.t()?.contiguous()?; // [n, S]
                Ok((out.flatten_all()?.to_vec1()?, w.flatten_all()?.to_vec1()?))
            };
            run().expect("candle ops")
        })
        .collect()
}

fn matches_candle<T: TestElem>(seed: u64) {
    let mut r = rng(seed);
    for _ in 0..6 {
        let case = Case::draw(&mut r, [1..=6, 1..=3, 1..=24, 1..=12, 1..=72]);
        let (vq, e) = inputs::<T>(&mut r, &case, None, 3.0);
        let lengths = case.lengths();
        let (out, w) = run(&mut r, &vq, &e, &lengths);
        let want = oracle(&vq, &e, &lengths);
        let literal = candle_formula(&vq, &e, &lengths);
        let [_, batch, tokens, dt] = vq.shape;
        let layers = case.layers;
        for (b, (lo, lw)) in literal.iter().enumerate() {
            for n in 0..tokens {
                let row = b * tokens + n;
                if n >= lengths.n_len()[b] {
                    let zero = (0..dt).all(|c| out.get([b, n, c]).bits() == 0)
                        && (0..layers).all(|s| w.get([b, n, s]).to_bits() == 0);
                    assert!(zero, "padding row [{b}, {n}] not 0");
                    continue;
                }
                // both f32 evaluations lie within the oracle's bound of the exact value
                for c in 0..dt {
                    let (got, lit) = (to_f64(out.get([b, n, c])), lo[n * dt + c] as f64);
                    let bound = out_bound::<T>(lit, 2.0 * want.out_err[row * dt + c]);
                    assert!(
                        (got - lit).abs() <= bound,
                        "{case:?}: out[{b}, {n}, {c}] = {got}, candle {lit} (bound {bound:e})"
                    );
                }
                for s in 0..layers {
                    let (got, lit) = (w.get([b, n, s]) as f64, lw[n * layers + s] as f64);
                    let bound = 2.0 * want.weights_err[row * layers + s] + 1e-30;
                    assert!(
                        (got - lit).abs() <= bound,
                        "weights[{b}, {n}, {s}]: {got} vs candle {lit}"
                    );
                }
            }
        }
        assert_eq!(literal.len(), batch);
    }
}

#[test]
fn equals_the_literal_formula_in_candle_f32() {
    matches_candle::<f32>(11);
}

#[test]
fn equals_the_literal_formula_in_candle_bf16() {
    matches_candle::<bf16>(12);
}

/// One layer: every weight is exactly 1 and out equals vq bit for bit
/// (signed zeros included); padding rows are 0.
fn single_layer<T: TestElem>(seed: u64) {
    let mut r = rng(seed);
    for _ in 0..20 {
        let case = Case::draw(&mut r, [1..=1, 1..=3, 1..=8, 1..=4, 1..=32]);
        let (mut vq, e) = inputs::<T>(&mut r, &case, None, 3.0);
        let o = vq.offset([0, 0, 0, 0]);
        vq.data[o] = T::from_f32(-0.0);
        let lengths = case.lengths();
        let (out, w) = run(&mut r, &vq, &e, &lengths);
        for b in 0..case.batch {
            for n in 0..case.tokens {
                let valid = n < case.n_len[b];
                assert_eq!(w.get([b, n, 0]), if valid { 1.0 } else { 0.0 });
                for c in 0..case.dim {
                    let want = if valid {
                        vq.get([0, b, n, c])
                    } else {
                        T::from_f32(0.0)
                    };
                    assert_eq!(out.get([b, n, c]).bits(), want.bits(), "[{b}, {n}, {c}]");
                }
            }
        }
    }
}

#[test]
fn one_layer_is_the_identity() {
    single_layer::<f32>(21);
    single_layer::<f16>(22);
    single_layer::<bf16>(23);
}

/// Every layer the same tokens (a layer stride of 0, or copies): whatever the
/// weights, out is that layer, exactly once rounded to bf16 / f16 (the f32
/// sum is within a few units in the last place of it); with the instruction
/// also shared, every weight is 1/S.
fn equal_layers<T: TestElem>(seed: u64) {
    let mut r = rng(seed);
    for i in 0..16 {
        let case = Case::draw(&mut r, [2..=8, 1..=3, 1..=8, 1..=4, 1..=32]);
        let (one, mut e) = inputs::<T>(&mut r, &case, None, 3.0);
        let [_, b, _, dt] = one.shape;
        // a layer stride of 0: every layer reads layer 0
        let mut vq = one.clone();
        vq.strides[0] = 0;
        let shared_instruction = i % 2 == 0;
        if shared_instruction {
            let first = e.clone();
            e = Tensor::from_fn(
                case.e_shape(),
                contiguous_strides(case.e_shape()),
                T::POISON,
                |[_, bb, m, c]| first.get([0, bb, m, c]),
            );
        }
        let lengths = case.lengths();
        let (out, w) = run(&mut r, &vq, &e, &lengths);
        let s = case.layers as f64;
        for bb in 0..b {
            for nn in 0..case.n_len[bb] {
                let mut sum = 0.0;
                for l in 0..case.layers {
                    let wl = w.get([bb, nn, l]) as f64;
                    sum += wl;
                    if shared_instruction {
                        assert!(
                            (wl - 1.0 / s).abs() <= 4.0 * f32::EPSILON as f64,
                            "w {wl}, S {s}"
                        );
                    }
                }
                assert!(
                    (sum - 1.0).abs() <= s * 4.0 * f32::EPSILON as f64,
                    "weights sum to {sum}"
                );
                for c in 0..dt {
                    let (got, want) = (out.get([bb, nn, c]), one.get([0, bb, nn, c]));
                    if T::DTYPE == foveal::DType::F32 {
                        let (g, v) = (to_f64(got), to_f64(want));
                        assert!(
                            (g - v).abs() <= (s + 2.0) * 4.0 * f32::EPSILON as f64 * v.abs(),
                            "{g} vs {v}"
                        );
                    } else {
                        assert_eq!(
                            got.bits(),
                            want.bits(),
                            "[{bb}, {nn}, {c}]: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn equal_layers_give_that_layer() {
    equal_layers::<f32>(31);
    equal_layers::<f16>(32);
    equal_layers::<bf16>(33);
}

/// Non-finite scores, as torch.softmax treats them. Three layers, dt 2, one
/// instruction token; layer 0's instruction holds +inf in channel 0, so a
/// token's layer-0 score is -inf, +inf or NaN as its vq[0][0] is negative,
/// positive or zero.
#[test]
fn non_finite_scores_follow_ieee() {
    let e_vals = [[f32::INFINITY, 1.0], [0.5, -1.0], [1.0, 1.0]];
    let e = Tensor::from_fn(
        [3, 1, 1, 2],
        contiguous_strides([3, 1, 1, 2]),
        0.0f32,
        |[s, _, _, c]| e_vals[s][c],
    );
    // tokens: layer-0 channel 0 = -1 (score -inf), +1 (+inf), 0 (NaN); then a
    // finite token with a NaN in layer 2's vq.
    let v = |n: usize, s: usize, c: usize| -> f32 {
        match (n, s, c) {
            (0, 0, 0) => -1.0,
            (1, 0, 0) => 1.0,
            (2, 0, 0) => 0.0,
            (3, 0, 0) => 0.0,
            (3, 2, 1) => f32::NAN,
            _ => 0.25 * (1 + n + s + c) as f32,
        }
    };
    let mut e_finite = e.clone();
    let o = e_finite.offset([0, 0, 0, 0]);
    e_finite.data[o] = 2.0;
    let vq = Tensor::from_fn(
        [3, 1, 4, 2],
        contiguous_strides([3, 1, 4, 2]),
        0.0f32,
        |[s, _, n, c]| v(n, s, c),
    );
    let lengths = Lengths::full(1, 4, 1);
    let (out, w) = run(&mut rng(1), &vq, &e, &lengths);

    // token 0: layer 0 weighs 0, the others share the softmax of their scores
    let scale = 1.0 / 2f32.sqrt();
    let g: Vec<f32> = (1..3)
        .map(|s| (v(0, s, 0) * e_vals[s][0] + v(0, s, 1) * e_vals[s][1]) * scale)
        .collect();
    let mut w12 = [0.0f32; 2];
    layer_softmax(&g, &mut w12);
    assert_eq!(w.get([0, 0, 0]), 0.0);
    for s in 1..3 {
        assert!(
            (w.get([0, 0, s]) - w12[s - 1]).abs() <= 1e-6,
            "{:?}",
            w.get([0, 0, s])
        );
    }
    for c in 0..2 {
        let want = w12[0] * v(0, 1, c) + w12[1] * v(0, 2, c);
        assert!((out.get([0, 0, c]) - want).abs() <= 1e-6, "out[0, {c}]");
    }
    // tokens 1 (+inf score) and 2 (0 * inf: NaN score): all NaN
    for n in 1..3 {
        for s in 0..3 {
            assert!(w.get([0, n, s]).is_nan(), "weights[{n}, {s}]");
        }
        for c in 0..2 {
            assert!(out.get([0, n, c]).is_nan(), "out[{n}, {c}]");
        }
    }
    // token 3: a NaN in vq makes its layer's score, so every weight, NaN
    for s in 0..3 {
        assert!(w.get([0, 3, s]).is_nan());
    }

    // -inf in every score: NaN weights (no layer to prefer)
    let e_neg = Tensor::from_fn([2, 1, 1, 1], [1, 1, 1, 1], 0.0f32, |_| f32::INFINITY);
    let vq_neg = Tensor::from_fn([2, 1, 1, 1], [1, 1, 1, 1], 0.0f32, |_| -1.0);
    let (out, w) = run(&mut rng(2), &vq_neg, &e_neg, &Lengths::full(1, 1, 1));
    assert!(w.get([0, 0, 0]).is_nan() && w.get([0, 0, 1]).is_nan() && out.get([0, 0, 0]).is_nan());

    // the same tokens with a finite instruction: all finite
    let (out, w) = run(
        &mut rng(3),
        &Tensor::from_fn(
            [3, 1, 3, 2],
            contiguous_strides([3, 1, 3, 2]),
            0.0f32,
            |[s, _, n, c]| v(n, s, c),
        ),
        &e_finite,
        &Lengths::full(1, 3, 1),
    );
    assert!(out
        .data
        .iter()
        .chain(&w.data)
        .all(|x| x.is_finite() || x.bits() == f32::POISON.bits()));
}

/// Every bad argument is refused before anything is written, naming it.
#[test]
fn rejects_bad_arguments() {
    let (s, b, n, m, dt) = (2, 2, 3, 2, 4);
    let vq = vec![0.5f32; s * b * n * dt];
    let e = vec![0.5f32; s * b * m * dt];
    let vqv = View::contiguous(&vq, [s, b, n, dt]).unwrap();
    let ev = View::contiguous(&e, [s, b, m, dt]).unwrap();
    let full = Lengths::full(b, n, m);
    let mut out = vec![f32::NAN; b * n * dt + 8];
    let mut w = vec![f32::NAN; b * n * s + 8];
    let mut call = |vq: View<'_, f32, 4>,
                    e: View<'_, f32, 4>,
                    lengths: &Lengths,
                    out_shape: [usize; 3],
                    w_shape: [usize; 3]| {
        let mut o = ViewMut::new(&mut out, Layout::contiguous(out_shape)).unwrap();
        let mut wv = ViewMut::new(&mut w, Layout::contiguous(w_shape)).unwrap();
        glance_fusion(vq, e, lengths, &mut o, Some(&mut wv)).unwrap_err()
    };
    let arg = |e: &Error| match e {
        Error::Shape { arg, .. } | Error::Index { arg, .. } | Error::Value { arg, .. } => *arg,
        _ => "",
    };
    let ok_out = [b, n, dt];
    let ok_w = [b, n, s];

    // a row without instruction tokens
    let e_ = call(
        vqv,
        ev,
        &Lengths::new(&[3, 3], &[2, 0]).unwrap(),
        ok_out,
        ok_w,
    );
    assert!(matches!(e_, Error::Value { arg: "m_len", .. }), "{e_}");
    assert!(
        e_.to_string().contains("row 1 has no instruction token"),
        "{e_}"
    );
    // no instruction tokens at all (M = 0)
    let e0 = vec![0.5f32; 0];
    let ev0 = View::contiguous(&e0, [s, b, 0, dt]).unwrap();
    let e_ = call(vqv, ev0, &Lengths::full(b, n, 0), ok_out, ok_w);
    assert_eq!(arg(&e_), "m_len", "{e_}");
    // no layers (S = 0)
    let vq0 = View::contiguous(&vq[..0], [0, b, n, dt]).unwrap();
    let e0s = View::contiguous(&e[..0], [0, b, m, dt]).unwrap();
    let e_ = call(vq0, e0s, &full, ok_out, [b, n, 0]);
    assert!(matches!(e_, Error::Shape { arg: "vq", .. }), "{e_}");
    // dt = 0
    let vqd = View::contiguous(&vq[..0], [s, b, n, 0]).unwrap();
    let ed = View::contiguous(&e[..0], [s, b, m, 0]).unwrap();
    let e_ = call(vqd, ed, &full, [b, n, 0], ok_w);
    assert!(matches!(e_, Error::Shape { arg: "vq", .. }), "{e_}");
    // mismatched dt, layers, batch
    let e3 = View::contiguous(&e[..s * b * m * 3], [s, b, m, 3]).unwrap();
    let e_ = call(vqv, e3, &full, ok_out, ok_w);
    assert!(
        matches!(e_, Error::Shape { arg: "e", .. }) && e_.to_string().contains("width 3"),
        "{e_}"
    );
    let e1 = View::contiguous(&e[..b * m * dt], [1, b, m, dt]).unwrap();
    assert_eq!(arg(&call(vqv, e1, &full, ok_out, ok_w)), "e");
    let eb = View::contiguous(&e[..s * m * dt], [s, 1, m, dt]).unwrap();
    assert_eq!(arg(&call(vqv, eb, &full, ok_out, ok_w)), "e");
    // lengths
    assert_eq!(
        arg(&call(vqv, ev, &Lengths::full(1, n, m), ok_out, ok_w)),
        "lengths"
    );
    let e_ = call(
        vqv,
        ev,
        &Lengths::new(&[3, 4], &[1, 1]).unwrap(),
        ok_out,
        ok_w,
    );
    assert!(matches!(e_, Error::Index { arg: "n_len", .. }), "{e_}");
    let e_ = call(
        vqv,
        ev,
        &Lengths::new(&[3, 3], &[3, 1]).unwrap(),
        ok_out,
        ok_w,
    );
    assert!(matches!(e_, Error::Index { arg: "m_len", .. }), "{e_}");
    // outputs
    assert_eq!(arg(&call(vqv, ev, &full, [b, n, dt - 1], ok_w)), "out");
    assert_eq!(arg(&call(vqv, ev, &full, [b, n + 1, dt], ok_w)), "out");
    assert_eq!(arg(&call(vqv, ev, &full, ok_out, [b, n, s + 1])), "weights");
    assert!(
        Lengths::new(&[1, 2], &[1]).is_err(),
        "lengths of different batches"
    );
    assert!(
        out.iter().chain(&w).all(|x| x.is_nan()),
        "nothing written on error"
    );
}

/// A strided layer stride (layers stored apart, as separate allocations of
/// one buffer would be), the weights left out, and empty tensors.
#[test]
fn layer_strides_and_optional_weights() {
    let mut r = rng(41);
    let case = Case::random(&mut r, 4, 2, 5, 3, 24);
    let (vq, e) = inputs::<bf16>(&mut r, &case, None, 3.0);
    // the same values with every layer 1,000 elements further apart
    let mut spaced = Tensor::from_fn(
        case.vq_shape(),
        {
            let mut st = contiguous_strides(case.vq_shape());
            st[0] += 1000;
            st
        },
        bf16::POISON,
        |i| vq.get(i),
    );
    spaced = spaced.offset_by(7, bf16::POISON);
    let lengths = case.lengths();
    let (a, wa) = run(&mut r, &vq, &e, &lengths);
    let mut b = Tensor::filled(
        case.out_shape(),
        contiguous_strides(case.out_shape()),
        bf16::POISON,
    );
    glance_fusion(spaced.view(), e.view(), &lengths, &mut b.view_mut(), None).unwrap();
    for i in foveal_tests::indices(case.out_shape()) {
        assert_eq!(a.get(i).bits(), b.get(i).bits(), "{i:?}");
    }
    assert!(wa.data.iter().any(|x| *x > 0.0 && *x < 1.0));

    // N = 0 and B = 0: nothing to do
    for (bsz, n) in [(2, 0), (0, 3)] {
        let c = Case::random(&mut r, 2, bsz, n, 2, 8);
        let (vq, e) = inputs::<f32>(&mut r, &c, None, 1.0);
        let mut o = Tensor::filled(c.out_shape(), contiguous_strides(c.out_shape()), 0.0f32);
        glance_fusion(vq.view(), e.view(), &c.lengths(), &mut o.view_mut(), None).expect("empty");
    }
}
