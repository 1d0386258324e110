//! gaze_route_decode: the CPU reference is exactly route_topk then
//! gaze_decode (both CPU references called separately give bit-identical o,
//! lse and routes) on random ragged layouts, GQA 1..8, any KV memory order,
//! bf16 / f16 / f32, with exact score ties (integer-valued queries and
//! descriptors) and NaN descriptors; `top_k >= regions` is dense attention
//! over the row (against an f64 oracle); every argument check, reported
//! under this op's name, with the outputs untouched.
//!
//! Keys and values no head of a KV group attends (by the routes route_topk
//! chooses) are NaN, so an implementation that reads an unrouted region's
//! tokens fails (the GPU tests rely on it).

use foveal::gaze_decode::cpu::gaze_decode;
use foveal::gaze_route_decode::cpu::gaze_route_decode;
use foveal::route_topk::cpu::route_topk;
use foveal::{Error, GazeLayout, Routes};
use foveal_tests::gaze_cases::GazeOpts;
use foveal_tests::gaze_route_decode::{inf_value_case, outputs, q4, run_cpu, Case, Inputs};
use foveal_tests::{contiguous_strides, rng, to_f64, Bits, Poison, Tensor, TestElem, Tol};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::Rng;

fn assert_bits<T: Bits + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.bits(), w.bits(), "{what}: element {i}: {g:?} != {w:?}");
    }
}

