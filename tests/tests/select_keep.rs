//! select_keep: the CPU reference against an oracle that follows the SPEC
//! literally ("GlimpsePrune / select_keep"), and its argument checks.
//!
//! Oracle, per row: `p = sigmoid(logit)` in f64; keep `p > t`; if a max ratio
//! `r` is given and more than `floor(r * nv)` pass, keep the `floor(r * nv)`
//! largest `p`; then, while fewer than `min(m, nv)` are kept, add the largest
//! `p` not yet kept. Ranking: larger `p` first, ties to the lower index, NaN
//! last. Random logits stay in [-8, 8], where the f64 sigmoid is strictly
//! increasing, so ranking by `p` is exact there; saturated logits (where `p`
//! rounds to 0 or 1) are tested apart, against the documented choice of
//! ranking and thresholding on the logit itself.

use std::cmp::Ordering;

use foveal::select_keep::cpu::select_keep;
use foveal::{Error, KeepRule, KeepSet, RowLayout, RowSpec, View};
use foveal_tests::{random_logits, random_rows, random_strides, rng, RowOpts, Tensor};
use proptest::prelude::*;
use rand::Rng;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The order of two candidates `(p, logit, index)`: `Less` ranks first.
/// Larger `p` first; equal `p` (only where f64 saturates) by the larger logit;
/// then the lower index; NaN after every number.
fn rank(a: (f64, f64, usize), b: (f64, f64, usize)) -> Ordering {
    match (a.0.is_nan(), b.0.is_nan()) {
        (true, true) => a.2.cmp(&b.2),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => {
            b.0.partial_cmp(&a.0)
                .unwrap()
                .then(b.1.partial_cmp(&a.1).unwrap())
                .then(a.2.cmp(&b.2))
        }
    }
}

/// The SPEC's rule on one row of logits; the kept indices ascending.
fn oracle_row(x: &[f32], rule: &KeepRule) -> Vec<usize> {
    let nv = x.len();
    let cand = |i: usize| (sigmoid(x[i] as f64), x[i] as f64, i);
    let t = rule.threshold as f64;
    let mut keep: Vec<usize> = (0..nv).filter(|&i| cand(i).0 > t).collect();
    if let Some(r) = rule.max_ratio {
        let cap = (r * nv as f64).floor() as usize;
        if keep.len() > cap {
            keep.sort_by(|&i, &j| rank(cand(i), cand(j)));
            keep.truncate(cap);
        }
    }
    let want = rule.min_keep.min(nv);
    while keep.len() < want {
        let best = (0..nv)
            .filter(|i| !keep.contains(i))
            .min_by(|&i, &j| rank(cand(i), cand(j)))
            .unwrap();
        keep.push(best);
    }
    keep.sort_unstable();
    keep
}

/// Checks the structure of a filled keep set (`[B, nv_max]` ascending, padded
/// with -1, counts within `0..=nv`) and returns its rows.
fn rows_of(keep: &KeepSet, layout: &RowLayout) -> Vec<Vec<usize>> {
    let (idx, count) = keep.packed();
    let nv_max = layout.nv_max();
    assert_eq!(idx.len(), layout.batch() * nv_max);
    assert_eq!(count.len(), layout.batch());
    (0..layout.batch())
        .map(|b| {
            let n = count[b];
            assert!(
                n >= 0 && n as usize <= layout.nv(b),
                "row {b}: count {n} outside 0..={}",
                layout.nv(b)
            );
            let row = &idx[b * nv_max..(b + 1) * nv_max];
            let (kept, pad) = row.split_at(n as usize);
            assert!(
                kept.windows(2).all(|w| w[0] < w[1]),
                "row {b}: kept indices not strictly ascending: {kept:?}"
            );
            assert!(
                kept.iter().all(|&i| i >= 0 && (i as usize) < layout.nv(b)),
                "row {b}: index out of range: {kept:?}"
            );
            assert!(
                pad.iter().all(|&i| i == -1),
                "row {b}: padding must be -1: {row:?}"
            );
            assert_eq!(keep.kept(b), kept);
            kept.iter().map(|&i| i as usize).collect()
        })
        .collect()
}

