//! route_topk: the CPU reference against an f64 oracle written from the SPEC
//! ("Gaze Attention / route_topk": score[h, r] = q_h . desc[h / G, r], the k
//! best regions per (row, query, query head), ties to the lower region id,
//! ids ascending, -1 padding), and its argument checks.
//!
//! Two kinds of data. Integer-valued queries and descriptors (exact in every
//! element type, with sums far below 2^24) make the f32 scores exact, so the
//! routes must equal the oracle's exactly, ties (many: small integers, and
//! duplicated descriptors) and NaN descriptors included. Uniform random data
//! rounds differently in f32 and f64, so there the routes must be a valid top
//! k of the f64 scores up to f32 rounding.

use std::cmp::Ordering;

use foveal::route_topk::cpu::route_topk;
use foveal::{Element, Error, GazeLayout, GazeRow, Routes, View};
use foveal_tests::gaze_cases::{random_gaze_rows, GazeOpts};
use foveal_tests::{random_strides, rng, to_f64, Tensor, TestElem, Tol};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    batch: usize,
    queries: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    k: usize,
    exact: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..4,
        1usize..3,
        1usize..9,
        prop::sample::select(vec![1usize, 3, 8, 16]),
        1usize..12,
        any::<bool>(),
    )
        .prop_map(
            |(seed, batch, queries, kv_heads, group, head_dim, k, exact)| Case {
                seed,
                batch,
                queries,
                kv_heads,
                group,
                head_dim,
                k,
                exact,
            },
        )
}

/// Scores in f64 and their magnitudes (sum of |products|) for one list.
fn oracle_scores<T: Element>(
    q: &Tensor<T, 4>,
    desc: &Tensor<f32, 4>,
    b: usize,
    n: usize,
    h: usize,
    count: usize,
) -> Vec<(f64, f64)> {
    let g = q.shape[2] / desc.shape[1];
    (0..count)
        .map(|r| {
            let products: Vec<f64> = (0..q.shape[3])
                .map(|e| to_f64(q.get([b, n, h, e])) * desc.get([b, h / g, r, e]) as f64)
                .collect();
            (
                products.iter().sum(),
                products.iter().map(|x| x.abs()).sum(),
            )
        })
        .collect()
}

/// The exact rule: the `k` best of `scores` (NaN lowest, ties to the lower
/// id, -0.0 equal to +0.0), ascending.
fn oracle_top(scores: &[f64], k: usize) -> Vec<i32> {
    let rank = |a: &usize, b: &usize| -> Ordering {
        let (x, y) = (scores[*a], scores[*b]);
        match (x.is_nan(), y.is_nan()) {
            (false, false) => y.partial_cmp(&x).unwrap().then(a.cmp(b)),
            (nx, ny) => nx.cmp(&ny).then(a.cmp(b)),
        }
    };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(rank);
    order.truncate(k);
    order.sort_unstable();
    order.into_iter().map(|r| r as i32).collect()
}

/// Small integers (exact in bf16, f16 and f32), or uniform in [-2, 2).
fn value(r: &mut StdRng, exact: bool) -> f32 {
    if exact {
        r.random_range(-3..=3) as f32
    } else {
        r.random_range(-2.0..2.0)
    }
}

/// Descriptors `[B, Hkv, R, D]` in a random memory order; with `exact`, some
/// rows copy an earlier row of the same head (exact ties) and some hold a NaN.
/// Slots past each row's region count are NaN (the op must not read them).
fn random_desc(
    r: &mut StdRng,
    layout: &GazeLayout,
    kv_heads: usize,
    head_dim: usize,
    exact: bool,
) -> Tensor<f32, 4> {
    let shape = [
        layout.batch(),
        kv_heads,
        layout.max_regions() + r.random_range(0..2),
        head_dim,
    ];
    let strides = random_strides(r, shape);
    let mut desc = Tensor::from_fn(shape, strides, f32::NAN, |_| value(r, exact));
    for b in 0..shape[0] {
        for h in 0..kv_heads {
            for reg in 0..shape[2] {
                let row: Vec<f32> = if reg >= layout.regions(b) {
                    vec![f32::NAN; head_dim]
                } else if exact && reg > 0 && r.random_bool(0.2) {
                    let from = r.random_range(0..reg);
                    (0..head_dim).map(|e| desc.get([b, h, from, e])).collect()
                } else if exact && r.random_bool(0.05) {
                    (0..head_dim)
                        .map(|e| {
                            if e == 0 {
                                f32::NAN
                            } else {
                                desc.get([b, h, reg, e])
                            }
                        })
                        .collect()
                } else {
                    continue;
                };
                for (e, v) in row.into_iter().enumerate() {
                    let o = desc.offset([b, h, reg, e]);
                    desc.data[o] = v;
                }
            }
        }
    }
    desc
}

