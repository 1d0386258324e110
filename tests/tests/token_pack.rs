//! token_pack: the CPU reference against an f64 oracle written from the SPEC
//! ("VISOR / token_pack": torch's bilinear interpolate with
//! align_corners=False, then space-to-depth by 2), the output sizes and
//! their rounding, and the argument checks.

// The oracles index their tensors the way the SPEC writes the math.
#![allow(clippy::needless_range_loop)]

use foveal::token_pack::cpu::token_pack;
use foveal::token_pack::{resized_grid, resized_side};
use foveal::{Error, View, ViewMut};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, Poison, Tensor, TestElem, Tol};
use proptest::prelude::*;

/// torch's source index in f64: `max(0, (in / out) (dst + 0.5) - 0.5)`,
/// `i0 = floor`, `i1 = min(i0 + 1, in - 1)`, `l1 = src - i0`.
fn source(dst: usize, inp: usize, out: usize) -> (usize, usize, f64) {
    let src = ((inp as f64 / out as f64) * (dst as f64 + 0.5) - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(inp - 1);
    (i0, (i0 + 1).min(inp - 1), src - i0 as f64)
}

/// `Y [B, H', W', C]` in f64 and the largest |x| of each pixel's taps.
fn resized<T: TestElem>(x: &Tensor<T, 4>, oh: usize, ow: usize) -> Vec<(f64, f64)> {
    let [batch, h, w, c] = x.shape;
    let mut y = Vec::with_capacity(batch * oh * ow * c);
    for b in 0..batch {
        for yo in 0..oh {
            let (y0, y1, ly) = source(yo, h, oh);
            for xo in 0..ow {
                let (x0, x1, lx) = source(xo, w, ow);
                for ch in 0..c {
                    let at = |yy, xx| to_f64(x.get([b, yy, xx, ch]));
                    let taps = [at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1)];
                    let v = (1.0 - ly) * ((1.0 - lx) * taps[0] + lx * taps[1])
                        + ly * ((1.0 - lx) * taps[2] + lx * taps[3]);
                    let mag = taps.iter().fold(0f64, |m, t| m.max(t.abs()));
                    y.push((v, mag));
                }
            }
        }
    }
    y
}

fn run<T: TestElem>(x: &Tensor<T, 4>, rho: f64, out: &mut Tensor<T, 4>) -> Result<(), Error> {
    token_pack(x.view(), rho, &mut out.view_mut())
}

fn out_shape(x: [usize; 4], rho: f64) -> [usize; 4] {
    let [oh, ow] = resized_grid(x[1], x[2], rho).unwrap();
    [x[0], oh / 2, ow / 2, 4 * x[3]]
}

/// Ratios: the identity resize (4), a 2x upsample (1), and non-powers of two.
const RATIOS: [f64; 8] = [1.0, 1.5, 2.0, 2.7, 3.0, 4.0, 5.3, 9.0];

fn check_case<T: TestElem>((seed, shape, rho): (u64, [usize; 4], f64)) {
    let mut r = rng(seed);
    let [batch, h, w, c] = shape;
    let xs = random_strides(&mut r, shape);
    let x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -3.0, 3.0);
    let Ok([oh, ow]) = resized_grid(h, w, rho) else {
        // the ratio leaves no token: refused
        let mut out = Tensor::filled([batch, 1, 1, 4 * c], [4 * c, 4 * c, 4 * c, 1], T::POISON);
        assert!(matches!(
            run(&x, rho, &mut out),
            Err(Error::Value { arg: "rho", .. })
        ));
        return;
    };
    let os_shape = [batch, oh / 2, ow / 2, 4 * c];
    let os = random_strides(&mut r, os_shape);
    let mut out = Tensor::filled(os_shape, os, T::POISON);
    run(&x, rho, &mut out).expect("token_pack");
    let y = resized(&x, oh, ow);
    // four f32 products and sums at weights rounded to f32, then the output rounding
    let tol = Tol {
        rel: Tol::for_elem::<T>().rel.max(1e-6),
        abs: 1e-6,
    };
    for b in 0..batch {
        for i in 0..oh / 2 {
            for j in 0..ow / 2 {
                for q in 0..4 {
                    let (yo, xo) = (2 * i + q / 2, 2 * j + q % 2);
                    for ch in 0..c {
                        let (v, mag) = y[((b * oh + yo) * ow + xo) * c + ch];
                        let got = to_f64(out.get([b, i, j, q * c + ch]));
                        assert!(
                            tol.allows(got, v, mag),
                            "seed {seed} {shape:?} rho {rho}: out[{b}, {i}, {j}, {}] = {got}, want {v}",
                            q * c + ch
                        );
                    }
                }
            }
        }
    }
    for o in out.gap_offsets() {
        assert_eq!(out.data[o].bits(), T::POISON.bits(), "gap {o} written");
    }
}