/// Runs the reference on `logits` (one `Vec` per row, padded in storage with
/// NaN) and returns the kept rows after the structural checks.
fn run(logits: &[Vec<f32>], rule: &KeepRule) -> Vec<Vec<usize>> {
    let rows: Vec<RowSpec> = logits
        .iter()
        .map(|l| RowSpec {
            start: 0,
            end: l.len() + 1,
            visual: (0..l.len()).collect(),
        })
        .collect();
    let seq = rows.iter().map(|r| r.end).max().unwrap();
    let layout = RowLayout::new(seq, &rows).unwrap();
    let nv_max = layout.nv_max();
    let mut data = vec![f32::NAN; logits.len() * nv_max];
    for (b, l) in logits.iter().enumerate() {
        data[b * nv_max..b * nv_max + l.len()].copy_from_slice(l);
    }
    let mut keep = KeepSet::new(&layout);
    select_keep(
        View::contiguous(&data, [logits.len(), nv_max]).unwrap(),
        &layout,
        rule,
        &mut keep,
    )
    .unwrap();
    rows_of(&keep, &layout)
}

/// [`run`] on a single row.
fn run1(logits: &[f32], rule: &KeepRule) -> Vec<usize> {
    run(&[logits.to_vec()], rule).remove(0)
}

fn rule(threshold: f32, max_ratio: Option<f64>, min_keep: usize) -> KeepRule {
    KeepRule {
        threshold,
        max_ratio,
        min_keep,
    }
}

