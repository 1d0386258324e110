//! cross_attention: the CPU reference against an f64 oracle written from the
//! SPEC ("VISOR / cross_attention") as the framework composes it (repeat_kv,
//! matmul, softmax, matmul), and its argument checks.
//!
//! Keys and values past a row's kv_len and queries past its q_len are NaN,
//! so reading one fails; outputs are poisoned first, so a slot not written
//! (or written outside its view) fails.

// The oracles index their tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use foveal::cross_attention::cpu::cross_attention;
use foveal::{Error, Layout, SeqLens, View, ViewMut};
use foveal_tests::cross_attention::{
    assert_matches, large_logit_inputs, large_logit_oracle, oracle, outputs, Case, Inputs,
};
use foveal_tests::{
    assert_arg_error, contiguous_strides, random_tensor, rng, to_f64, Tensor, TestElem,
};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;

/// Runs the reference into poisoned outputs (random memory orders with gaps
/// unless `aligned`).
fn run_cpu<T: TestElem>(
    inp: &Inputs<T>,
    r: &mut StdRng,
    aligned: bool,
) -> (Tensor<T, 4>, Tensor<f32, 3>) {
    let (mut o, mut lse) = outputs::<T>(r, inp.q.shape, aligned);
    cross_attention(
        inp.q.view(),
        inp.k.view(),
        inp.v.view(),
        &inp.lens,
        inp.scale,
        &mut o.view_mut(),
        Some(&mut lse.view_mut()),
    )
    .expect("valid call");
    (o, lse)
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..10,
        1usize..40,
        1usize..3,
        1usize..=8,
        prop::sample::select(vec![1usize, 3, 8, 16, 64, 80, 96, 128, 256]),
        prop::sample::select(vec![None, Some(0.05f32), Some(0.7)]),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(seed, batch, queries, keys, kv_heads, group, head_dim, scale, aligned, full)| Case {
                seed,
                batch,
                queries,
                keys,
                kv_heads,
                group,
                head_dim,
                scale,
                aligned,
                full,
            },
        )
}

fn check_case<T: TestElem>(c: Case) {
    let inp = Inputs::<T>::new(&c);
    let (o, lse) = run_cpu(&inp, &mut rng(c.seed ^ 1), c.aligned);
    assert_matches(&o, &lse, &oracle(&inp), 1.0, 0.0, &format!("{c:?}"));
}

foveal_tests::oracle_proptests!(48, case(), check_case);

// ---------------------------------------------------------------------------
// The composition of framework ops, written out
// ---------------------------------------------------------------------------

/// `a [m, k] @ b [k, n]`, row-major f64.
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            for j in 0..n {
                c[i * n + j] += a[i * k + p] * b[p * n + j];
            }
        }
    }
    c
}

fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

/// Row softmax of `s [m, n]`; also returns each row's log-sum-exp.
fn softmax_rows(s: &[f64], m: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut p = vec![0.0; m * n];
    let mut lse = vec![0.0; m];
    for i in 0..m {
        let row = &s[i * n..(i + 1) * n];
        let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - mx).exp()).sum();
        for j in 0..n {
            p[i * n + j] = (row[j] - mx).exp() / z;
        }
        lse[i] = mx + z.ln();
    }
    (p, lse)
}

/// `[B, S, Hkv, D]` -> `[B, Hq, S, D]` f64 with each KV head repeated G times
/// (HF's `repeat_kv` after the transpose), first `len[b]` positions.
fn repeat_kv<T: TestElem>(t: &Tensor<T, 4>, group: usize, b: usize, len: usize) -> Vec<Vec<f64>> {
    let [_, _, hkv, d] = t.shape;
    (0..hkv * group)
        .map(|h| {
            (0..len)
                .flat_map(|j| (0..d).map(move |e| (j, e)))
                .map(|(j, e)| to_f64(t.get([b, j, h / group, e])))
                .collect()
        })
        .collect()
}

