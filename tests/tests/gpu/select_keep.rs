//! select_keep: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU).
//!
//! The two must agree exactly: same kept indices in the same order, same
//! counts, same -1 padding, including ties (logits drawn from a small set of
//! values, -0.0 beside +0.0), NaN and infinite logits, and the edge cases of
//! the rule (threshold 0 and 1, ratio 0 and 1, min_keep 0, past nv and
//! `usize::MAX`). Rows hold 0 to about 5,000 visual tokens. The device keep
//! set is reused from a previous call, so that a slot the kernel fails to
//! rewrite shows up as a stale index.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::{DevView, DeviceKeepSet, DeviceRowLayout};
use foveal::select_keep::{cpu, cuda};
use foveal::{Error, KeepRule, KeepSet, Layout, RowLayout, RowSpec};
use foveal_tests::gpu::{cases, gpu, in_sweep, upload};
use foveal_tests::{ratio_boundary_cases, rng, Tensor, TIES};
use rand::rngs::StdRng;
use rand::Rng;

/// A keep set whose every index and count is poison (`i32::MIN`), so that
/// an element select_keep fails to write (the -1 padding, a count) differs
/// from the CPU's.
fn poisoned_keep(stream: &Arc<CudaStream>, rows: &DeviceRowLayout) -> DeviceKeepSet {
    let mut keep = DeviceKeepSet::new(stream, rows).expect("device keep set");
    keep.poison_for_tests(stream).expect("poison");
    keep
}

fn rows_with_counts(nv: &[usize]) -> RowLayout {
    let seq = 2 * nv.iter().copied().max().unwrap_or(0) + 2;
    let rows: Vec<RowSpec> = nv
        .iter()
        .map(|&n| RowSpec {
            start: 0,
            end: 2 * n + 2,
            visual: (0..n).map(|i| 2 * i + 1).collect(),
        })
        .collect();
    RowLayout::new(seq, &rows).expect("rows")
}

/// Logits `[B, nv_max]` with row stride `nv_max + gap`, starting `offset`
/// elements into their storage; entries past a row's count, the gaps and the
/// leading offset are +inf, which would be kept first if the kernel read them.
/// `value(b, i)` gives the entries of each row, in order.
fn logits_for(
    rows: &RowLayout,
    gap: usize,
    offset: usize,
    mut value: impl FnMut(usize, usize) -> f32,
) -> Tensor<f32, 2> {
    let (batch, nv_max) = (rows.batch(), rows.nv_max());
    let ld = nv_max + gap;
    let inf = f32::INFINITY;
    let entry = |[b, i]: [usize; 2]| if i < rows.nv(b) { value(b, i) } else { inf };
    let mut t = Tensor::from_fn([batch, nv_max], [ld.max(1), 1], inf, entry).offset_by(offset, inf);
    // the gap after the last row too: `batch` whole rows of `ld`
    t.data.resize(t.data.len().max(offset + batch * ld), inf);
    t
}

/// The kinds of logit values a case draws from.
#[derive(Debug, Clone, Copy)]
enum Values {
    /// A small set with exact ties, -0.0 beside +0.0.
    Ties,
    /// Uniform in `[-8, 8)`.
    Uniform,
    /// Infinities, the extremes of f32, subnormals, zeros and values around 0.
    Extremes,
    /// One value for the whole row.
    Constant,
}

const EXTREMES: [f32; 12] = [
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1e-40,
    -1e-40,
    0.0,
    -0.0,
    1e-7,
    -1e-7,
];

fn draw(r: &mut StdRng, values: Values, nan: f64) -> f32 {
    if r.random_bool(nan) {
        return f32::NAN;
    }
    match values {
        Values::Ties => TIES[r.random_range(0..TIES.len())],
        Values::Uniform => r.random_range(-8.0f32..8.0),
        Values::Extremes => EXTREMES[r.random_range(0..EXTREMES.len())],
        Values::Constant => 0.5,
    }
}

/// A random rule: thresholds 0, 1, 0.5 (logit 0: a tie set that sits exactly
/// on it) and random; ratios absent, 0, 1, random, or hitting a row's count
/// exactly; min_keep 0, 1, random, past nv, `usize::MAX`.
fn random_rule(r: &mut StdRng, nv_max: usize) -> KeepRule {
    let threshold = match r.random_range(0..5) {
        0 => 0.0,
        1 => 1.0,
        2 => 0.5,
        _ => r.random_range(0.0f32..=1.0),
    };
    let max_ratio = match r.random_range(0..6) {
        0 | 1 => None,
        2 => Some(0.0),
        3 => Some(1.0),
        4 if nv_max > 0 => Some(r.random_range(0..=nv_max) as f64 / nv_max as f64),
        _ => Some(r.random_range(0.0f64..=1.0)),
    };
    let min_keep = match r.random_range(0..6) {
        0 => 0,
        1 | 2 => 1,
        3 => r.random_range(0..=nv_max + 2),
        4 => usize::MAX,
        _ => nv_max + 1,
    };
    KeepRule {
        threshold,
        max_ratio,
        min_keep,
    }
}

