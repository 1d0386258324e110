//! window_mean: the CPU reference against an f64 oracle written from the SPEC
//! ("FocusLLaVA / Vision-guided sampler"), and its argument checks.
//!
//! Inputs are stored as bf16 / f16 / f32 and read exactly by the oracle; the
//! reference may differ by its f32 accumulation and the rounding of the
//! output to the storage type.

// The oracles index their tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use foveal::window_mean::cpu::window_mean;
use foveal::window_mean::num_windows;
use foveal::{Error, Layout, Pool, View, ViewMut};
use foveal_tests::{
    contiguous_strides, poison, random_strides, random_tensor, rng, to_f64, Tensor, TestElem, Tol,
};

use proptest::prelude::*;

/// SPEC math in f64: per window (raster order, border windows smaller) the
/// mean or max over its cells. `[b][m][c]` with the mean of |x| (magnitude).
fn oracle<T: TestElem>(x: &Tensor<T, 4>, w: usize, pool: Pool) -> Vec<Vec<Vec<(f64, f64)>>> {
    let [batch, h, wd, c] = x.shape;
    let (my, mx) = (h.div_ceil(w), wd.div_ceil(w));
    (0..batch)
        .map(|b| {
            (0..my * mx)
                .map(|m| {
                    let (wy, wx) = (m / mx, m % mx);
                    let cells: Vec<(usize, usize)> = (wy * w..(wy * w + w).min(h))
                        .flat_map(|y| (wx * w..(wx * w + w).min(wd)).map(move |xx| (y, xx)))
                        .collect();
                    (0..c)
                        .map(|ch| {
                            let v: Vec<f64> = cells
                                .iter()
                                .map(|&(y, xx)| to_f64(x.get([b, y, xx, ch])))
                                .collect();
                            let mag = v.iter().map(|a| a.abs()).sum::<f64>() / v.len() as f64;
                            match pool {
                                Pool::Mean => (v.iter().sum::<f64>() / v.len() as f64, mag),
                                Pool::Max => {
                                    (v.iter().copied().fold(f64::NEG_INFINITY, f64::max), mag)
                                }
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    shape: [usize; 4],
    window: usize,
    pool: Pool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..12,
        1usize..12,
        1usize..10,
        1usize..6,
        any::<bool>(),
    )
        .prop_map(|(seed, b, h, w, c, window, max)| Case {
            seed,
            shape: [b, h, w, c],
            window,
            pool: if max { Pool::Max } else { Pool::Mean },
        })
}

fn check_case<T: TestElem>(c: Case) {
    let mut r = rng(c.seed);
    let xs = random_strides(&mut r, c.shape);
    let x: Tensor<T, 4> = random_tensor(&mut r, c.shape, xs, -4.0, 4.0);
    let [b, h, w, ch] = c.shape;
    let m = num_windows(h, w, c.window);
    let out_shape = [b, m, ch];
    let os = random_strides(&mut r, out_shape);
    let mut out: Tensor<T, 3> = Tensor::filled(out_shape, os, T::POISON);
    window_mean(x.view(), c.window, c.pool, &mut out.view_mut()).expect("window_mean");
    let want = oracle(&x, c.window, c.pool);
    // f32 accumulation of up to w*w terms, then the output rounding.
    let tol = Tol {
        rel: Tol::for_elem::<T>()
            .rel
            .max(1e-6 * (c.window * c.window) as f64),
        abs: 1e-6,
    };
    for bi in 0..b {
        for mi in 0..m {
            for ci in 0..ch {
                let (v, mag) = want[bi][mi][ci];
                let got = to_f64(out.get([bi, mi, ci]));
                assert!(
                    tol.allows(got, v, mag),
                    "{c:?}: [{bi}, {mi}, {ci}]: got {got}, want {v}"
                );
            }
        }
    }
    // gaps of the output untouched
    for o in out.gap_offsets() {
        assert_eq!(out.data[o].bits(), T::POISON.bits(), "gap {o} written");
    }
}

foveal_tests::oracle_proptests!(64, case(), check_case);

/// A 5 x 6 map, window 4: windows of 16, 8, 4 and 2 cells; known values.
#[test]
fn border_windows_average_their_existing_cells() {
    let x = Tensor::from_fn(
        [1, 5, 6, 1],
        contiguous_strides([1, 5, 6, 1]),
        0.0f32,
        |[_, y, xx, _]| (y * 6 + xx) as f32,
    );
    let mut out = vec![f32::NAN; 4];
    window_mean(
        x.view(),
        4,
        Pool::Mean,
        &mut ViewMut::contiguous(&mut out, [1, 4, 1]).unwrap(),
    )
    .unwrap();
    let mean = |ys: std::ops::Range<usize>, xs: std::ops::Range<usize>| {
        let v: Vec<f32> = ys
            .flat_map(|y| xs.clone().map(move |xx| (y * 6 + xx) as f32))
            .collect();
        v.iter().sum::<f32>() / v.len() as f32
    };
    assert_eq!(
        out,
        vec![
            mean(0..4, 0..4),
            mean(0..4, 4..6),
            mean(4..5, 0..4),
            mean(4..5, 4..6)
        ]
    );
    window_mean(
        x.view(),
        4,
        Pool::Max,
        &mut ViewMut::contiguous(&mut out, [1, 4, 1]).unwrap(),
    )
    .unwrap();
    assert_eq!(out, vec![21.0, 23.0, 27.0, 29.0]);
}

#[test]
fn rejects_bad_arguments() {
    let x = vec![0.0f32; 2 * 5 * 5 * 3];
    let xv = View::contiguous(&x, [2, 5, 5, 3]).unwrap();
    let mut out = vec![0.0f32; 2 * 4 * 3];
    let mut bad = |w: usize, shape: [usize; 3]| {
        let n = shape.iter().product();
        poison(&mut out[..n]);
        window_mean(
            xv,
            w,
            Pool::Mean,
            &mut ViewMut::new(&mut out, Layout::contiguous(shape)).unwrap(),
        )
        .unwrap_err()
    };
    assert!(matches!(
        bad(0, [2, 4, 3]),
        Error::Value { arg: "window", .. }
    ));
    assert!(matches!(bad(4, [2, 3, 3]), Error::Shape { arg: "out", .. }));
    assert!(matches!(bad(4, [2, 4, 2]), Error::Shape { arg: "out", .. }));
    assert!(matches!(bad(4, [1, 4, 3]), Error::Shape { arg: "out", .. }));
    assert!(out.iter().all(|v| v.is_nan()), "nothing written on error");
}

#[test]
fn empty_maps_give_no_windows() {
    let mut r = rng(5);
    for shape in [[0, 3, 3, 2], [2, 0, 3, 2], [2, 3, 0, 2], [2, 3, 3, 0]] {
        let x: Tensor<f32, 4> = random_tensor(&mut r, shape, contiguous_strides(shape), 0.0, 1.0);
        let out_shape = [shape[0], num_windows(shape[1], shape[2], 2), shape[3]];
        let mut out: Tensor<f32, 3> = Tensor::filled(out_shape, contiguous_strides(out_shape), 0.0);
        window_mean(x.view(), 2, Pool::Mean, &mut out.view_mut()).expect("empty map");
    }
}