/// cross_attention equals `softmax(scale * Q K^T) V` built from matmul,
/// transpose, softmax and repeat_kv, row by row (ragged lengths included),
/// for every element type.
fn composition<T: TestElem>(seed: u64) {
    for (i, &(queries, keys, kv_heads, group, head_dim)) in [
        (5, 33, 2, 4, 64),
        (1, 729, 1, 7, 64),
        (16, 100, 2, 7, 128),
        (3, 17, 4, 1, 80),
        (7, 9, 1, 8, 96),
    ]
    .iter()
    .enumerate()
    {
        let c = Case {
            seed: seed + i as u64,
            batch: 2,
            queries,
            keys,
            kv_heads,
            group,
            head_dim,
            scale: None,
            aligned: true,
            full: i % 2 == 0,
        };
        let inp = Inputs::<T>::new(&c);
        let (o, lse) = run_cpu(&inp, &mut rng(c.seed), true);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let tol = foveal_tests::Tol::for_elem::<T>();
        for b in 0..c.batch {
            let (nq, nk) = (inp.lens.q()[b], inp.lens.kv()[b]);
            if nq == 0 || nk == 0 {
                continue;
            }
            let (kr, vr) = (
                repeat_kv(&inp.k, group, b, nk),
                repeat_kv(&inp.v, group, b, nk),
            );
            for h in 0..kv_heads * group {
                let q: Vec<f64> = (0..nq)
                    .flat_map(|i| (0..head_dim).map(move |e| (i, e)))
                    .map(|(i, e)| to_f64(inp.q.get([b, i, h, e])))
                    .collect();
                let s: Vec<f64> = matmul(&q, &transpose(&kr[h], nk, head_dim), nq, head_dim, nk)
                    .into_iter()
                    .map(|x| scale * x)
                    .collect();
                let (p, want_lse) = softmax_rows(&s, nq, nk);
                let want = matmul(&p, &vr[h], nq, nk, head_dim);
                for i in 0..nq {
                    for e in 0..head_dim {
                        let (g, w) = (to_f64(o.get([b, i, h, e])), want[i * head_dim + e]);
                        assert!(
                            (g - w).abs() <= tol.abs + 2.0 * tol.rel * w.abs().max(0.05),
                            "{c:?}: o[{b}, {i}, {h}, {e}] = {g}, composition {w}"
                        );
                    }
                    let gl = lse.get([b, h, i]) as f64;
                    assert!(
                        (gl - want_lse[i]).abs() <= 1e-5 * (1.0 + want_lse[i].abs()),
                        "{c:?}: lse[{b}, {h}, {i}] = {gl}, composition {}",
                        want_lse[i]
                    );
                }
            }
        }
    }
}

#[test]
fn equals_the_composition_of_framework_ops_f32() {
    composition::<f32>(100);
}

#[test]
fn equals_the_composition_of_framework_ops_f16() {
    composition::<f16>(200);
}

#[test]
fn equals_the_composition_of_framework_ops_bf16() {
    composition::<bf16>(300);
}

// ---------------------------------------------------------------------------
// Hand-checked cases and edge cases
// ---------------------------------------------------------------------------

/// Two keys, two query heads sharing one KV head, scale 1.
#[test]
fn hand_computed_two_keys() {
    // q [1, 1, 2, 2], k, v [1, 2, 1, 2]
    let q = [1.0f32, 0.0, 0.0, 2.0];
    let k = [0.5f32, 0.0, 0.0, 1.0];
    let v = [1.0f32, -1.0, 3.0, 5.0];
    let mut o = [f32::NAN; 4];
    let mut lse = [f32::NAN; 2];
    cross_attention(
        View::contiguous(&q, [1, 1, 2, 2]).unwrap(),
        View::contiguous(&k, [1, 2, 1, 2]).unwrap(),
        View::contiguous(&v, [1, 2, 1, 2]).unwrap(),
        &SeqLens::full(1, 1, 2),
        Some(1.0),
        &mut ViewMut::contiguous(&mut o, [1, 1, 2, 2]).unwrap(),
        Some(&mut ViewMut::contiguous(&mut lse, [1, 2, 1]).unwrap()),
    )
    .unwrap();
    // head 0: scores 0.5, 0; head 1: scores 0, 2
    for (h, (s0, s1)) in [(0usize, (0.5f64, 0.0f64)), (1, (0.0, 2.0))] {
        let p1 = s1.exp() / (s0.exp() + s1.exp());
        let want = [(1.0 - p1) + 3.0 * p1, -(1.0 - p1) + 5.0 * p1];
        for e in 0..2 {
            assert!(
                (o[2 * h + e] as f64 - want[e]).abs() < 1e-6,
                "head {h}: {o:?} vs {want:?}"
            );
        }
        assert!((lse[h] as f64 - (s0.exp() + s1.exp()).ln()).abs() < 1e-6);
    }
}

