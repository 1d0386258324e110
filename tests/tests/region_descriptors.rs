//! region_descriptors: the CPU reference against an f64 oracle written from
//! the SPEC ("Gaze Attention / region_descriptors": the mean key of each
//! region, per KV head), the incremental contract (only the regions of the
//! range are written) and the argument checks.
//!
//! The oracle reads the regions from the `GazeRow`s, not from the layout, and
//! the keys through the test tensor's own offsets. Descriptors are f32 sums
//! of exactly converted inputs whatever the key type, so the f32 tolerance
//! applies to every type, relative to the mean magnitude of the summed keys.

use std::ops::Range;

use foveal::region_descriptors::cpu::region_descriptors;
use foveal::{Element, Error, GazeLayout, GazeRow, Layout, View, ViewMut};
use foveal_tests::gaze_cases::{random_gaze_rows, GazeOpts};
use foveal_tests::{random_tensor, rng, to_f64, KvOrder, Poison, Tensor, TestElem, Tol};

use proptest::prelude::*;
use rand::Rng;

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    spare_regions: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..4,
        prop::sample::select(vec![1usize, 3, 8, 16]),
        0usize..3,
    )
        .prop_map(|(seed, batch, kv_heads, head_dim, spare_regions)| Case {
            seed,
            batch,
            kv_heads,
            head_dim,
            spare_regions,
        })
}

/// desc `[B, Hkv, R, D]`, contiguous, all poison.
fn poisoned_desc(shape: [usize; 4]) -> Tensor<f32, 4> {
    Tensor::filled(shape, foveal_tests::contiguous_strides(shape), f32::POISON)
}

fn run<T: Element>(
    k: &Tensor<T, 4>,
    layout: &GazeLayout,
    regions: Range<usize>,
    desc: &mut Tensor<f32, 4>,
) -> Result<(), Error> {
    region_descriptors(k.view(), layout, regions, &mut desc.view_mut())
}

/// Checks `desc` against the f64 means for the regions of `range`, and that
/// every other element is still poison.
fn assert_matches_oracle<T: TestElem>(
    k: &Tensor<T, 4>,
    rows: &[GazeRow],
    range: Range<usize>,
    desc: &Tensor<f32, 4>,
    what: &str,
) {
    let [_, hkv, r_cap, d] = desc.shape;
    for (b, row) in rows.iter().enumerate() {
        for h in 0..hkv {
            for r in 0..r_cap {
                let region = row.regions.get(r).filter(|_| range.contains(&r));
                for e in 0..d {
                    let got = desc.get([b, h, r, e]);
                    let Some(region) = region else {
                        assert_eq!(
                            got.to_bits(),
                            f32::POISON.to_bits(),
                            "{what}: desc[{b}, {h}, {r}, {e}] written"
                        );
                        continue;
                    };
                    let xs: Vec<f64> = region
                        .iter()
                        .map(|&p| to_f64(k.get([b, p, h, e])))
                        .collect();
                    let n = xs.len() as f64;
                    let want = xs.iter().sum::<f64>() / n;
                    let magnitude = xs.iter().map(|x| x.abs()).sum::<f64>() / n;
                    assert!(
                        Tol::F32.allows(got as f64, want, magnitude),
                        "{what}: desc[{b}, {h}, {r}, {e}] = {got}, want {want}"
                    );
                }
            }
        }
    }
}