/// Row counts: empty rows, short rows, rows across the 512-thread block, and
/// (with `large`) rows of up to ~5,000 tokens.
fn random_counts(r: &mut StdRng, large: bool) -> Vec<usize> {
    let batch = r.random_range(1..=5);
    (0..batch)
        .map(|_| match r.random_range(0..10) {
            0 | 1 => 0,
            2..=5 => r.random_range(1..=20),
            6 | 7 => r.random_range(1..=700),
            _ if large => r.random_range(1000..=5000),
            _ => r.random_range(500..=1100),
        })
        .collect()
}

/// Runs the CUDA path into `keep` (which may hold a previous result).
fn run_gpu(
    stream: &Arc<CudaStream>,
    logits: &Tensor<f32, 2>,
    rows: &DeviceRowLayout,
    rule: &KeepRule,
    keep: &mut DeviceKeepSet,
) -> Result<(), Error> {
    let dev = logits.upload(stream);
    cuda::select_keep(stream, &logits.dev_view(&dev), rows, rule, keep)
}

fn run_cpu(logits: &Tensor<f32, 2>, rows: &RowLayout, rule: &KeepRule) -> KeepSet {
    let mut keep = KeepSet::new(rows);
    cpu::select_keep(logits.view(), rows, rule, &mut keep).expect("select_keep (CPU)");
    keep
}

/// Asserts the two keep sets are equal, reporting the first row that differs
/// (without printing thousands of indices).
fn assert_same(got: &KeepSet, want: &KeepSet, rows: &RowLayout, what: &str) {
    let (gi, gc) = got.packed();
    let (wi, wc) = want.packed();
    assert_eq!(gc.len(), wc.len(), "{what}: batch");
    assert_eq!(gi.len(), wi.len(), "{what}: index array length");
    let nv_max = rows.nv_max();
    for b in 0..rows.batch() {
        assert_eq!(gc[b], wc[b], "{what}: row {b} (nv {}): count", rows.nv(b));
        let (g, w) = (
            &gi[b * nv_max..(b + 1) * nv_max],
            &wi[b * nv_max..(b + 1) * nv_max],
        );
        if let Some(j) = (0..nv_max).find(|&j| g[j] != w[j]) {
            panic!(
                "{what}: row {b} (nv {}, count {}): slot {j}: GPU {}, CPU {}",
                rows.nv(b),
                wc[b],
                g[j],
                w[j]
            );
        }
    }
    assert!(
        got == want,
        "{what}: the keep sets differ in their bookkeeping (nv_max or layout id)"
    );
}

/// One random case: a first call with another rule and other logits leaves
/// stale indices in the device keep set, the second must overwrite them.
fn check_case(stream: &Arc<CudaStream>, r: &mut StdRng, large: bool, what: &str) {
    let nv = random_counts(r, large);
    let rows = rows_with_counts(&nv);
    let values = [
        Values::Ties,
        Values::Uniform,
        Values::Extremes,
        Values::Constant,
    ][r.random_range(0..4)];
    let nan = [0.0, 0.0, 0.05, 0.5][r.random_range(0..4)];
    let gap = r.random_range(0..=3);
    let offset = r.random_range(0..=1);
    let logits = logits_for(&rows, gap, offset, |_, _| draw(r, values, nan));
    let rule = random_rule(r, rows.nv_max());
    let what = format!("{what}: nv {nv:?}, {values:?}, NaN {nan}, {rule:?}");

    let dev_rows = DeviceRowLayout::new(stream, &rows).expect("device rows");
    let mut keep = poisoned_keep(stream, &dev_rows);
    run_gpu(stream, &logits, &dev_rows, &rule, &mut keep).expect("select_keep (CUDA)");
    let got = keep.to_host(stream).expect("readback");
    assert_same(&got, &run_cpu(&logits, &rows, &rule), &rows, &what);
}

#[test]
fn matches_cpu_on_random_cases() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(11);
    for n in 0..cases(200) {
        check_case(&stream, &mut r, n % 10 == 9, &format!("case {n}"));
    }
}