/// Fused against route_topk + gaze_decode called separately: bit-identical.
fn check_against_separate<T: TestElem>(c: &Case) {
    let inp = Inputs::<T>::new(c);
    let (o_like, lse_like) = outputs::<T>(&mut rng(c.seed ^ 1), inp.q.shape, c.aligned);
    let (o, lse, routes) = run_cpu(&inp, &o_like, &lse_like);

    let hq = inp.q.shape[1];
    let mut want_routes = Routes::new(&inp.layout, 1, hq, inp.top_k);
    route_topk(
        q4(&inp.q),
        inp.desc.view(),
        &inp.layout,
        inp.top_k,
        &mut want_routes,
    )
    .expect("route_topk");
    let (mut want_o, mut want_lse) = (o_like.clone(), lse_like.clone());
    gaze_decode(
        inp.q.view(),
        inp.k.view(),
        inp.v.view(),
        &inp.layout,
        &want_routes,
        inp.scale,
        &mut want_o.view_mut(),
        Some(&mut want_lse.view_mut()),
    )
    .expect("gaze_decode");
    assert_eq!(routes, want_routes, "routes, {c:?}");
    assert_eq!(routes, inp.routes, "routes, {c:?}");
    assert_bits(&o.data, &want_o.data, &format!("o, {c:?}"));
    assert_bits(&lse.data, &want_lse.data, &format!("lse, {c:?}"));
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..3,
        1usize..9,
        prop::sample::select(vec![4usize, 8, 16]),
        any::<bool>(),
        prop::bool::weighted(0.2),
        any::<bool>(),
    )
        .prop_map(
            |(seed, batch, kv_heads, group, head_dim, ties, all, aligned)| Case {
                seed,
                batch,
                kv_heads,
                group,
                head_dim,
                ties,
                all,
                scale: [None, Some(0.05), Some(0.4)][(seed % 3) as usize],
                aligned,
                opts: GazeOpts::default(),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn equals_route_topk_then_gaze_decode_bf16(c in case()) {
        check_against_separate::<bf16>(&c);
    }

    #[test]
    fn equals_route_topk_then_gaze_decode_f16(c in case()) {
        check_against_separate::<f16>(&c);
    }

    #[test]
    fn equals_route_topk_then_gaze_decode_f32(c in case()) {
        check_against_separate::<f32>(&c);
    }
}

/// Dense attention over the row (every position the layout lists) in f64.
fn check_dense<T: TestElem>(c: &Case) {
    let inp = Inputs::<T>::new(c);
    let (o_like, lse_like) = outputs::<T>(&mut rng(c.seed ^ 2), inp.q.shape, c.aligned);
    let (o, lse, routes) = run_cpu(&inp, &o_like, &lse_like);
    let [batch, hq, d] = inp.q.shape;
    let g = c.group;
    let scale = inp.scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
    for b in 0..batch {
        let mut positions: Vec<usize> = inp.layout.visible(b).flatten().collect();
        for reg in 0..inp.layout.regions(b) {
            positions.extend(inp.layout.region(b, reg).iter().map(|&p| p as usize));
        }
        for h in 0..hq {
            let ids: Vec<i32> = (0..inp.layout.regions(b) as i32).collect();
            assert_eq!(routes.get(b, 0, h), &ids[..], "every region routed, {c:?}");
            let kvh = h / g;
            let dot = |p: usize| {
                (0..d)
                    .map(|e| to_f64(inp.q.get([b, h, e])) * to_f64(inp.k.get([b, p, kvh, e])))
                    .sum::<f64>()
                    * scale
            };
            let logits: Vec<f64> = positions.iter().map(|&p| dot(p)).collect();
            let mag = positions
                .iter()
                .map(|&p| {
                    (0..d)
                        .map(|e| {
                            (to_f64(inp.q.get([b, h, e])) * to_f64(inp.k.get([b, p, kvh, e]))).abs()
                        })
                        .sum::<f64>()
                        * scale
                })
                .fold(0.0, f64::max);
            let got_lse = lse.get([b, h]) as f64;
            if positions.is_empty() {
                assert_eq!(got_lse, f64::NEG_INFINITY, "{c:?}");
                continue;
            }
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            let want_lse = m + sum.ln();
            assert!(
                (got_lse - want_lse).abs() <= 1e-4 * (1.0 + mag + want_lse.abs()),
                "lse {got_lse} vs {want_lse}, {c:?}"
            );
            let storage = Tol::for_elem::<T>();
            for e in 0..d {
                let want: f64 = positions
                    .iter()
                    .zip(&logits)
                    .map(|(&p, l)| (l - m).exp() / sum * to_f64(inp.v.get([b, p, kvh, e])))
                    .sum();
                let got = to_f64(o.get([b, h, e]));
                let bound = storage.abs + storage.rel * want.abs() + 1e-4 * (1.0 + mag);
                assert!(
                    (got - want).abs() <= bound,
                    "o[{b}, {h}, {e}] {got} vs {want}, {c:?}"
                );
            }
        }
    }
}

#[test]
fn top_k_covering_every_region_is_dense_attention() {
    let mut r = rng(11);
    for i in 0..40 {
        let c = Case {
            seed: r.random(),
            batch: r.random_range(1..4),
            kv_heads: r.random_range(1..3),
            group: r.random_range(1..9),
            head_dim: [4, 8, 16][i % 3],
            ties: false,
            all: true,
            scale: [None, Some(0.3)][i % 2],
            aligned: i % 2 == 0,
            opts: GazeOpts::default(),
        };
        match i % 3 {
            0 => check_dense::<f32>(&c),
            1 => check_dense::<f16>(&c),
            _ => check_dense::<bf16>(&c),
        }
    }
}

// ---------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------

fn base_case() -> Case {
    Case {
        seed: 3,
        batch: 2,
        kv_heads: 2,
        group: 2,
        head_dim: 8,
        ties: false,
        all: false,
        scale: None,
        aligned: true,
        opts: GazeOpts {
            max_units: 2,
            max_side: 8,
        },
    }
}

/// Runs the op with pieces swapped in; returns the error and checks the
/// outputs were left untouched.
#[allow(clippy::too_many_arguments)]
fn refuse(
    inp: &Inputs<f32>,
    q: &Tensor<f32, 3>,
    k: &Tensor<f32, 4>,
    desc: &Tensor<f32, 4>,
    top_k: usize,
    routes_k: usize,
    scale: Option<f32>,
    o_shape: [usize; 3],
    lse_shape: [usize; 2],
) -> Error {
    let mut o = Tensor::filled(o_shape, contiguous_strides(o_shape), f32::POISON);
    let mut lse = Tensor::filled(lse_shape, contiguous_strides(lse_shape), f32::POISON);
    let mut routes = Routes::new(&inp.layout, 1, q.shape[1], routes_k);
    let before = routes.clone();
    let err = gaze_route_decode(
        q.view(),
        k.view(),
        inp.v.view(),
        desc.view(),
        &inp.layout,
        top_k,
        scale,
        &mut o.view_mut(),
        Some(&mut lse.view_mut()),
        &mut routes,
    )
    .expect_err("must refuse");
    assert!(
        o.data.iter().all(|x| x.is_nan()) && lse.data.iter().all(|x| x.is_nan()),
        "outputs touched: {err}"
    );
    assert_eq!(routes, before, "routes touched: {err}");
    err
}

fn op_arg(e: &Error) -> (&'static str, &'static str) {
    match e {
        Error::Shape { op, arg, .. }
        | Error::Index { op, arg, .. }
        | Error::Value { op, arg, .. } => (op, arg),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn argument_errors_leave_outputs_untouched() {
    let inp = Inputs::<f32>::new(&base_case());
    let (q, k, desc) = (&inp.q, &inp.k, &inp.desc);
    let [b, hq, d] = q.shape;
    let k_ok = inp.top_k;
    let ok = refuse(&inp, q, k, desc, 0, 0, None, q.shape, [b, hq]);
    assert!(
        matches!(
            ok,
            Error::Value {
                op: "gaze_route_decode",
                arg: "k",
                ..
            }
        ),
        "{ok}"
    );
    // routes of another k
    let e = refuse(&inp, q, k, desc, k_ok, k_ok + 1, None, q.shape, [b, hq]);
    assert_eq!(op_arg(&e), ("gaze_route_decode", "routes"), "{e}");
    // too few descriptors
    let [db, dh, dr, dd] = desc.shape;
    if inp.layout.max_regions() > 0 {
        let short = [db, dh, inp.layout.max_regions() - 1, dd];
        let desc_short = Tensor::filled(short, contiguous_strides(short), 0.0f32);
        let e = refuse(&inp, q, k, &desc_short, k_ok, k_ok, None, q.shape, [b, hq]);
        assert_eq!(op_arg(&e), ("gaze_route_decode", "desc"), "{e}");
    }
    // desc head dim against q
    let wide = [db, dh, dr, dd + 4];
    let desc_wide = Tensor::filled(wide, contiguous_strides(wide), 0.0f32);
    let e = refuse(&inp, q, k, &desc_wide, k_ok, k_ok, None, q.shape, [b, hq]);
    assert_eq!(op_arg(&e), ("gaze_route_decode", "desc"), "{e}");
    // Hq not a multiple of Hkv
    let odd = [b, hq + 1, d];
    let q_odd = Tensor::filled(odd, contiguous_strides(odd), 0.0f32);
    let e = refuse(&inp, &q_odd, k, desc, k_ok, k_ok, None, odd, [b, hq + 1]);
    assert_eq!(op_arg(&e), ("gaze_route_decode", "q"), "{e}");
    // k of another batch
    let kb = [b + 1, k.shape[1], k.shape[2], d];
    let k_bad = Tensor::filled(kb, contiguous_strides(kb), 0.0f32);
    let e = refuse(&inp, q, &k_bad, desc, k_ok, k_ok, None, q.shape, [b, hq]);
    assert_eq!(op_arg(&e), ("gaze_route_decode", "k"), "{e}");
    // bad scales
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = refuse(&inp, q, k, desc, k_ok, k_ok, Some(s), q.shape, [b, hq]);
        assert_eq!(op_arg(&e), ("gaze_route_decode", "scale"), "{e}");
    }
    // outputs of the wrong shape
    let e = refuse(&inp, q, k, desc, k_ok, k_ok, None, [b, hq, d + 1], [b, hq]);
    assert_eq!(op_arg(&e), ("gaze_route_decode", "o"), "{e}");
    let e = refuse(&inp, q, k, desc, k_ok, k_ok, None, q.shape, [b, hq + 1]);
    assert_eq!(op_arg(&e), ("gaze_route_decode", "lse"), "{e}");
    // a layout of another batch
    let other = GazeLayout::new(inp.layout.seq(), &[foveal::GazeRow::new()]).expect("layout");
    let mut o = Tensor::filled(q.shape, contiguous_strides(q.shape), f32::POISON);
    let mut routes = Routes::new(&other, 1, hq, k_ok);
    let e = gaze_route_decode(
        q.view(),
        k.view(),
        inp.v.view(),
        desc.view(),
        &other,
        k_ok,
        None,
        &mut o.view_mut(),
        None,
        &mut routes,
    )
    .expect_err("must refuse");
    assert_eq!(op_arg(&e).0, "gaze_route_decode", "{e}");
    assert!(o.data.iter().all(|x| x.is_nan()));
}

#[test]
fn routes_are_tied_to_the_layout_and_usable_by_gaze_decode() {
    let inp = Inputs::<f32>::new(&base_case());
    let (o_like, lse_like) = outputs::<f32>(&mut rng(5), inp.q.shape, true);
    let (o, _, routes) = run_cpu(&inp, &o_like, &lse_like);
    let mut o2 = o_like.clone();
    gaze_decode(
        inp.q.view(),
        inp.k.view(),
        inp.v.view(),
        &inp.layout,
        &routes,
        inp.scale,
        &mut o2.view_mut(),
        None,
    )
    .expect("routes accepted");
    assert_bits(&o2.data, &o.data, "o");
}

/// Issue 11's minimal case: V[1] is +inf and only head 0 routes the region
/// holding it; head 1 (same KV head) attends {0, 2}: finite, and equal to
/// gaze_decode over the same routes; head 0 is +inf.
#[test]
fn inf_value_attended_by_one_head_of_the_group() {
    fn check<T: TestElem>() {
        let inp = inf_value_case::<T>();
        let (o_like, lse_like) = outputs::<T>(&mut rng(1), inp.q.shape, true);
        let (o, lse, routes) = run_cpu(&inp, &o_like, &lse_like);
        assert_eq!(routes.ids(), &[0, 1]);
        let want = foveal_tests::gaze_decode::oracle(&inp.q, &inp.k, &inp.v, None, |_, h| {
            if h == 0 {
                vec![0, 1]
            } else {
                vec![0, 2]
            }
        });
        let d = inp.q.shape[2];
        for j in 0..d {
            assert!(
                !to_f64(o.get([0, 0, j])).is_finite(),
                "head 0 attends the inf value"
            );
            let (got, w) = (to_f64(o.get([0, 1, j])), &want[1]);
            assert!(
                (got - w.o[j]).abs() <= w.bound::<T>(j, 1.0),
                "head 1, element {j}: {got}, want {}",
                w.o[j]
            );
        }
        assert!((lse.get([0, 1]) as f64 - want[1].lse).abs() <= want[1].lse_bound(1.0));
    }
    check::<f32>();
    check::<f16>();
    check::<bf16>();
}