fn case() -> impl Strategy<Value = (u64, [usize; 4], f64)> {
    (
        any::<u64>(),
        1usize..3,
        1usize..14,
        1usize..14,
        1usize..6,
        prop::sample::select(RATIOS.to_vec()),
    )
        .prop_map(|(s, b, h, w, c, rho)| (s, [b, h, w, c], rho))
}

foveal_tests::oracle_proptests!(64, case(), check_case);

/// `round` rounds half to even (Python's `round`, `torch.round`), on both
/// sides of an exact .5, and the sizes follow `2 * round(side / sqrt(rho))`.
#[test]
fn output_sides_round_half_to_even() {
    // exact halves: 25 / 2 = 12.5 -> 12, 27 / 2 = 13.5 -> 14, 5 / 2 -> 2, 7 / 2 -> 4
    assert_eq!(resized_side(25, 4.0).unwrap(), 24);
    assert_eq!(resized_side(27, 4.0).unwrap(), 28);
    assert_eq!(resized_side(5, 4.0).unwrap(), 4);
    assert_eq!(resized_side(7, 4.0).unwrap(), 8);
    assert_eq!(resized_side(3, 2.25).unwrap(), 4, "3 / 1.5 = 2");
    // just off the halves
    assert_eq!(resized_side(25, 3.99).unwrap(), 26, "12.52 -> 13");
    assert_eq!(resized_side(25, 4.01).unwrap(), 24, "12.48 -> 12");
    // LLaVA-OneVision's 27 x 27 grid at the paper's ratios
    assert_eq!(resized_side(27, 1.0).unwrap(), 54);
    assert_eq!(resized_side(27, 2.0).unwrap(), 38, "27 / 1.414 = 19.09");
    assert_eq!(resized_side(27, 3.0).unwrap(), 32, "15.59");
    assert_eq!(resized_side(27, 16.0).unwrap(), 14, "6.75");
    // ratios that leave nothing, and bad ratios
    assert!(matches!(
        resized_side(1, 4.0),
        Err(Error::Value { arg: "rho", .. })
    ));
    for rho in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(resized_side(27, rho), Err(Error::Value { arg: "rho", .. })),
            "{rho}"
        );
    }
}

