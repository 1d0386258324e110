//! text_guided_select: the CPU reference against an f64 oracle written from
//! the SPEC ("FocusLLaVA / text_guided_select", the paper's Eqs. 7 to 9), and
//! its argument checks.
//!
//! The oracle computes S in f64. The reference's S must be within f32
//! rounding of it; its kept set must be a valid answer of the rule on the
//! oracle's S up to that rounding: a top-k set (nothing left out scores
//! clearly above something kept) whose k is where the cumulative sum crosses
//! gamma * sum(S), up to the same rounding. Exact cases (equal keys: exact
//! ties, broken towards the lower index) pin the rule down.

// The oracles index their tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use foveal::text_guided_select::cpu::text_guided_select;
use foveal::text_guided_select::{quantize, select_from_scores, Lengths, DEFAULT_GAMMA};
use foveal::{Error, Layout, View, ViewMut};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, KvOrder, Tensor, TestElem};

use proptest::prelude::*;
use rand::Rng;

/// S per row in f64: `(1/t) sum_j max_h softmax_i(q_jh . k_i,h/G / sqrt(D))`.
fn oracle<T: TestElem>(
    q: &Tensor<T, 4>,
    k: &Tensor<T, 4>,
    t_len: &[usize],
    n_len: &[usize],
) -> Vec<Vec<f64>> {
    let [batch, _, hq, d] = q.shape;
    let g = hq / k.shape[2];
    (0..batch)
        .map(|b| {
            let (t, n) = (t_len[b], n_len[b]);
            let mut s = vec![0.0; n];
            for j in 0..t {
                let mut best = vec![0.0f64; n];
                for h in 0..hq {
                    let logits: Vec<f64> = (0..n)
                        .map(|i| {
                            (0..d)
                                .map(|e| {
                                    to_f64(q.get([b, j, h, e])) * to_f64(k.get([b, i, h / g, e]))
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                    for i in 0..n {
                        best[i] = best[i].max((logits[i] - m).exp() / z);
                    }
                }
                for i in 0..n {
                    s[i] += best[i] / t as f64;
                }
            }
            s
        })
        .collect()
}

/// Checks that `kept` (ascending) is a valid answer on the exact scores `s`
/// up to `eps` per score.
fn assert_valid_selection(kept: &[i32], s: &[f64], gamma: f64, eps: f64, what: &str) {
    let n = s.len();
    assert!(
        kept.windows(2).all(|w| w[0] < w[1]),
        "{what}: not ascending: {kept:?}"
    );
    let k = kept.len();
    let total: f64 = s.iter().sum();
    if n == 0 {
        assert_eq!(k, 0, "{what}");
        return;
    }
    let is_kept: Vec<bool> = (0..n)
        .map(|i| kept.binary_search(&(i as i32)).is_ok())
        .collect();
    let min_kept = (0..n)
        .filter(|&i| is_kept[i])
        .map(|i| s[i])
        .fold(f64::INFINITY, f64::min);
    let max_left = (0..n)
        .filter(|&i| !is_kept[i])
        .map(|i| s[i])
        .fold(f64::NEG_INFINITY, f64::max);
    assert!(
        max_left <= min_kept + 2.0 * eps,
        "{what}: left out {max_left} above kept {min_kept}"
    );
    let mut sorted = s.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let prefix = |m: usize| sorted[..m].iter().sum::<f64>();
    let slack = eps * n as f64 + 1e-9;
    let thr = gamma * total;
    assert!(k >= 1 && k <= n, "{what}: k {k}");
    if k < n {
        assert!(
            prefix(k) > thr - slack,
            "{what}: prefix of {k} = {} does not reach {thr}",
            prefix(k)
        );
    }
    assert!(
        prefix(k - 1) <= thr + slack,
        "{what}: a shorter prefix ({}) already exceeds {thr}",
        prefix(k - 1)
    );
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    batch: usize,
    text: usize,
    visual: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    gamma: f32,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..6,
        1usize..40,
        1usize..3,
        1usize..9,
        prop::sample::select(vec![1usize, 3, 8, 16]),
        prop::sample::select(vec![DEFAULT_GAMMA, 1.0, 0.5, 0.01, 0.999]),
    )
        .prop_map(
            |(seed, batch, text, visual, kv_heads, group, head_dim, gamma)| Case {
                seed,
                batch,
                text,
                visual,
                kv_heads,
                group,
                head_dim,
                gamma,
            },
        )
}

struct Out {
    keep: Vec<i32>,
    count: Vec<i32>,
    scores: Vec<f32>,
}

fn run<T: TestElem>(
    q: &Tensor<T, 4>,
    k: &Tensor<T, 4>,
    lengths: &Lengths,
    gamma: f32,
) -> Result<Out, Error> {
    let [b, n] = [q.shape[0], k.shape[1]];
    let mut out = Out {
        keep: vec![i32::MIN; b * n],
        count: vec![i32::MIN; b],
        scores: vec![f32::NAN; b * n],
    };
    text_guided_select(
        q.view(),
        k.view(),
        lengths,
        gamma,
        &mut ViewMut::new(&mut out.keep, Layout::strided([b, n], [n, 1]).unwrap()).unwrap(),
        &mut ViewMut::contiguous(&mut out.count, [b]).unwrap(),
        Some(&mut ViewMut::new(&mut out.scores, Layout::strided([b, n], [n, 1]).unwrap()).unwrap()),
    )?;
    Ok(out)
}

fn check_case<T: TestElem>(c: Case) {
    let mut r = rng(c.seed);
    let hq = c.kv_heads * c.group;
    let qshape = [c.batch, c.text, hq, c.head_dim];
    let kshape = [c.batch, c.visual, c.kv_heads, c.head_dim];
    let qs = random_strides(&mut r, qshape);
    let q: Tensor<T, 4> = random_tensor(&mut r, qshape, qs, -2.0, 2.0);
    let ks = KvOrder::pick(&mut r).strides(&mut r, kshape);
    let k: Tensor<T, 4> = random_tensor(&mut r, kshape, ks, -2.0, 2.0);
    let t_len: Vec<usize> = (0..c.batch)
        .map(|_| {
            if r.random_bool(0.2) {
                0
            } else {
                r.random_range(1..=c.text)
            }
        })
        .collect();
    let n_len: Vec<usize> = (0..c.batch)
        .map(|_| {
            if r.random_bool(0.1) {
                0
            } else {
                r.random_range(1..=c.visual)
            }
        })
        .collect();
    let lengths = Lengths::new(&t_len, &n_len).unwrap();
    let out = run(&q, &k, &lengths, c.gamma).expect("text_guided_select");
    let want = oracle(&q, &k, &t_len, &n_len);
    let n = c.visual;
    for b in 0..c.batch {
        let what = format!("{c:?}: row {b} (t {}, n {})", t_len[b], n_len[b]);
        let cnt = out.count[b] as usize;
        let row = &out.keep[b * n..(b + 1) * n];
        assert!(row[cnt..].iter().all(|&v| v == -1), "{what}: padding");
        let s = &out.scores[b * n..(b + 1) * n];
        assert!(
            s[n_len[b]..].iter().all(|&v| v == 0.0),
            "{what}: scores past n_len"
        );
        for i in 0..n_len[b] {
            let (g, w) = (s[i] as f64, want[b][i]);
            assert!(
                (g - w).abs() <= 1e-5 * w.abs() + 1e-6,
                "{what}: S[{i}] = {g}, want {w}"
            );
        }
        if t_len[b] == 0 {
            assert_eq!(cnt, n_len[b], "{what}: no text keeps every visual token");
        }
        // the rule, exactly, on the reference's own scores
        let own: Vec<i32> = select_from_scores(&s[..n_len[b]], c.gamma)
            .iter()
            .map(|&i| i as i32)
            .collect();
        assert_eq!(&row[..cnt], &own[..], "{what}");
        if t_len[b] > 0 {
            assert_valid_selection(&row[..cnt], &want[b], c.gamma as f64, 1e-5, &what);
        }
    }
}

foveal_tests::oracle_proptests!(48, case(), check_case);

/// Issue 11, fault 4: logits of 1e3 to 1e6, exact in every element type and
/// in f32 (D 16, so the scale is 1/4; q rows `[1000, c, 0, ...]`, key rows
/// `[b, e_i, 0, ...]` with small integers `c`, `e_i`). log A is formed as
/// `(l - m) - ln sum`, so S keeps f32 precision whatever the logits;
/// `l - (m + ln sum)` rounded `m + ln sum` at the logits' size (1e-2
/// relative at 1e6) and failed here.
#[test]
fn large_logits_keep_their_precision() {
    fn check<T: TestElem>(b: f32) {
        let (t, n, hkv, g, d) = (3, 30, 2, 2, 16);
        let mut r = rng(b as u64);
        let qshape = [1, t, hkv * g, d];
        let q = Tensor::from_fn(
            qshape,
            [t * hkv * g * d, hkv * g * d, d, 1],
            T::POISON,
            |[_, j, h, e]| {
                T::from_f32(match e {
                    0 => 1000.0,
                    1 => (1 + (h + j) % 3) as f32,
                    _ => 0.0,
                })
            },
        );
        let kshape = [1, n, hkv, d];
        let k = Tensor::from_fn(
            kshape,
            [n * hkv * d, hkv * d, d, 1],
            T::POISON,
            |[_, _, _, e]| {
                T::from_f32(match e {
                    0 => b,
                    1 => r.random_range(-6..=6) as f32,
                    _ => 0.0,
                })
            },
        );
        let out = run(&q, &k, &Lengths::full(1, t, n), DEFAULT_GAMMA).unwrap();
        let want = oracle(&q, &k, &[t], &[n]);
        for i in 0..n {
            let (got, w) = (out.scores[i] as f64, want[0][i]);
            assert!(
                (got - w).abs() <= 1e-5 * (1.0 + w.ln().abs()) * w + 1e-30,
                "logits {}: S[{i}] = {got}, want {w}",
                250.0 * b
            );
        }
    }
    for b in [4.0, 40.0, 400.0, 4000.0] {
        check::<f32>(b);
        check::<half::bf16>(b);
        check::<half::f16>(b);
    }
}

/// Identical keys: every S is 1/n exactly (ties), so the rule keeps the k
/// lowest indices, k the smallest with k * q > gamma * n * q.
#[test]
fn exact_ties_keep_the_lowest_indices() {
    let mut r = rng(3);
    for n in [1usize, 2, 7, 10, 33] {
        for gamma in [0.85f32, 0.5, 1.0, 0.1] {
            let q: Tensor<f32, 4> = random_tensor(&mut r, [1, 3, 4, 8], [96, 32, 8, 1], -1.0, 1.0);
            let k = Tensor::from_fn([1, n, 2, 8], [16 * n, 16, 8, 1], 0.0f32, |[_, _, h, e]| {
                (h + e) as f32 * 0.25
            });
            let out = run(&q, &k, &Lengths::full(1, 3, n), gamma).unwrap();
            let qv = quantize(out.scores[0]);
            assert!(
                out.scores.iter().all(|&s| quantize(s) == qv),
                "equal scores"
            );
            let need = (gamma as f64 * (qv * n as u64) as f64).floor() as u64 + 1;
            let want_k = if need > qv * n as u64 {
                n
            } else {
                need.div_ceil(qv) as usize
            };
            assert_eq!(out.count[0] as usize, want_k, "n {n}, gamma {gamma}");
            assert_eq!(
                &out.keep[..want_k],
                &(0..want_k as i32).collect::<Vec<_>>()[..]
            );
        }
    }
}

#[test]
fn select_from_scores_rule() {
    // sorted: 0.4 (i=1), 0.3 (i=3), 0.2 (i=0), 0.1 (i=2); total 1.0
    let s = [0.2f32, 0.4, 0.1, 0.3];
    assert_eq!(select_from_scores(&s, 0.5), vec![1, 3], "0.7 > 0.5");
    assert_eq!(select_from_scores(&s, 0.35), vec![1], "0.4 > 0.35");
    assert_eq!(
        select_from_scores(&s, 0.85),
        vec![0, 1, 3],
        "0.4 + 0.3 + 0.2 = 0.9 > 0.85"
    );
    assert_eq!(select_from_scores(&s, 1.0), vec![0, 1, 2, 3]);
    assert_eq!(
        select_from_scores(&[0.5, f32::NAN, 0.5], 0.4),
        vec![0],
        "tie to the lower index"
    );
    assert_eq!(select_from_scores(&[f32::NAN, 0.0, 1.0], 0.5), vec![2]);
    assert_eq!(select_from_scores(&[], 0.5), Vec::<usize>::new());
    assert_eq!(
        select_from_scores(&[0.0, 0.0], 0.5),
        vec![0, 1],
        "all zero: keep all"
    );
}

#[test]
fn rejects_bad_arguments() {
    let q = vec![0.0f32; 2 * 3 * 4 * 8];
    let k = vec![0.0f32; 2 * 5 * 2 * 8];
    let qv = View::contiguous(&q, [2, 3, 4, 8]).unwrap();
    let kv = View::contiguous(&k, [2, 5, 2, 8]).unwrap();
    let mut keep = [i32::MIN; 10];
    let mut count = vec![i32::MIN; 2];
    let mut go = |q: View<'_, f32, 4>,
                  k: View<'_, f32, 4>,
                  t: &[usize],
                  n: &[usize],
                  gamma: f32,
                  kshape: [usize; 2]| {
        let lengths = Lengths::new(t, n)?;
        text_guided_select(
            q,
            k,
            &lengths,
            gamma,
            &mut ViewMut::contiguous(&mut keep[..kshape[0] * kshape[1]], kshape).unwrap(),
            &mut ViewMut::contiguous(&mut count, [2]).unwrap(),
            None,
        )
    };
    let ok = [3, 3];
    let nl = [5, 0];
    for g in [0.0, -0.1, 1.01, f32::NAN] {
        assert!(
            matches!(
                go(qv, kv, &ok, &nl, g, [2, 5]),
                Err(Error::Value { arg: "gamma", .. })
            ),
            "gamma {g}"
        );
    }
    assert!(matches!(
        go(qv, kv, &[4, 3], &nl, 0.85, [2, 5]),
        Err(Error::Index { arg: "t_len", .. })
    ));
    assert!(matches!(
        go(qv, kv, &ok, &[6, 0], 0.85, [2, 5]),
        Err(Error::Index { arg: "n_len", .. })
    ));
    assert!(matches!(
        go(qv, kv, &ok, &[5], 0.85, [2, 5]),
        Err(Error::Shape { arg: "lengths", .. })
    ));
    assert!(matches!(
        go(qv, kv, &[3], &[5], 0.85, [2, 5]),
        Err(Error::Shape { arg: "lengths", .. })
    ));
    assert!(matches!(
        go(qv, kv, &ok, &nl, 0.85, [2, 4]),
        Err(Error::Shape { arg: "keep", .. })
    ));
    let k3 = View::contiguous(&k[..2 * 5 * 3 * 4], [2, 5, 3, 4]).unwrap();
    assert!(matches!(
        go(qv, k3, &ok, &nl, 0.85, [2, 5]),
        Err(Error::Shape { arg: "k_vis", .. })
    ));
    let q3 = View::contiguous(&q[..2 * 3 * 3 * 8], [2, 3, 3, 8]).unwrap();
    assert!(matches!(
        go(q3, kv, &ok, &nl, 0.85, [2, 5]),
        Err(Error::Shape { arg: "q_text", .. })
    ));
    assert!(
        keep.iter().all(|&v| v == i32::MIN) && count.iter().all(|&v| v == i32::MIN),
        "written on error"
    );
}