fn check_case<T: TestElem>(c: Case) {
    let mut r = rng(c.seed);
    let (seq, rows) = random_gaze_rows(&mut r, c.batch, GazeOpts::default());
    let layout = GazeLayout::new(seq, &rows).unwrap();
    let s = seq + r.random_range(0..3);
    let kshape = [c.batch, s, c.kv_heads, c.head_dim];
    let order = KvOrder::pick(&mut r);
    let strides = order.strides(&mut r, kshape);
    let k: Tensor<T, 4> = random_tensor(&mut r, kshape, strides, -4.0, 4.0);
    let r_cap = layout.max_regions() + c.spare_regions;
    let what = format!("{c:?}, {order:?}, seq {seq}");

    // all at once
    let mut all = poisoned_desc([c.batch, c.kv_heads, r_cap, c.head_dim]);
    run(&k, &layout, 0..usize::MAX, &mut all).expect("region_descriptors");
    assert_matches_oracle(&k, &rows, 0..usize::MAX, &all, &what);

    // a random range alone touches only its regions
    let a = r.random_range(0..=r_cap);
    let range = a..r.random_range(a..=r_cap + 2);
    let mut part = poisoned_desc(all.shape);
    run(&k, &layout, range.clone(), &mut part).expect("region_descriptors");
    assert_matches_oracle(
        &k,
        &rows,
        range.clone(),
        &part,
        &format!("{what}, range {range:?}"),
    );

    // piecewise (as frames arrive) equals all at once, bit for bit
    let mut cuts: Vec<usize> = (0..r.random_range(0..4))
        .map(|_| r.random_range(0..=r_cap))
        .collect();
    cuts.extend([0, r_cap]);
    cuts.sort_unstable();
    let mut pieces = poisoned_desc(all.shape);
    for w in cuts.windows(2) {
        run(&k, &layout, w[0]..w[1], &mut pieces).expect("region_descriptors");
    }
    let bits = |t: &Tensor<f32, 4>| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&pieces), bits(&all), "{what}: pieces {cuts:?}");
}

foveal_tests::oracle_proptests!(48, case(), check_case);

/// One row: text 0..2, a 4 x 5 image at 2 in 2 x 2 tiles (6 regions), text.
fn one_image() -> (usize, Vec<GazeRow>) {
    let mut row = GazeRow::new();
    row.push_visible(0..2);
    row.push_units(
        &[2],
        4,
        5,
        foveal::RegionShape {
            frames: 1,
            height: 2,
            width: 2,
        },
    )
    .unwrap();
    row.push_visible(22..24);
    (24, vec![row])
}

#[test]
fn border_regions_average_only_their_tokens() {
    let (seq, rows) = one_image();
    let layout = GazeLayout::new(seq, &rows).unwrap();
    // k[p] = p in every head and dim: a region's mean is the mean of its positions
    let k = Tensor::from_fn([1, seq, 2, 4], [seq * 8, 8, 4, 1], 0.0f32, |[_, p, h, _]| {
        (p + 100 * h) as f32
    });
    let mut desc = poisoned_desc([1, 2, 6, 4]);
    run(&k, &layout, 0..6, &mut desc).unwrap();
    // tiles: (0,0) 2,3,7,8; (0,1) 4,5,9,10; (0,2) 6,11; (1,0) 12,13,17,18; (1,1) 14,15,19,20; (1,2) 16,21
    let want = [5.0, 7.0, 8.5, 15.0, 17.0, 18.5];
    for (r, w) in want.iter().enumerate() {
        assert_eq!(desc.get([0, 0, r, 3]), *w, "region {r}");
        assert_eq!(desc.get([0, 1, r, 0]), w + 100.0, "region {r}, head 1");
    }
}

#[test]
fn a_nan_key_spoils_only_its_regions_descriptor() {
    let (seq, rows) = one_image();
    let layout = GazeLayout::new(seq, &rows).unwrap();
    let mut k = Tensor::from_fn([1, seq, 2, 4], [seq * 8, 8, 4, 1], 0.0f32, |[_, p, _, e]| {
        (p * e) as f32
    });
    let at = k.offset([0, 9, 1, 2]);
    k.data[at] = f32::NAN;
    let mut desc = poisoned_desc([1, 2, 6, 4]);
    run(&k, &layout, 0..6, &mut desc).unwrap();
    for r in 0..6 {
        for h in 0..2 {
            for e in 0..4 {
                let v = desc.get([0, h, r, e]);
                assert_eq!(
                    v.is_nan(),
                    (r, h, e) == (1, 1, 2),
                    "desc[{h}, {r}, {e}] = {v}"
                );
            }
        }
    }
}