/// rho = 4 on even sides: the resize is the identity, and the op is exactly
/// space-to-depth: out[i, j, (2 dy + dx) C + c] = x[2i + dy, 2j + dx, c].
#[test]
fn identity_resize_is_space_to_depth() {
    let mut r = rng(21);
    for (h, w, c) in [(2, 2, 1), (4, 6, 3), (26, 26, 8)] {
        let xs = random_strides(&mut r, [2, h, w, c]);
        let x: Tensor<f32, 4> = random_tensor(&mut r, [2, h, w, c], xs, 0.5, 2.0);
        let shape = out_shape(x.shape, 4.0);
        assert_eq!(shape, [2, h / 2, w / 2, 4 * c]);
        let os = random_strides(&mut r, shape);
        let mut out = Tensor::filled(shape, os, f32::POISON);
        run(&x, 4.0, &mut out).unwrap();
        for b in 0..2 {
            for i in 0..h / 2 {
                for j in 0..w / 2 {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            for ch in 0..c {
                                assert_eq!(
                                    out.get([b, i, j, (2 * dy + dx) * c + ch]).to_bits(),
                                    x.get([b, 2 * i + dy, 2 * j + dx, ch]).to_bits()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// rho = 1 keeps the token count: the grid is upsampled 2x and each packed
/// token holds the 2 x 2 upsampled pixels of one input pixel; a constant map
/// stays constant, and a 1 x 1 grid is copied into all four slots.
#[test]
fn unit_ratio_upsamples_twice() {
    let x = Tensor::from_fn([1, 3, 5, 2], [30, 10, 2, 1], 0.0f32, |[_, _, _, c]| {
        1.25 + c as f32
    });
    let shape = out_shape(x.shape, 1.0);
    assert_eq!(shape, [1, 3, 5, 8]);
    let mut out = Tensor::filled(shape, [120, 40, 8, 1], f32::POISON);
    run(&x, 1.0, &mut out).unwrap();
    assert!(out
        .data
        .iter()
        .enumerate()
        .all(|(i, &v)| v == 1.25 + (i % 2) as f32));
    let one = Tensor::from_fn([1, 1, 1, 3], [3, 3, 3, 1], 0.0f32, |[_, _, _, c]| {
        c as f32 - 7.5
    });
    let mut out = Tensor::filled([1, 1, 1, 12], [12, 12, 12, 1], f32::POISON);
    run(&one, 1.0, &mut out).unwrap();
    assert_eq!(
        out.data,
        [-7.5, -6.5, -5.5, -7.5, -6.5, -5.5, -7.5, -6.5, -5.5, -7.5, -6.5, -5.5]
    );
}

/// A known 2x upsample along one axis: torch gives [a, 0.75a + 0.25b,
/// 0.25a + 0.75b, b] for a row [a, b].
#[test]
fn half_pixel_centres_match_torch() {
    let x = [2.0f32, 6.0];
    let mut out = [f32::NAN; 8];
    // h = 1, w = 2 at rho = 1: H' = 2, W' = 4; one packed row of 2 tokens
    token_pack(
        View::contiguous(&x, [1, 1, 2, 1]).unwrap(),
        1.0,
        &mut ViewMut::contiguous(&mut out, [1, 1, 2, 4]).unwrap(),
    )
    .unwrap();
    let row = [2.0f32, 3.0, 5.0, 6.0];
    // token j holds Y[0, 2j], Y[0, 2j + 1], Y[1, 2j], Y[1, 2j + 1]; Y's rows are equal
    assert_eq!(
        out,
        [row[0], row[1], row[0], row[1], row[2], row[3], row[2], row[3]]
    );
}

#[test]
fn rejects_bad_arguments() {
    let x = vec![0.0f32; 27 * 27 * 2];
    let xv = View::contiguous(&x, [1, 27, 27, 2]).unwrap();
    let mut out = vec![f32::NAN; 2 * 19 * 19 * 8];
    let mut go = |rho: f64, shape: [usize; 4]| {
        let n: usize = shape.iter().product();
        token_pack(
            xv,
            rho,
            &mut ViewMut::contiguous(&mut out[..n], shape).unwrap(),
        )
    };
    assert!(go(2.0, [1, 19, 19, 8]).is_ok());
    for shape in [
        [1, 19, 18, 8],
        [1, 19, 19, 2],
        [2, 19, 19, 8],
        [1, 38, 38, 2],
    ] {
        assert!(
            matches!(go(2.0, shape), Err(Error::Shape { arg: "out", .. })),
            "{shape:?}"
        );
    }
    for rho in [0.0, -2.0, f64::NAN, 1e9] {
        assert!(
            matches!(
                go(rho, [1, 19, 19, 8]),
                Err(Error::Value { arg: "rho", .. })
            ),
            "{rho}"
        );
    }
}