fn check_case<T: TestElem>(c: Case) {
    let mut r = rng(c.seed);
    let (seq, rows) = random_gaze_rows(
        &mut r,
        c.batch,
        GazeOpts {
            max_units: 2,
            max_side: 9,
        },
    );
    let layout = GazeLayout::new(seq, &rows).unwrap();
    let hq = c.kv_heads * c.group;
    let qshape = [c.batch, c.queries, hq, c.head_dim];
    let qs = random_strides(&mut r, qshape);
    let q: Tensor<T, 4> = Tensor::from_fn(qshape, qs, T::POISON, |_| {
        T::from_f32(value(&mut r, c.exact))
    });
    let desc = random_desc(&mut r, &layout, c.kv_heads, c.head_dim, c.exact);
    let mut routes = Routes::new(&layout, c.queries, hq, c.k);
    route_topk(q.view(), desc.view(), &layout, c.k, &mut routes).expect("route_topk");

    let mut want_ids = vec![-1i32; c.batch * c.queries * hq * c.k];
    for b in 0..c.batch {
        let count = layout.regions(b);
        for n in 0..c.queries {
            for h in 0..hq {
                let what = format!("{c:?}: row {b} ({count} regions), query {n}, head {h}");
                let list = ((b * c.queries + n) * hq + h) * c.k;
                let got = &routes.ids()[list..list + c.k];
                let kept = c.k.min(count);
                assert!(
                    got[kept..].iter().all(|&x| x == -1),
                    "{what}: padding {got:?}"
                );
                assert!(
                    got[..kept].windows(2).all(|w| w[0] < w[1]),
                    "{what}: not ascending {got:?}"
                );
                assert!(
                    got[..kept].iter().all(|&x| x >= 0 && (x as usize) < count),
                    "{what}: ids {got:?}"
                );
                let scored = oracle_scores(&q, &desc, b, n, h, count);
                let scores: Vec<f64> = scored.iter().map(|s| s.0).collect();
                let want = oracle_top(&scores, c.k);
                if c.exact {
                    assert_eq!(&got[..kept], &want[..], "{what}: scores {scores:?}");
                } else {
                    // a valid top k up to f32 rounding: nothing left out scores clearly above a kept one
                    let bound = |i: usize| Tol::F32.bound(scored[i].0, scored[i].1);
                    let is_kept = |i: usize| got[..kept].contains(&(i as i32));
                    for i in (0..count).filter(|&i| is_kept(i)) {
                        for j in (0..count).filter(|&j| !is_kept(j)) {
                            assert!(
                                scores[j] <= scores[i] + bound(i) + bound(j),
                                "{what}: left out {j} ({}) above kept {i} ({})",
                                scores[j],
                                scores[i]
                            );
                        }
                    }
                }
                want_ids[list..list + want.len()].copy_from_slice(&want);
            }
        }
    }
    if c.exact {
        let want = Routes::from_ids(&layout, c.queries, hq, c.k, &want_ids).unwrap();
        assert_eq!(routes, want, "{c:?}: the routes, tied to the layout");
    }
}

foveal_tests::oracle_proptests!(64, case(), check_case);

/// One row of five single-token regions.
fn five_regions() -> GazeLayout {
    let mut row = GazeRow::new();
    row.regions.extend((0..5).map(|p| vec![p]));
    GazeLayout::new(5, &[row]).unwrap()
}

/// Routes of one query and one head over descriptors with one dim.
fn route_1d(layout: &GazeLayout, q: f32, desc: &[f32], k: usize) -> Vec<i32> {
    let qv = [q];
    let mut routes = Routes::new(layout, 1, 1, k);
    route_topk(
        View::contiguous(&qv, [1, 1, 1, 1]).unwrap(),
        View::contiguous(desc, [1, 1, desc.len(), 1]).unwrap(),
        layout,
        k,
        &mut routes,
    )
    .unwrap();
    routes.ids().to_vec()
}

#[test]
fn ties_go_to_the_lower_id_and_nan_ranks_lowest() {
    let layout = five_regions();
    let d = [1.0, f32::NAN, 2.0, 1.0, -0.0];
    assert_eq!(route_1d(&layout, 1.0, &d, 1), vec![2]);
    assert_eq!(
        route_1d(&layout, 1.0, &d, 2),
        vec![0, 2],
        "1.0 at 0 and 3: the lower id"
    );
    assert_eq!(route_1d(&layout, 1.0, &d, 4), vec![0, 2, 3, 4]);
    assert_eq!(
        route_1d(&layout, 1.0, &d, 5),
        vec![0, 1, 2, 3, 4],
        "NaN last"
    );
    assert_eq!(
        route_1d(&layout, 1.0, &d, 7),
        vec![0, 1, 2, 3, 4, -1, -1],
        "k clamped, padded"
    );
    assert_eq!(
        route_1d(&layout, -1.0, &d, 2),
        vec![0, 4],
        "-1 * -0.0 = 0 first, then -1 at the lower id"
    );
    let zeros = [0.0, -0.0, 0.0, -0.0, 0.0];
    assert_eq!(
        route_1d(&layout, 1.0, &zeros, 3),
        vec![0, 1, 2],
        "-0.0 ties with +0.0"
    );
}