/// Issue 11 (fault 4's kind, in cross_attention): logits of 1e3 to 1e6,
/// exact in every element type and in f32, against f64 values computed from
/// them, with a bound set by the logits' spread, not their size (see
/// `large_logit_oracle`): the weights are formed from `s - m`, never from
/// logits rounded at their size.
#[test]
fn large_logits_keep_their_precision() {
    fn check<T: TestElem>(logit: f64, queries: usize) {
        let inp = large_logit_inputs::<T>(logit, queries);
        let (o, lse) = run_cpu(&inp, &mut rng(3), true);
        let what = format!("{:?} logits {logit:e}, {queries} queries", T::DTYPE);
        assert_matches(&o, &lse, &large_logit_oracle(&inp), 1.0, 0.0, &what);
    }
    for logit in [1e3, 1e4, 1e5, 1e6] {
        for queries in [1, 50] {
            check::<f32>(logit, queries);
            check::<f16>(logit, queries);
            check::<bf16>(logit, queries);
        }
    }
}

/// A row without keys and a row without queries: o = +0 and lse = -inf in
/// every slot of them; slots past q_len likewise.
#[test]
fn empty_rows_and_slots_past_q_len() {
    let c = Case {
        seed: 4,
        batch: 3,
        queries: 5,
        keys: 9,
        kv_heads: 2,
        group: 3,
        head_dim: 16,
        scale: None,
        aligned: false,
        full: false,
    };
    let lens = SeqLens::new(&[5, 0, 2], &[0, 9, 9]).unwrap();
    let mut r = rng(4);
    let inp = Inputs::<f32>::with(&mut r, &c, lens);
    let want = oracle(&inp);
    let (o, lse) = run_cpu(&inp, &mut r, false);
    assert_matches(&o, &lse, &want, 1.0, 0.0, "empty rows");
    for i in 0..5 {
        for h in 0..6 {
            let attended = i < 2; // row 2 only
            assert_eq!(
                lse.get([2, h, i]) == f32::NEG_INFINITY,
                !attended,
                "row 2 slot {i}"
            );
            assert_eq!(lse.get([0, h, i]), f32::NEG_INFINITY);
            assert_eq!(lse.get([1, h, i]), f32::NEG_INFINITY);
        }
    }
}

/// Infinite and NaN scores: a -inf score weighs 0; a query whose every score
/// is -inf attends nothing (o = 0, lse = -inf); a +inf or NaN score, or a NaN
/// value attended, makes the output NaN.
#[test]
fn infinite_and_nan_scores() {
    let inf = f32::INFINITY;
    // q [1, 4, 1, 2]; keys k0 = (1, 0), k1 = (-inf, 0) for query 0 ...
    let q = [
        1.0f32, 0.0, // query 0: scores 1, -inf
        -1.0, 0.0, // query 1: scores -1, +inf
        0.0, 1.0, // query 2: scores 0, NaN (0 * -inf)
        1.0, 1.0, // query 3: scores 1, -inf (+ NaN value below)
    ];
    let k = [1.0f32, 0.0, -inf, 0.0];
    let run = |v: &[f32], q: &[f32], nq: usize| {
        let mut o = vec![f32::NAN; nq * 2];
        let mut lse = vec![f32::NAN; nq];
        cross_attention(
            View::contiguous(q, [1, nq, 1, 2]).unwrap(),
            View::contiguous(&k, [1, 2, 1, 2]).unwrap(),
            View::contiguous(v, [1, 2, 1, 2]).unwrap(),
            &SeqLens::full(1, nq, 2),
            Some(1.0),
            &mut ViewMut::contiguous(&mut o, [1, nq, 1, 2]).unwrap(),
            Some(&mut ViewMut::contiguous(&mut lse, [1, 1, nq]).unwrap()),
        )
        .unwrap();
        (o, lse)
    };
    let v = [2.0f32, 3.0, 5.0, 7.0];
    let (o, lse) = run(&v, &q[..6], 3);
    assert_eq!(&o[..2], &[2.0, 3.0], "the -inf key weighs 0");
    assert!((lse[0] - 1.0).abs() < 1e-6);
    assert!(
        o[2].is_nan() && o[3].is_nan() && lse[1].is_nan(),
        "+inf score"
    );
    assert!(
        o[4].is_nan() && o[5].is_nan() && lse[2].is_nan(),
        "NaN score"
    );
    // every score -inf: both keys -inf in the attended direction
    let k_all = [-inf, 0.0, -inf, 0.0];
    let mut o = [f32::NAN; 2];
    let mut l = [f32::NAN; 1];
    cross_attention(
        View::contiguous(&q[..2], [1, 1, 1, 2]).unwrap(),
        View::contiguous(&k_all, [1, 2, 1, 2]).unwrap(),
        View::contiguous(&v, [1, 2, 1, 2]).unwrap(),
        &SeqLens::full(1, 1, 2),
        None,
        &mut ViewMut::contiguous(&mut o, [1, 1, 1, 2]).unwrap(),
        Some(&mut ViewMut::contiguous(&mut l, [1, 1, 1]).unwrap()),
    )
    .unwrap();
    assert_eq!((o, l), ([0.0, 0.0], [f32::NEG_INFINITY]), "all scores -inf");
    // a NaN value attended
    let v_nan = [f32::NAN, 3.0, 5.0, 7.0];
    let (o, _) = run(&v_nan, &q[6..8], 1);
    assert!(o[0].is_nan() && o[1] == 3.0, "{o:?}");
}