/// Runs `rule` on each row and compares every row with the oracle.
fn check_rows(logits: &[Vec<f32>], rule: &KeepRule) {
    let got = run(logits, rule);
    for (b, l) in logits.iter().enumerate() {
        assert_eq!(
            got[b],
            oracle_row(l, rule),
            "row {b}, logits {l:?}, {rule:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Random cases
// ---------------------------------------------------------------------------

fn random_rule(r: &mut rand::rngs::StdRng, nv_max: usize) -> KeepRule {
    let threshold = match r.random_range(0..6) {
        0 => 0.0,
        1 => 1.0,
        2 => 0.5,
        _ => r.random_range(0.0f32..=1.0),
    };
    let max_ratio = match r.random_range(0..7) {
        0 | 1 => None,
        2 => Some(0.0),
        3 => Some(1.0),
        4 => Some([0.125, 0.25, 0.5, 0.75][r.random_range(0..4)]),
        _ => Some(r.random_range(0.0f64..=1.0)),
    };
    let min_keep = match r.random_range(0..6) {
        0 => 0,
        1 => usize::MAX,
        2 => 1,
        _ => r.random_range(0..=nv_max + 2),
    };
    KeepRule {
        threshold,
        max_ratio,
        min_keep,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random ragged layouts (rows without visual tokens included), random
    /// logits (exact ties and NaN included), random rules; the logits tensor
    /// in a non-contiguous layout; the keep set reused from an earlier call.
    #[test]
    fn matches_oracle(seed in any::<u64>(), batch in 1usize..=4, seq in 1usize..=200) {
        let mut r = rng(seed);
        let rows = random_rows(&mut r, batch, seq, RowOpts { glimpse_text: false, ..RowOpts::default() });
        let layout = RowLayout::new(seq, &rows).unwrap();
        let nv: Vec<usize> = rows.iter().map(|row| row.visual.len()).collect();
        let nv_max = layout.nv_max();
        let mut keep = KeepSet::new(&layout);
        for _round in 0..3 {
            let nan = if r.random_bool(0.3) { 0.1 } else { 0.0 };
            let flat = random_logits(&mut r, &nv, nv_max, nan);
            let shape = [batch, nv_max];
            let strides = random_strides(&mut r, shape);
            let logits = Tensor::from_fn(shape, strides, f32::NAN, |[b, i]| flat[b * nv_max + i]);
            let rule = random_rule(&mut r, nv_max);
            select_keep(logits.view(), &layout, &rule, &mut keep).unwrap();
            let got = rows_of(&keep, &layout);
            for b in 0..batch {
                let row_logits = &flat[b * nv_max..b * nv_max + nv[b]];
                prop_assert_eq!(&got[b], &oracle_row(row_logits, &rule), "row {} logits {:?} {:?}", b, row_logits, rule);
            }
        }
    }

    /// Rows of many exact ties: the kept set is the oracle's, ties to the
    /// lower index.
    #[test]
    fn ties_go_to_the_lower_index(seed in any::<u64>(), nv in 1usize..=40) {
        let mut r = rng(seed);
        let values = [-1.0f32, 0.25, 0.25, 2.0];
        let logits: Vec<f32> = (0..nv).map(|_| values[r.random_range(0..values.len())]).collect();
        let rule = rule(0.0, Some(r.random_range(0.0f64..=1.0)), r.random_range(0..=nv));
        check_rows(&[logits], &rule);
    }
}

// ---------------------------------------------------------------------------
// Edge cases of the rule
// ---------------------------------------------------------------------------

const ROW: [f32; 8] = [0.3, -1.0, 2.0, 0.9, -0.2, 2.0, 1.5, -3.0];

#[test]
fn ratio_zero_keeps_only_min_keep() {
    assert_eq!(run1(&ROW, &rule(0.5, Some(0.0), 0)), Vec::<usize>::new());
    // the single largest, ties (2.0 at 2 and 5) to the lower index
    assert_eq!(run1(&ROW, &rule(0.5, Some(0.0), 1)), vec![2]);
    check_rows(&[ROW.to_vec()], &rule(0.5, Some(0.0), 3));
}

#[test]
fn ratio_one_is_no_cap() {
    for t in [0.0, 0.3, 0.5, 0.7, 1.0] {
        let capped = run(&[ROW.to_vec()], &rule(t, Some(1.0), 0));
        let free = run(&[ROW.to_vec()], &rule(t, None, 0));
        assert_eq!(capped, free, "threshold {t}");
        check_rows(&[ROW.to_vec()], &rule(t, Some(1.0), 0));
    }
}

#[test]
fn ratio_times_nv_exactly_integer() {
    // 8 tokens, every one over t = 0: floor(0.25 * 8) = 2 and floor(0.5 * 8) = 4 exactly.
    assert_eq!(run1(&ROW, &rule(0.0, Some(0.25), 0)), vec![2, 5]);
    assert_eq!(run1(&ROW, &rule(0.0, Some(0.5), 0)), vec![2, 3, 5, 6]);
    assert_eq!(run1(&ROW, &rule(0.0, Some(0.75), 0)).len(), 6);
    // and when fewer than the cap pass, the cap does not add any: p > 0.5
    // holds for 0.3, 2.0, 0.9, 2.0, 1.5 (5 tokens) under a cap of 6.
    assert_eq!(run1(&ROW, &rule(0.5, Some(0.75), 0)), vec![0, 2, 3, 5, 6]);
}

/// The cap is the floor of the f64 product of the caller's ratio, with no
/// tolerance (SPEC select_keep): 0.7 * 10 is exactly 7 in f64 and 0.3 * 10
/// exactly 3, while a product that is really below an integer floors, however
/// close it is (0.111 * 9009 = 999.999 keeps 999, not 1,000).
#[test]
fn ratio_cap_is_the_floor_of_the_f64_product() {
    let row: Vec<f32> = (0..10).map(|i| i as f32).collect();
    assert_eq!(run1(&row, &rule(0.0, Some(0.7), 0)).len(), 7);
    assert_eq!(run1(&row, &rule(0.0, Some(0.3), 0)).len(), 3);
    assert_eq!(run1(&row, &rule(0.0, Some(0.69), 0)).len(), 6);
    let row: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    assert_eq!(run1(&row, &rule(0.0, Some(0.29), 0)).len(), 290);
    assert_eq!(run1(&row, &rule(0.0, Some(0.2899), 0)).len(), 289);
    for (r, nv, want) in [(0.111, 9009, 999), (0.333, 3003, 999), (0.7, 10, 7)] {
        let row: Vec<f32> = (0..nv).map(|i| (i % 97) as f32).collect();
        assert_eq!(
            run1(&row, &rule(0.0, Some(r), 0)).len(),
            want,
            "r {r}, nv {nv}"
        );
    }
}

/// Ratios whose product with nv lies within 1e-3 of an integer, on both
/// sides, nv up to 65,536: the count is `floor(r * nv)` of the f64 product,
/// evaluated here (every token passes t = 0, so the cap decides).
#[test]
fn ratio_cap_at_integer_boundaries() {
    for (r, nv) in foveal_tests::ratio_boundary_cases(7, 150) {
        let want = (r * nv as f64).floor() as usize;
        let row: Vec<f32> = (0..nv).map(|i| ((i * 7919) % 1009) as f32).collect();
        let got = run1(&row, &rule(0.0, Some(r), 0));
        assert_eq!(
            got.len(),
            want,
            "r {r:?}, nv {nv}, r * nv = {:?}",
            r * nv as f64
        );
        // and the kept tokens are the largest ones (the oracle's ranking is
        // slow in a debug build: shorter rows only)
        if nv <= 4096 {
            assert_eq!(
                got,
                oracle_row(&row, &rule(0.0, Some(r), 0)),
                "r {r:?}, nv {nv}"
            );
        }
    }
}

#[test]
fn min_keep_larger_than_nv_keeps_all() {
    for m in [8, 9, 100, usize::MAX] {
        assert_eq!(
            run1(&ROW, &rule(1.0, Some(0.0), m)),
            (0..8).collect::<Vec<_>>(),
            "min_keep {m}"
        );
    }
    // min_keep between the count and nv adds the largest remaining
    assert_eq!(run1(&ROW, &rule(0.9, None, 3)), vec![2, 5, 6]);
}

#[test]
fn rows_without_visual_tokens() {
    let rows = [vec![], ROW.to_vec(), vec![], vec![-5.0]];
    for rule in [
        rule(0.5, None, 1),
        rule(0.0, Some(0.5), 3),
        KeepRule::keep_all(),
        KeepRule::default(),
    ] {
        let got = run(&rows, &rule);
        assert!(got[0].is_empty() && got[2].is_empty(), "{rule:?}: {got:?}");
        check_rows(&rows, &rule);
    }
    // a batch where no row has a visual token at all (nv_max = 0)
    let got = run(&[vec![], vec![]], &KeepRule::keep_all());
    assert_eq!(got, vec![Vec::<usize>::new(), vec![]]);
}

#[test]
fn threshold_zero_and_one() {
    // t = 0: every finite logit has p > 0
    assert_eq!(run1(&ROW, &rule(0.0, None, 0)), (0..8).collect::<Vec<_>>());
    // t = 1: no p exceeds 1; only min_keep
    assert_eq!(run1(&ROW, &rule(1.0, None, 0)), Vec::<usize>::new());
    assert_eq!(run1(&ROW, &rule(1.0, None, 2)), vec![2, 5]);
    // strict: a logit of exactly 0 (p = 0.5) does not pass t = 0.5, +0 and -0 alike
    assert_eq!(
        run1(&[0.0, -0.0, 1e-6, -1e-6], &rule(0.5, None, 0)),
        vec![2]
    );
}

#[test]
fn keep_all_keeps_every_token() {
    let rows = [
        ROW.to_vec(),
        vec![f32::NAN, -50.0, f32::NEG_INFINITY],
        vec![],
        vec![30.0; 5],
    ];
    let got = run(&rows, &KeepRule::keep_all());
    for (b, l) in rows.iter().enumerate() {
        assert_eq!(got[b], (0..l.len()).collect::<Vec<_>>(), "row {b}");
    }
}

#[test]
fn default_rule_is_the_spec_default() {
    let d = KeepRule::default();
    assert_eq!((d.threshold, d.max_ratio, d.min_keep), (0.5, None, 1));
    // all below the threshold: min_keep 1 keeps the argmax
    assert_eq!(run1(&[-3.0, -1.0, -2.0], &d), vec![1]);
}

#[test]
fn nan_never_passes_and_ranks_last() {
    let l = vec![f32::NAN, 1.0, f32::NAN, -1.0];
    assert_eq!(run1(&l, &rule(0.5, None, 0)), vec![1]);
    assert_eq!(
        run1(&l, &rule(0.0, None, 0)),
        vec![1, 3],
        "t = 0 must not let NaN through"
    );
    assert_eq!(run1(&l, &rule(0.5, None, 2)), vec![1, 3]);
    // the third pick is a NaN, the lower-indexed one
    assert_eq!(run1(&l, &rule(0.5, None, 3)), vec![0, 1, 3]);
    assert_eq!(run1(&l, &rule(0.5, None, 4)), vec![0, 1, 2, 3]);
    // a capped row of NaN and numbers keeps the numbers
    assert_eq!(
        run1(&[f32::NAN, -7.0, f32::NAN, -6.0], &rule(0.0, Some(0.5), 0)),
        vec![1, 3]
    );
}

/// "A NaN logit ranks below every number" (select_keep/mod.rs): -inf is a
/// number, so it ranks above a NaN, even one at a lower index.
#[test]
fn nan_ranks_below_negative_infinity() {
    assert_eq!(
        run1(&[f32::NAN, f32::NEG_INFINITY], &rule(0.5, None, 1)),
        vec![1]
    );
}

/// Where f32 (and f64) sigmoid saturates, the reference ranks and thresholds
/// on the logit itself (the documented choice): 40 beats 30 though both give
/// p = 1.0 in f32, and a very negative finite logit still has p > 0.
#[test]
fn saturated_logits_rank_by_logit() {
    let l = vec![30.0, 40.0, 35.0, 40.0, 20.0];
    assert_eq!(run1(&l, &rule(0.5, Some(0.2), 0)), vec![1]);
    assert_eq!(run1(&l, &rule(0.5, Some(0.4), 0)), vec![1, 3]);
    assert_eq!(run1(&l, &rule(0.5, Some(0.6), 0)), vec![1, 2, 3]);
    assert_eq!(run1(&[30.0, 40.0], &rule(1.0, None, 1)), vec![1]);
    // t = 1 is never exceeded, even by a saturated logit
    assert_eq!(run1(&l, &rule(1.0, None, 0)), Vec::<usize>::new());
    // the low end: -200 and -100 both give p = 0 in f64, but p > 0 holds exactly
    let low = vec![-200.0, -100.0, f32::NEG_INFINITY, -150.0];
    assert_eq!(run1(&low, &rule(0.0, None, 0)), vec![0, 1, 3]);
    assert_eq!(run1(&low, &rule(0.5, None, 1)), vec![1]);
    assert_eq!(run1(&low, &rule(0.5, None, 2)), vec![1, 3]);
    // +inf ranks first
    assert_eq!(
        run1(&[40.0, f32::INFINITY, 50.0], &rule(1.0, None, 1)),
        vec![1]
    );
}

// ---------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------

fn layout_of(nv: &[usize]) -> RowLayout {
    let rows: Vec<RowSpec> = nv
        .iter()
        .map(|&n| RowSpec {
            start: 0,
            end: n + 1,
            visual: (0..n).collect(),
        })
        .collect();
    RowLayout::new(nv.iter().max().unwrap() + 1, &rows).unwrap()
}

/// Runs the reference and, when it fails, checks the keep set was left as it was.
fn try_run(
    logits_shape: [usize; 2],
    layout: &RowLayout,
    rule: &KeepRule,
    keep: &mut KeepSet,
) -> Result<(), Error> {
    let data = vec![0.7f32; logits_shape[0] * logits_shape[1]];
    let before = keep.clone();
    let res = select_keep(
        View::contiguous(&data, logits_shape).unwrap(),
        layout,
        rule,
        keep,
    );
    if res.is_err() {
        assert_eq!(*keep, before, "a failed call must not touch the keep set");
    }
    res
}

#[test]
fn rejects_threshold_outside_unit_interval() {
    let layout = layout_of(&[3, 5]);
    for t in [
        -0.1,
        1.0001,
        2.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ] {
        let mut keep = KeepSet::new(&layout);
        let res = try_run([2, 5], &layout, &rule(t, None, 1), &mut keep);
        assert!(
            matches!(
                res,
                Err(Error::Value {
                    op: "select_keep",
                    arg: "threshold",
                    ..
                })
            ),
            "t {t}: {res:?}"
        );
    }
}

#[test]
fn rejects_ratio_outside_unit_interval() {
    let layout = layout_of(&[3, 5]);
    for r in [-0.1, -0.0001, 1.0001, 3.0, f64::NAN, f64::INFINITY] {
        let mut keep = KeepSet::new(&layout);
        let res = try_run([2, 5], &layout, &rule(0.5, Some(r), 1), &mut keep);
        assert!(
            matches!(
                res,
                Err(Error::Value {
                    op: "select_keep",
                    arg: "max_ratio",
                    ..
                })
            ),
            "r {r}: {res:?}"
        );
    }
}

#[test]
fn rejects_wrong_logits_shape() {
    let layout = layout_of(&[3, 5]);
    for shape in [[2, 4], [2, 6], [1, 5], [3, 5], [5, 2]] {
        let mut keep = KeepSet::new(&layout);
        let res = try_run(shape, &layout, &KeepRule::default(), &mut keep);
        assert!(
            matches!(
                res,
                Err(Error::Shape {
                    op: "select_keep",
                    arg: "logits",
                    ..
                })
            ),
            "{shape:?}: {res:?}"
        );
    }
    let mut keep = KeepSet::new(&layout);
    try_run([2, 5], &layout, &KeepRule::default(), &mut keep).unwrap();
}

#[test]
fn rejects_keep_set_sized_for_another_layout() {
    let layout = layout_of(&[3, 5]);
    for other in [layout_of(&[3, 4]), layout_of(&[3, 5, 1]), layout_of(&[5])] {
        let mut keep = KeepSet::new(&other);
        let res = try_run([2, 5], &layout, &KeepRule::default(), &mut keep);
        assert!(
            matches!(
                res,
                Err(Error::Shape {
                    op: "select_keep",
                    arg: "keep",
                    ..
                })
            ),
            "{res:?}"
        );
    }
}

/// A selection made elsewhere enters through KeepSet::from_rows, checked:
/// indices ascending and below the row's visual count; and it then serves
/// keep_positions like select_keep's output.
#[test]
fn keep_set_from_rows_checks_and_packs() {
    let layout = RowLayout::new(
        12,
        &[
            RowSpec {
                start: 0,
                end: 10,
                visual: vec![2, 3, 4, 5],
            },
            RowSpec {
                start: 4,
                end: 12,
                visual: vec![6, 7],
            },
        ],
    )
    .unwrap();
    let set = KeepSet::from_rows(&layout, &[vec![0, 3], vec![]]).unwrap();
    assert_eq!(set.kept(0), &[0, 3]);
    assert_eq!(set.kept(1), &[] as &[i32]);
    assert_eq!(set.packed().0, &[0, 3, -1, -1, -1, -1, -1, -1]);
    let bad = |kept: &[Vec<usize>]| KeepSet::from_rows(&layout, kept).unwrap_err();
    assert!(
        matches!(bad(&[vec![4], vec![]]), Error::Index { arg: "kept", .. }),
        "index past nv"
    );
    assert!(
        matches!(bad(&[vec![1], vec![2]]), Error::Index { arg: "kept", .. }),
        "row 1 has 2 visual tokens"
    );
    assert!(
        matches!(bad(&[vec![2, 1], vec![]]), Error::Value { arg: "kept", .. }),
        "descending"
    );
    assert!(
        matches!(bad(&[vec![1, 1], vec![]]), Error::Value { arg: "kept", .. }),
        "repeated"
    );
    assert!(
        matches!(bad(&[vec![1]]), Error::Shape { arg: "kept", .. }),
        "missing row"
    );
}
