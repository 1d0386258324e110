//! pos_conv1d: the CPU reference against an f64 oracle written from the SPEC
//! ("VISOR / pos_conv1d"), and its argument checks.
//!
//! Tokens past a row's length are NaN, so a tap that reads one fails; the
//! output is poisoned first, so a slot not written fails.

// The oracles index their tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use foveal::pos_conv1d::cpu::pos_conv1d;
use foveal::pos_conv1d::KERNEL_SIZE;
use foveal::{Error, Layout, View, ViewMut};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, Tensor, TestElem, Tol};
use proptest::prelude::*;
use rand::Rng;

/// `out[b, i, c] = x[b, i, c] + bias[c] + sum_t w[c, t] x[b, i + t - 3, c]`
/// over the taps inside `0..len[b]`, in f64; with the sum of the terms'
/// magnitudes. `[b][i][c]`; `None` past the row.
type Want = Vec<Vec<Vec<Option<(f64, f64)>>>>;

fn oracle<T: TestElem>(
    x: &Tensor<T, 3>,
    lens: &[usize],
    w: &Tensor<T, 2>,
    bias: &Tensor<T, 1>,
) -> Want {
    let [batch, n, c] = x.shape;
    (0..batch)
        .map(|b| {
            (0..n)
                .map(|i| {
                    (0..c)
                        .map(|ch| {
                            if i >= lens[b] {
                                return None;
                            }
                            let centre = to_f64(x.get([b, i, ch]));
                            let mut v = centre + to_f64(bias.get([ch]));
                            let mut mag = centre.abs() + to_f64(bias.get([ch])).abs();
                            for t in 0..KERNEL_SIZE {
                                let j = i as isize + t as isize - 3;
                                if j >= 0 && (j as usize) < lens[b] {
                                    let term =
                                        to_f64(w.get([ch, t])) * to_f64(x.get([b, j as usize, ch]));
                                    v += term;
                                    mag += term.abs();
                                }
                            }
                            Some((v, mag))
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

struct Inputs<T> {
    x: Tensor<T, 3>,
    lens: Vec<usize>,
    w: Tensor<T, 2>,
    bias: Tensor<T, 1>,
}

fn inputs<T: TestElem>(seed: u64, shape: [usize; 3]) -> Inputs<T> {
    let mut r = rng(seed);
    let [batch, n, c] = shape;
    let lens: Vec<usize> = (0..batch)
        .map(|_| match r.random_range(0..6) {
            0 => 0,
            1 => n,
            2 => r.random_range(0..=n.min(6)), // shorter than the kernel
            _ => r.random_range(0..=n),
        })
        .collect();
    let xs = random_strides(&mut r, shape);
    let mut x: Tensor<T, 3> = random_tensor(&mut r, shape, xs, -2.0, 2.0);
    for b in 0..batch {
        for i in lens[b]..n {
            for ch in 0..c {
                let o = x.offset([b, i, ch]);
                x.data[o] = T::POISON;
            }
        }
    }
    let ws = random_strides(&mut r, [c, KERNEL_SIZE]);
    let w = random_tensor(&mut r, [c, KERNEL_SIZE], ws, -1.0, 1.0);
    let bias = random_tensor(&mut r, [c], [1], -1.0, 1.0);
    Inputs { x, lens, w, bias }
}

fn run<T: TestElem>(inp: &Inputs<T>, out: &mut Tensor<T, 3>) -> Result<(), Error> {
    pos_conv1d(
        inp.x.view(),
        &inp.lens,
        inp.w.view(),
        inp.bias.view(),
        &mut out.view_mut(),
    )
}

fn check_case<T: TestElem>((seed, shape): (u64, [usize; 3])) {
    let inp = inputs::<T>(seed, shape);
    let mut r = rng(seed ^ 3);
    let os = random_strides(&mut r, shape);
    let mut out = Tensor::filled(shape, os, T::POISON);
    run(&inp, &mut out).expect("pos_conv1d");
    let want = oracle(&inp.x, &inp.lens, &inp.w, &inp.bias);
    // eight f32 products and sums, then the output rounding
    let tol = Tol {
        rel: Tol::for_elem::<T>().rel.max(1e-6),
        abs: 1e-6,
    };
    let [batch, n, c] = shape;
    for b in 0..batch {
        for i in 0..n {
            for ch in 0..c {
                let got = out.get([b, i, ch]);
                match want[b][i][ch] {
                    None => assert_eq!(
                        got.bits(),
                        T::from_f32(0.0).bits(),
                        "seed {seed} {shape:?} lens {:?}: [{b}, {i}, {ch}] past the row",
                        inp.lens
                    ),
                    Some((v, mag)) => assert!(
                        tol.allows(to_f64(got), v, mag),
                        "seed {seed} {shape:?} lens {:?}: [{b}, {i}, {ch}] = {got:?}, want {v}",
                        inp.lens
                    ),
                }
            }
        }
    }
    for o in out.gap_offsets() {
        assert_eq!(out.data[o].bits(), T::POISON.bits(), "gap {o} written");
    }
}

fn case() -> impl Strategy<Value = (u64, [usize; 3])> {
    (any::<u64>(), 1usize..4, 1usize..24, 1usize..20).prop_map(|(s, b, n, c)| (s, [b, n, c]))
}

foveal_tests::oracle_proptests!(64, case(), check_case);

/// PyTorch's Conv1d is a cross-correlation: weight[c, t] multiplies
/// x[i + t - 3]. One-hot kernels shift the row; taps past either end of the
/// row are zeros (rows of 1 to 4 tokens, shorter than the kernel).
#[test]
fn one_hot_kernels_shift_within_the_row() {
    for len in [1usize, 2, 3, 4, 9] {
        let n = 9;
        let x: Vec<f32> = (0..n).map(|i| (i + 1) as f32).collect();
        for t in 0..KERNEL_SIZE {
            let mut w = [0.0f32; KERNEL_SIZE];
            w[t] = 1.0;
            let mut out = vec![f32::NAN; n];
            pos_conv1d(
                View::contiguous(&x, [1, n, 1]).unwrap(),
                &[len],
                View::contiguous(&w, [1, KERNEL_SIZE]).unwrap(),
                View::contiguous(&[0.5f32], [1]).unwrap(),
                &mut ViewMut::contiguous(&mut out, [1, n, 1]).unwrap(),
            )
            .unwrap();
            for i in 0..n {
                let j = i as isize + t as isize - 3;
                let want = if i >= len {
                    0.0
                } else if j >= 0 && (j as usize) < len {
                    x[i] + 0.5 + x[j as usize]
                } else {
                    x[i] + 0.5
                };
                assert_eq!(out[i], want, "len {len}, tap {t}, token {i}");
            }
        }
    }
}

#[test]
fn rejects_bad_arguments() {
    let x = vec![0.0f32; 2 * 5 * 3];
    let w = vec![0.0f32; 3 * KERNEL_SIZE];
    let bias = vec![0.0f32; 3];
    let mut out = [f32::NAN; 2 * 5 * 3];
    let xv = View::contiguous(&x, [2, 5, 3]).unwrap();
    let wv = View::contiguous(&w, [3, KERNEL_SIZE]).unwrap();
    let bv = View::contiguous(&bias, [3]).unwrap();
    let mut go = |lens: &[usize], w: View<'_, f32, 2>, b: View<'_, f32, 1>, oshape: [usize; 3]| {
        let n: usize = oshape.iter().product();
        pos_conv1d(
            xv,
            lens,
            w,
            b,
            &mut ViewMut::new(&mut out[..n], Layout::contiguous(oshape)).unwrap(),
        )
    };
    assert!(go(&[5, 0], wv, bv, [2, 5, 3]).is_ok());
    let err = |r: Result<(), Error>| match r {
        Err(Error::Shape { arg, .. }) => ("shape", arg),
        Err(Error::Index { arg, .. }) => ("index", arg),
        other => panic!("want an error, got {other:?}"),
    };
    assert_eq!(err(go(&[5], wv, bv, [2, 5, 3])), ("shape", "lens"));
    assert_eq!(err(go(&[6, 0], wv, bv, [2, 5, 3])), ("index", "lens"));
    let w6 = View::contiguous(&w[..3 * 6], [3, 6]).unwrap();
    assert_eq!(err(go(&[5, 0], w6, bv, [2, 5, 3])), ("shape", "weight"));
    let w2 = View::contiguous(&w[..2 * KERNEL_SIZE], [2, KERNEL_SIZE]).unwrap();
    assert_eq!(err(go(&[5, 0], w2, bv, [2, 5, 3])), ("shape", "weight"));
    let b2 = View::contiguous(&bias[..2], [2]).unwrap();
    assert_eq!(err(go(&[5, 0], wv, b2, [2, 5, 3])), ("shape", "bias"));
    assert_eq!(err(go(&[5, 0], wv, bv, [2, 4, 3])), ("shape", "out"));
    // nothing written by the failed calls (the first, valid call wrote zeros / values)
    let mut fresh = vec![f32::NAN; 2 * 5 * 3];
    let r = pos_conv1d(
        xv,
        &[9, 0],
        wv,
        bv,
        &mut ViewMut::contiguous(&mut fresh, [2, 5, 3]).unwrap(),
    );
    assert!(r.is_err() && fresh.iter().all(|v| v.is_nan()));
}