#[test]
fn duplicate_keys_give_identical_descriptors() {
    // two images with the same keys: equal descriptors, bit for bit
    let mut row = GazeRow::new();
    let shape = foveal::RegionShape {
        frames: 1,
        height: 3,
        width: 3,
    };
    row.push_units(&[0], 5, 4, shape).unwrap();
    row.push_units(&[20], 5, 4, shape).unwrap();
    let layout = GazeLayout::new(40, &[row]).unwrap();
    let mut r = rng(9);
    let img: Vec<f32> = (0..20 * 3 * 8).map(|_| r.random_range(-1.0..1.0)).collect();
    let k = Tensor::from_fn([1, 40, 3, 8], [40 * 24, 24, 8, 1], 0.0f32, |[_, p, h, e]| {
        img[((p % 20) * 3 + h) * 8 + e]
    });
    assert_eq!(layout.regions(0), 8, "2 x 2 tiles per image");
    let mut desc = poisoned_desc([1, 3, 8, 8]);
    run(&k, &layout, 0..8, &mut desc).unwrap();
    for h in 0..3 {
        for r in 0..4 {
            for e in 0..8 {
                let (a, b) = (desc.get([0, h, r, e]), desc.get([0, h, r + 4, e]));
                assert!(
                    !a.is_nan() && a.to_bits() == b.to_bits(),
                    "head {h}, region {r}, dim {e}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn rejects_bad_arguments() {
    let (seq, rows) = one_image();
    let layout = GazeLayout::new(seq, &rows).unwrap();
    let k = vec![0.5f32; 2 * seq * 2 * 4];
    let kv = View::contiguous(&k[..seq * 8], [1, seq, 2, 4]).unwrap();
    let mut desc = vec![f32::POISON; 2 * 2 * 7 * 4];
    let go = |desc: &mut [f32], k: View<'_, f32, 4>, range: Range<usize>, shape: [usize; 4]| {
        let n = shape.iter().product();
        region_descriptors(
            k,
            &layout,
            range,
            &mut ViewMut::new(&mut desc[..n], Layout::contiguous(shape)).unwrap(),
        )
    };
    let ok = [1, 2, 6, 4];
    let k2 = View::contiguous(&k, [2, seq, 2, 4]).unwrap();
    assert!(
        matches!(
            go(&mut desc, k2, 0..6, [2, 2, 6, 4]),
            Err(Error::Shape { arg: "layout", .. })
        ),
        "two rows of keys, one of layout"
    );
    let short = View::contiguous(&k[..(seq - 1) * 8], [1, seq - 1, 2, 4]).unwrap();
    assert!(
        matches!(
            go(&mut desc, short, 0..6, ok),
            Err(Error::Index { arg: "layout", .. })
        ),
        "cache shorter than the layout's"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 4..2;
    assert!(matches!(
        go(&mut desc, kv, reversed, ok),
        Err(Error::Value { arg: "regions", .. })
    ));
    for bad in [[1, 2, 5, 4], [1, 1, 6, 4], [1, 2, 6, 3], [2, 2, 6, 4]] {
        assert!(
            matches!(
                go(&mut desc, kv, 0..6, bad),
                Err(Error::Shape { arg: "desc", .. })
            ),
            "desc {bad:?}"
        );
    }
    assert!(
        desc.iter().all(|x| x.to_bits() == f32::POISON.to_bits()),
        "written on error"
    );
    // empty and past-the-end ranges are valid and write nothing
    go(&mut desc, kv, 3..3, ok).unwrap();
    go(&mut desc, kv, 6..100, [1, 2, 7, 4]).unwrap();
    assert!(
        desc.iter().all(|x| x.to_bits() == f32::POISON.to_bits()),
        "written for no region"
    );
    go(&mut desc, kv, 5..100, ok).unwrap();
    assert_eq!(
        desc.iter()
            .filter(|x| x.to_bits() != f32::POISON.to_bits())
            .count(),
        2 * 4,
        "region 5 of both heads"
    );
}