/// The same keys in the flash/vLLM order and in the candle/HF order give
/// bit-identical results.
#[test]
fn both_kv_memory_orders_agree() {
    let mut r = rng(12);
    let (b, nk, hkv, d) = (2, 21, 2, 64);
    let src: Tensor<bf16, 4> = random_tensor(
        &mut r,
        [b, nk, hkv, d],
        contiguous_strides([b, nk, hkv, d]),
        -1.0,
        1.0,
    );
    let in_order = |layout: Layout<4>| {
        Tensor::from_fn([b, nk, hkv, d], layout.strides(), bf16::ZERO, |idx| {
            src.get(idx)
        })
    };
    let q: Tensor<bf16, 4> = random_tensor(
        &mut r,
        [b, 3, 6, d],
        contiguous_strides([b, 3, 6, d]),
        -1.0,
        1.0,
    );
    let lens = SeqLens::new(&[3, 2], &[21, 13]).unwrap();
    let run = |kv: &Tensor<bf16, 4>| {
        let mut o = vec![bf16::NAN; b * 3 * 6 * d];
        cross_attention(
            q.view(),
            kv.view(),
            kv.view(),
            &lens,
            None,
            &mut ViewMut::contiguous(&mut o, [b, 3, 6, d]).unwrap(),
            None,
        )
        .unwrap();
        o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    let bshd = run(&in_order(Layout::bshd(b, nk, hkv, d)));
    let bhsd = run(&in_order(Layout::bhsd(b, nk, hkv, d)));
    assert_eq!(bshd, bhsd);
}

/// The lse output is optional; without it o is the same.
#[test]
fn lse_is_optional() {
    let c = Case {
        seed: 9,
        batch: 2,
        queries: 4,
        keys: 30,
        kv_heads: 2,
        group: 2,
        head_dim: 16,
        scale: None,
        aligned: true,
        full: false,
    };
    let inp = Inputs::<bf16>::new(&c);
    let (with, _) = run_cpu(&inp, &mut rng(1), true);
    let mut without = Tensor::filled(with.shape, with.strides, bf16::from_bits(0x7fa5));
    cross_attention(
        inp.q.view(),
        inp.k.view(),
        inp.v.view(),
        &inp.lens,
        None,
        &mut without.view_mut(),
        None,
    )
    .unwrap();
    let bits = |t: &Tensor<bf16, 4>| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&with), bits(&without));
}

// ---------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------

/// A valid small problem (B 2, Nq 3, Hq 4, Hkv 2, D 8, Nk 12), each part
/// overridable.
struct Problem {
    q: [usize; 4],
    k: [usize; 4],
    v: Option<[usize; 4]>,
    o: [usize; 4],
    lse: Option<[usize; 3]>,
    q_lens: Vec<usize>,
    kv_lens: Vec<usize>,
    scale: Option<f32>,
}