#[test]
fn gqa_heads_read_their_groups_descriptors() {
    // 2 KV heads, 4 query heads (G = 2): heads 0, 1 read KV head 0, heads 2, 3 KV head 1
    let layout = five_regions();
    let desc = [[0.0f32, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0, 0.0]].concat();
    let q = [1.0f32, -1.0, 1.0, -1.0];
    let mut routes = Routes::new(&layout, 1, 4, 2);
    route_topk(
        View::contiguous(&q, [1, 1, 4, 1]).unwrap(),
        View::contiguous(&desc, [1, 2, 5, 1]).unwrap(),
        &layout,
        2,
        &mut routes,
    )
    .unwrap();
    assert_eq!(routes.ids(), &[3, 4, 0, 1, 0, 1, 3, 4]);
}

#[test]
fn rows_without_regions_get_only_padding() {
    let layout = GazeLayout::new(
        5,
        &[GazeRow::new(), {
            let mut row = GazeRow::new();
            row.regions.push(vec![3]);
            row
        }],
    )
    .unwrap();
    let q = [1.0f32; 2 * 2];
    let desc = [f32::NAN, 7.0];
    let mut routes = Routes::new(&layout, 1, 2, 2);
    route_topk(
        View::contiguous(&q, [2, 1, 2, 1]).unwrap(),
        View::contiguous(&desc, [2, 1, 1, 1]).unwrap(),
        &layout,
        2,
        &mut routes,
    )
    .unwrap();
    assert_eq!(routes.ids(), &[-1, -1, -1, -1, 0, -1, 0, -1]);
}

#[test]
fn rejects_bad_arguments() {
    let layout = five_regions();
    let q = vec![1.0f32; 2 * 2 * 4 * 8];
    let desc = vec![1.0f32; 2 * 2 * 6 * 8];
    let qv = View::contiguous(&q[..2 * 4 * 8], [1, 2, 4, 8]).unwrap();
    let dv = View::contiguous(&desc[..2 * 5 * 8], [1, 2, 5, 8]).unwrap();
    let mut routes = Routes::from_ids(&layout, 2, 4, 3, &[1, 2, 3].repeat(8)).unwrap();
    let before = routes.clone();
    let mut go = |q: View<'_, f32, 4>, d: View<'_, f32, 4>, layout: &GazeLayout, k: usize| {
        route_topk(q, d, layout, k, &mut routes)
    };
    assert!(matches!(
        go(qv, dv, &layout, 0),
        Err(Error::Value { arg: "k", .. })
    ));
    let d2 = View::contiguous(&desc[..2 * 2 * 5 * 8], [2, 2, 5, 8]).unwrap();
    assert!(
        matches!(
            go(qv, d2, &layout, 3),
            Err(Error::Shape { arg: "desc", .. })
        ),
        "batch"
    );
    let d7 = View::contiguous(&desc[..2 * 5 * 7], [1, 2, 5, 7]).unwrap();
    assert!(
        matches!(
            go(qv, d7, &layout, 3),
            Err(Error::Shape { arg: "desc", .. })
        ),
        "head dim"
    );
    let d4 = View::contiguous(&desc[..2 * 4 * 8], [1, 2, 4, 8]).unwrap();
    assert!(
        matches!(
            go(qv, d4, &layout, 3),
            Err(Error::Shape { arg: "desc", .. })
        ),
        "fewer descriptors than regions"
    );
    let d3 = View::contiguous(&desc[..3 * 5 * 8], [1, 3, 5, 8]).unwrap();
    assert!(
        matches!(go(qv, d3, &layout, 3), Err(Error::Shape { arg: "q", .. })),
        "4 query heads over 3 KV heads"
    );
    let q2 = View::contiguous(&q, [2, 2, 4, 8]).unwrap();
    let dd = View::contiguous(&desc[..2 * 2 * 5 * 8], [2, 2, 5, 8]).unwrap();
    assert!(
        matches!(
            go(q2, dd, &layout, 3),
            Err(Error::Shape { arg: "layout", .. })
        ),
        "two rows of queries, one of layout"
    );
    assert!(
        matches!(
            go(qv, dv, &layout, 4),
            Err(Error::Shape { arg: "routes", .. })
        ),
        "routes made for k = 3"
    );
    let q1 = View::contiguous(&q[..4 * 8], [1, 1, 4, 8]).unwrap();
    assert!(
        matches!(
            go(q1, dv, &layout, 3),
            Err(Error::Shape { arg: "routes", .. })
        ),
        "routes made for 2 queries"
    );
    assert_eq!(routes, before, "changed on error");
    // and the same call with matching routes succeeds and ties them to the layout
    route_topk(qv, dv, &layout, 3, &mut routes).unwrap();
    assert_eq!(
        routes,
        Routes::from_ids(&layout, 2, 4, 3, &[0, 1, 2].repeat(8)).unwrap(),
        "all equal scores: the lowest ids"
    );
}