/// The ratio cap at products within 1e-3 of an integer (nv up to 65,536):
/// the kernel keeps exactly `floor(r * nv)` of the f64 product, evaluated
/// here, and the same set as the CPU (every token passes t = 0, so the cap
/// decides). Several rows per launch, each with its own nv.
#[test]
fn ratio_cap_at_integer_boundaries() {
    let Some(stream) = gpu() else { return };
    let all = ratio_boundary_cases(7, 150);
    let total = all.len();
    for (n, &(ratio, nv)) in all.iter().enumerate() {
        if !in_sweep(n, total) {
            continue;
        }
        // the row under test, beside a shorter and an empty one
        let counts = [nv, nv / 3, 0];
        let rows = rows_with_counts(&counts);
        let logits = logits_for(&rows, 0, 0, |b, i| ((i * 7919 + b) % 1009) as f32);
        let rule = KeepRule {
            threshold: 0.0,
            max_ratio: Some(ratio),
            min_keep: 0,
        };
        let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
        let mut keep = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
        run_gpu(&stream, &logits, &dev_rows, &rule, &mut keep).expect("select_keep (CUDA)");
        let got = keep.to_host(&stream).expect("readback");
        for (b, &count) in counts.iter().enumerate() {
            let want = (ratio * count as f64).floor() as usize;
            assert_eq!(
                got.kept(b).len(),
                want,
                "row {b}: r {ratio:?}, nv {count}, r * nv = {:?}",
                ratio * count as f64
            );
        }
        let what = format!("r {ratio:?}, nv {counts:?}");
        assert_same(&got, &run_cpu(&logits, &rows, &rule), &rows, &what);
    }
}

/// Every combination of a grid of rules on rows built to sit on the edges:
/// empty rows, one token, all ties, all NaN, -inf beside NaN, counts around
/// the 512-thread block and its multiples.
#[test]
fn matches_cpu_on_rule_edges() {
    let Some(stream) = gpu() else { return };
    let nv = [0, 1, 7, 511, 512, 513, 1025, 2500];
    let rows = rows_with_counts(&nv);
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let mut r = rng(12);
    // the logit of token i of row b
    type Pattern = fn(&mut StdRng, usize, usize) -> f32;
    let patterns: [(&str, Pattern); 6] = [
        ("ties", |r, _, _| TIES[r.random_range(0..TIES.len())]),
        ("constant", |_, _, _| 0.0),
        ("all NaN", |_, _, _| f32::NAN),
        ("NaN and -inf", |_, _, i| {
            if i % 2 == 0 {
                f32::NAN
            } else {
                f32::NEG_INFINITY
            }
        }),
        ("descending", |_, _, i| -(i as f32)),
        ("row-dependent ascending", |_, b, i| {
            (i as f32 - b as f32 * 50.0) * 0.01
        }),
    ];
    let mut item = 0;
    for (name, pattern) in &patterns {
        let logits = logits_for(&rows, 1, 0, |b, i| pattern(&mut r, b, i));
        for threshold in [0.0, 0.3, 0.5, 1.0] {
            for max_ratio in [None, Some(0.0), Some(0.1), Some(0.5), Some(1.0)] {
                for min_keep in [0, 1, 3, 600, usize::MAX] {
                    item += 1;
                    if !in_sweep(item - 1, 6 * 4 * 5 * 5) {
                        continue;
                    }
                    let rule = KeepRule {
                        threshold,
                        max_ratio,
                        min_keep,
                    };
                    let mut keep = poisoned_keep(&stream, &dev_rows);
                    run_gpu(&stream, &logits, &dev_rows, &rule, &mut keep)
                        .expect("select_keep (CUDA)");
                    let got = keep.to_host(&stream).expect("readback");
                    assert_same(
                        &got,
                        &run_cpu(&logits, &rows, &rule),
                        &rows,
                        &format!("{name}, {rule:?}"),
                    );
                }
            }
        }
    }
}

/// A batch in which no row has a visual token: logits `[B, 0]`, counts 0.
#[test]
fn batch_without_visual_tokens() {
    let Some(stream) = gpu() else { return };
    let rows = rows_with_counts(&[0, 0, 0]);
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let logits = logits_for(&rows, 0, 0, |_, _| 0.0);
    for rule in [
        KeepRule::default(),
        KeepRule::keep_all(),
        KeepRule {
            threshold: 0.0,
            max_ratio: Some(1.0),
            min_keep: 5,
        },
    ] {
        let mut keep = poisoned_keep(&stream, &dev_rows);
        run_gpu(&stream, &logits, &dev_rows, &rule, &mut keep).expect("select_keep (CUDA)");
        let got = keep.to_host(&stream).expect("readback");
        assert_same(
            &got,
            &run_cpu(&logits, &rows, &rule),
            &rows,
            &format!("{rule:?}"),
        );
        assert!((0..3).all(|b| got.kept(b).is_empty()));
    }
}