impl Problem {
    fn valid() -> Self {
        Problem {
            q: [2, 3, 4, 8],
            k: [2, 12, 2, 8],
            v: None,
            o: [2, 3, 4, 8],
            lse: Some([2, 4, 3]),
            q_lens: vec![3, 1],
            kv_lens: vec![12, 0],
            scale: None,
        }
    }

    fn run(&self) -> Result<(), Error> {
        let lens = SeqLens::new(&self.q_lens, &self.kv_lens)?;
        let mut r = rng(5);
        let t = |r: &mut StdRng, s: [usize; 4]| {
            random_tensor::<f32, 4>(r, s, contiguous_strides(s), -1.0, 1.0)
        };
        let (q, k, v) = (
            t(&mut r, self.q),
            t(&mut r, self.k),
            t(&mut r, self.v.unwrap_or(self.k)),
        );
        let mut o = Tensor::filled(self.o, contiguous_strides(self.o), f32::NAN);
        let mut lse = self
            .lse
            .map(|s| Tensor::filled(s, contiguous_strides(s), f32::NAN));
        let mut lse_view = lse.as_mut().map(|l| l.view_mut());
        let res = cross_attention(
            q.view(),
            k.view(),
            v.view(),
            &lens,
            self.scale,
            &mut o.view_mut(),
            lse_view.as_mut(),
        );
        if res.is_err() {
            assert!(
                o.data.iter().all(|x| x.is_nan()),
                "a failed call must not write o"
            );
            assert!(
                lse.iter().all(|l| l.data.iter().all(|x| x.is_nan())),
                "a failed call must not write lse"
            );
        }
        res
    }
}

fn assert_err(res: Result<(), Error>, kind: &str, want_arg: &str) {
    assert_arg_error(res, "cross_attention", kind, want_arg);
}

#[test]
fn valid_problem_is_accepted() {
    Problem::valid().run().unwrap();
    let mut p = Problem::valid();
    p.lse = None;
    p.run().unwrap();
}

#[test]
fn rejects_mismatched_q_k_v() {
    let mut p = Problem::valid();
    p.k[0] = 1;
    assert_err(p.run(), "shape", "k");
    let mut p = Problem::valid();
    p.k[3] = 16;
    assert_err(p.run(), "shape", "k");
    let mut p = Problem::valid();
    p.v = Some([2, 12, 2, 16]);
    assert_err(p.run(), "shape", "v");
    let mut p = Problem::valid();
    p.v = Some([2, 13, 2, 8]);
    assert_err(p.run(), "shape", "v");
}

#[test]
fn rejects_query_heads_not_a_multiple_of_kv_heads() {
    let mut p = Problem::valid();
    p.k[2] = 3;
    p.v = Some(p.k);
    assert_err(p.run(), "shape", "q");
}

#[test]
fn rejects_lengths_of_another_batch_or_past_the_tensors() {
    let mut p = Problem::valid();
    p.q_lens = vec![3, 1, 1];
    p.kv_lens = vec![12, 0, 0];
    assert_err(p.run(), "shape", "lens");
    let mut p = Problem::valid();
    p.kv_lens = vec![12];
    assert_err(p.run(), "shape", "lens");
    let mut p = Problem::valid();
    p.q_lens = vec![3, 4];
    assert_err(p.run(), "index", "q_len");
    let mut p = Problem::valid();
    p.kv_lens = vec![13, 0];
    assert_err(p.run(), "index", "kv_len");
}

#[test]
fn rejects_bad_scale() {
    for scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let mut p = Problem::valid();
        p.scale = Some(scale);
        assert_err(p.run(), "value", "scale");
    }
}

#[test]
fn rejects_outputs_of_wrong_shape() {
    for o in [[2, 3, 4, 16], [2, 2, 4, 8], [1, 3, 4, 8], [2, 3, 2, 8]] {
        let mut p = Problem::valid();
        p.o = o;
        assert_err(p.run(), "shape", "o");
    }
    for lse in [[2, 3, 4], [2, 4, 2], [1, 4, 3]] {
        let mut p = Problem::valid();
        p.lse = Some(lse);
        assert_err(p.run(), "shape", "lse");
    }
}
