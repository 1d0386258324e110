//! multiscale_gather: the CPU reference against an f64 oracle written from
//! the SPEC ("FocusLLaVA / Vision-guided sampler", the paper's Eq. 2), and its
//! argument checks. Counts, positions and the choice of scale (ties to the
//! first scale, NaN lowest) must be exact; the pooled values are exact maxima,
//! scaled by the softmax probability in f32 then rounded to the storage type.

// The oracles index their tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use foveal::multiscale_gather::cpu::multiscale_gather;
use foveal::multiscale_gather::max_tokens;
use foveal::window_mean::num_windows;
use foveal::{Error, ScaleSet, View, ViewMut};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, Tensor, TestElem, Tol, TIES};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;

/// The oracle's output of one row: tokens (value, per channel), positions.
type Row = (Vec<Vec<f64>>, Vec<i32>);

/// SPEC math in f64, written without the library's helpers.
fn oracle<T: TestElem>(
    x: &Tensor<T, 4>,
    z: &Tensor<f32, 3>,
    w: usize,
    scales: &[(usize, usize)],
    prob: bool,
) -> Vec<Row> {
    let [batch, h, wd, c] = x.shape;
    let mx = wd.div_ceil(w);
    (0..batch)
        .map(|b| {
            let (mut toks, mut pos) = (Vec::new(), Vec::new());
            for m in 0..h.div_ceil(w) * mx {
                let zs: Vec<f32> = (0..scales.len()).map(|s| z.get([b, m, s])).collect();
                // first index of the largest non-NaN logit; 0 when all are NaN
                let mut best: Option<usize> = None;
                for (s, v) in zs.iter().enumerate() {
                    if !v.is_nan() && best.is_none_or(|bs| *v > zs[bs]) {
                        best = Some(s);
                    }
                }
                let ch = best.unwrap_or(0);
                let p = if prob {
                    let e: f64 = zs.iter().map(|&v| (v as f64 - zs[ch] as f64).exp()).sum();
                    1.0 / e
                } else {
                    1.0
                };
                let (kh, kw) = scales[ch];
                let (wy0, wx0) = ((m / mx) * w, (m % mx) * w);
                for cy in (wy0..wy0 + w).step_by(kh) {
                    for cx in (wx0..wx0 + w).step_by(kw) {
                        if cy >= h || cx >= wd {
                            continue; // the cell lies entirely outside the map
                        }
                        let vals = (0..c)
                            .map(|ci| {
                                let mut mxv = f64::NEG_INFINITY;
                                for y in cy..(cy + kh).min(h) {
                                    for xx in cx..(cx + kw).min(wd) {
                                        mxv = mxv.max(to_f64(x.get([b, y, xx, ci])));
                                    }
                                }
                                mxv * p
                            })
                            .collect();
                        toks.push(vals);
                        pos.push((cy * wd + cx) as i32);
                    }
                }
            }
            (toks, pos)
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    shape: [usize; 4],
    window: usize,
    scales: Vec<(usize, usize)>,
    prob: bool,
    ties: bool,
    nan: bool,
}

/// Scale sets for a window: the paper's two for w = 4, random divisors otherwise.
fn scales_for(r: &mut StdRng, w: usize) -> Vec<(usize, usize)> {
    if w == 4 && r.random_bool(0.6) {
        return if r.random_bool(0.5) {
            ScaleSet::three()
        } else {
            ScaleSet::seven()
        }
        .scales()
        .to_vec();
    }
    let divs: Vec<usize> = (1..=w).filter(|&d| w.checked_rem(d) == Some(0)).collect();
    (0..r.random_range(1..=5))
        .map(|_| {
            (
                divs[r.random_range(0..divs.len())],
                divs[r.random_range(0..divs.len())],
            )
        })
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        1usize..4,
        1usize..14,
        1usize..14,
        1usize..7,
        prop::sample::select(vec![1usize, 2, 3, 4, 4, 4, 6, 8]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(seed, b, h, w, c, window, prob, ties, nan)| {
            let scales = scales_for(&mut rng(seed ^ 0x5ca1e), window);
            Case {
                seed,
                shape: [b, h, w, c],
                window,
                scales,
                prob,
                ties,
                nan: nan && !prob,
            }
        })
}

fn run<T: TestElem>(
    x: &Tensor<T, 4>,
    z: &Tensor<f32, 3>,
    c: &Case,
    r: &mut StdRng,
) -> (Tensor<T, 3>, Tensor<i32, 2>, Vec<i32>) {
    let [b, h, w, ch] = c.shape;
    let set = ScaleSet::new(&c.scales).unwrap();
    let n_out = max_tokens(h, w, c.window, &set);
    let ts = random_strides(r, [b, n_out, ch]);
    let mut tokens = Tensor::filled([b, n_out, ch], ts, T::POISON);
    let ps = random_strides(r, [b, n_out]);
    let mut pos = Tensor::filled([b, n_out], ps, i32::MIN);
    let mut count = vec![i32::MIN; b];
    multiscale_gather(
        x.view(),
        z.view(),
        c.window,
        &set,
        c.prob,
        &mut tokens.view_mut(),
        &mut pos.view_mut(),
        &mut ViewMut::contiguous(&mut count, [b]).unwrap(),
    )
    .expect("multiscale_gather");
    (tokens, pos, count)
}

fn random_z(r: &mut StdRng, shape: [usize; 3], ties: bool, nan: bool) -> Tensor<f32, 3> {
    let zs = random_strides(r, shape);
    Tensor::from_fn(shape, zs, f32::NAN, |_| {
        if nan && r.random_bool(0.2) {
            f32::NAN
        } else if ties {
            TIES[r.random_range(0..TIES.len())]
        } else {
            r.random_range(-3.0f32..3.0)
        }
    })
}

fn check_case<T: TestElem>(c: Case) {
    let mut r = rng(c.seed);
    let [b, h, w, ch] = c.shape;
    let xs = random_strides(&mut r, c.shape);
    let x: Tensor<T, 4> = random_tensor(&mut r, c.shape, xs, -4.0, 4.0);
    let z = random_z(
        &mut r,
        [b, num_windows(h, w, c.window), c.scales.len()],
        c.ties,
        c.nan,
    );
    let (tokens, pos, count) = run(&x, &z, &c, &mut r);
    let want = oracle(&x, &z, c.window, &c.scales, c.prob);
    let tol = if c.prob {
        Tol {
            rel: Tol::for_elem::<T>().rel.max(4e-6),
            abs: 1e-6,
        }
    } else {
        Tol {
            rel: Tol::for_elem::<T>().rel,
            abs: 0.0,
        }
    };
    let n_out = tokens.shape[1];
    for bi in 0..b {
        let (toks, p) = &want[bi];
        assert_eq!(count[bi] as usize, toks.len(), "{c:?}: row {bi}: count");
        for s in 0..n_out {
            if s < toks.len() {
                assert_eq!(pos.get([bi, s]), p[s], "{c:?}: row {bi} slot {s}: position");
                for ci in 0..ch {
                    let (g, wv) = (to_f64(tokens.get([bi, s, ci])), toks[s][ci]);
                    assert!(
                        tol.allows(g, wv, wv),
                        "{c:?}: row {bi} slot {s} ch {ci}: got {g}, want {wv}"
                    );
                }
            } else {
                assert_eq!(pos.get([bi, s]), -1, "{c:?}: padding position");
                assert!(
                    (0..ch).all(|ci| tokens.get([bi, s, ci]).bits() == T::from_f32(0.0).bits()),
                    "padding token"
                );
            }
        }
    }
    for o in tokens.gap_offsets() {
        assert_eq!(tokens.data[o].bits(), T::POISON.bits(), "gap {o} written");
    }
}

foveal_tests::oracle_proptests!(64, case(), check_case);

/// A 6 x 5 map, window 4, scale (2, 2) everywhere: window 0 gives 4 tokens,
/// window 1 (columns 4..5) 2, window 2 (rows 4..6) 2, window 3 1.
#[test]
fn border_cells_pool_existing_pixels() {
    let shape = [1, 6, 5, 1];
    let x = Tensor::from_fn(shape, [30, 5, 1, 1], 0.0f32, |[_, y, xx, _]| {
        (y * 5 + xx) as f32
    });
    let z = Tensor::from_fn([1, 4, 3], [12, 3, 1], 0.0f32, |[_, _, s]| {
        if s == 1 {
            1.0
        } else {
            0.0
        }
    });
    let c = Case {
        seed: 0,
        shape,
        window: 4,
        scales: ScaleSet::three().scales().to_vec(),
        prob: false,
        ties: false,
        nan: false,
    };
    let (tokens, pos, count) = run(&x, &z, &c, &mut rng(0));
    assert_eq!(count, vec![9]);
    let p: Vec<i32> = (0..9).map(|s| pos.get([0, s])).collect();
    assert_eq!(p, vec![0, 2, 10, 12, 4, 14, 20, 22, 24]);
    let t: Vec<f32> = (0..9).map(|s| tokens.get([0, s, 0])).collect();
    assert_eq!(t, vec![6.0, 8.0, 16.0, 18.0, 9.0, 19.0, 26.0, 28.0, 29.0]);
    assert_eq!(
        tokens.shape[1],
        16 + 4 + 8 + 2,
        "N_out_max: every window at (1, 1)"
    );
}

#[test]
fn ties_go_to_the_first_scale_and_nan_ranks_lowest() {
    let shape = [1, 4, 4, 1];
    let x = Tensor::from_fn(shape, [16, 4, 1, 1], 0.0f32, |[_, y, xx, _]| {
        (y * 4 + xx) as f32
    });
    for (zs, want) in [
        ([1.0, 1.0, 1.0], 1),
        ([f32::NAN, 0.0, 0.0], 4),
        ([f32::NAN, f32::NAN, f32::NAN], 1),
        ([-1.0, f32::NAN, 5.0], 16),
    ] {
        let z = Tensor::from_fn([1, 1, 3], [3, 3, 1], 0.0f32, |[_, _, s]| zs[s]);
        let c = Case {
            seed: 0,
            shape,
            window: 4,
            scales: ScaleSet::three().scales().to_vec(),
            prob: false,
            ties: false,
            nan: false,
        };
        let (_, _, count) = run(&x, &z, &c, &mut rng(0));
        assert_eq!(count, vec![want], "{zs:?}");
    }
}

#[test]
fn rejects_bad_arguments() {
    assert!(matches!(
        ScaleSet::new(&[]),
        Err(Error::Value { arg: "scales", .. })
    ));
    assert!(matches!(
        ScaleSet::new(&[(0, 1)]),
        Err(Error::Value { arg: "scales", .. })
    ));
    assert!(ScaleSet::new(&[(1, 1); 17]).is_err());
    let x = vec![0.0f32; 8 * 8 * 2];
    let xv = View::contiguous(&x, [1, 8, 8, 2]).unwrap();
    let z = [0.0f32; 16 * 3];
    let mut tok = vec![f32::NAN; 64 * 2];
    let mut pos = vec![i32::MIN; 64];
    let mut cnt = vec![i32::MIN; 1];
    let mut go = |w: usize, set: &ScaleSet, zs: [usize; 3], n: usize| {
        multiscale_gather(
            xv,
            View::contiguous(&z[..zs.iter().product()], zs).unwrap(),
            w,
            set,
            false,
            &mut ViewMut::contiguous(&mut tok[..n * 2], [1, n, 2]).unwrap(),
            &mut ViewMut::contiguous(&mut pos[..n], [1, n]).unwrap(),
            &mut ViewMut::contiguous(&mut cnt, [1]).unwrap(),
        )
    };
    let three = ScaleSet::three();
    assert!(matches!(
        go(4, &ScaleSet::new(&[(3, 1)]).unwrap(), [1, 4, 1], 64),
        Err(Error::Value { arg: "scales", .. })
    ));
    assert!(
        matches!(
            go(2, &three, [1, 16, 3], 64),
            Err(Error::Value { arg: "scales", .. })
        ),
        "(4, 4) does not divide 2"
    );
    assert!(matches!(
        go(0, &three, [1, 4, 3], 64),
        Err(Error::Value { arg: "window", .. })
    ));
    assert!(matches!(
        go(4, &three, [1, 4, 2], 64),
        Err(Error::Shape { arg: "z", .. })
    ));
    assert!(matches!(
        go(4, &three, [1, 3, 3], 64),
        Err(Error::Shape { arg: "z", .. })
    ));
    assert!(matches!(
        go(4, &three, [1, 4, 3], 63),
        Err(Error::Shape { arg: "tokens", .. })
    ));
    assert!(
        tok.iter().all(|v| v.is_nan()) && pos.iter().all(|&p| p == i32::MIN) && cnt == [i32::MIN],
        "written on error"
    );
}