/// The same inputs give the same keep set: twice on one stream, once more on
/// another.
#[test]
fn deterministic_runs() {
    let Some(stream) = gpu() else { return };
    let other = gpu().expect("a second stream");
    let mut r = rng(13);
    for n in 0..cases(20) {
        let nv = random_counts(&mut r, true);
        let rows = rows_with_counts(&nv);
        let values = if n % 2 == 0 {
            Values::Ties
        } else {
            Values::Uniform
        };
        let logits = logits_for(&rows, 0, 0, |_, _| draw(&mut r, values, 0.05));
        let rule = random_rule(&mut r, rows.nv_max());
        let mut sets = Vec::new();
        for s in [&stream, &stream, &other] {
            let dev_rows = DeviceRowLayout::new(s, &rows).expect("device rows");
            let mut keep = poisoned_keep(s, &dev_rows);
            run_gpu(s, &logits, &dev_rows, &rule, &mut keep).expect("select_keep (CUDA)");
            sets.push(keep.to_host(s).expect("readback"));
        }
        assert_same(&sets[1], &sets[0], &rows, &format!("case {n}: second run"));
        assert_same(
            &sets[2],
            &sets[0],
            &rows,
            &format!("case {n}: run on another stream"),
        );
    }
}

/// Refused before launching: the keep set untouched (still all -1, counts 0).
fn assert_refused(
    stream: &Arc<CudaStream>,
    res: Result<(), Error>,
    keep: &DeviceKeepSet,
    rows: &RowLayout,
    what: &str,
    check: impl Fn(&Error) -> bool,
) {
    match res {
        Err(e) if check(&e) => {}
        other => panic!("{what}: wrong result {other:?}"),
    }
    let host = keep.to_host(stream).expect("readback");
    let (idx, count) = host.packed();
    assert_eq!(count.len(), rows.batch(), "{what}: batch");
    assert!(
        idx.iter().all(|&i| i == -1) && count.iter().all(|&c| c == 0),
        "{what}: the keep set was written"
    );
}

#[test]
fn refuses_keep_set_of_another_layout() {
    let Some(stream) = gpu() else { return };
    let rows = rows_with_counts(&[3, 5]);
    let other = rows_with_counts(&[3, 6]);
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let dev_other = DeviceRowLayout::new(&stream, &other).expect("device rows");
    let logits = logits_for(&rows, 0, 0, |_, i| i as f32);
    let mut keep = DeviceKeepSet::new(&stream, &dev_other).expect("device keep set");
    let res = run_gpu(&stream, &logits, &dev_rows, &KeepRule::default(), &mut keep);
    assert_refused(
        &stream,
        res,
        &keep,
        &other,
        "keep set sized for another layout",
        |e| {
            matches!(
                e,
                Error::Shape {
                    op: "select_keep",
                    arg: "keep",
                    ..
                }
            )
        },
    );
}

#[test]
fn refuses_logits_of_wrong_shape_and_bad_rules() {
    let Some(stream) = gpu() else { return };
    let rows = rows_with_counts(&[3, 5]);
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let mut keep = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
    let dev = upload(&stream, &[0.0f32; 16]);
    let wrong = DevView::new(dev.as_view(), Layout::contiguous([2, 4])).expect("view");
    let res = cuda::select_keep(&stream, &wrong, &dev_rows, &KeepRule::default(), &mut keep);
    assert_refused(
        &stream,
        res,
        &keep,
        &rows,
        "logits [2, 4] for nv_max 5",
        |e| matches!(e, Error::Shape { arg: "logits", .. }),
    );
    let logits = logits_for(&rows, 0, 0, |_, i| i as f32);
    for rule in [
        KeepRule {
            threshold: 1.5,
            ..KeepRule::default()
        },
        KeepRule {
            threshold: f32::NAN,
            ..KeepRule::default()
        },
        KeepRule {
            max_ratio: Some(-0.1),
            ..KeepRule::default()
        },
        KeepRule {
            max_ratio: Some(1.01),
            ..KeepRule::default()
        },
    ] {
        let res = run_gpu(&stream, &logits, &dev_rows, &rule, &mut keep);
        assert_refused(&stream, res, &keep, &rows, &format!("{rule:?}"), |e| {
            matches!(e, Error::Value { .. })
        });
    }
}
