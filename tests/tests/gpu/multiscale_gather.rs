//! multiscale_gather: the CUDA path against the CPU reference (feature
//! `cuda`; every test skips where there is no GPU). Counts and positions
//! must be equal, tokens equal without the probability scaling (the same
//! maxima) and within f32 rounding of it with it (expf against the host's
//! exp). Outputs are poisoned first; their gaps must stay poisoned.
//!
//! The pool kernel has two paths (docs/ops/multiscale_gather.md): 16-byte
//! columns where the map and the tokens are 16-byte aligned and C a multiple
//! of 16 bytes, one channel a thread otherwise. `paths_*` builds layouts
//! that take each of them.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::{DevViewMut, Workspace};
use foveal::multiscale_gather::{cpu, cuda, max_tokens};
use foveal::window_mean::num_windows;
use foveal::{Error, Layout, ScaleSet, ViewMut};
use foveal_tests::gpu::{cases, download, gpu, poisoned, GpuElem};
use foveal_tests::{
    aligned_strides, random_strides, random_tensor, rng, same_value, sprinkle_specials, to_f64,
    Tensor, Tol, TIES,
};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    for n in 0..cases(40) {
        let window: usize = [1, 2, 4, 4, 4, 8][r.random_range(0..6)];
        let set = random_set(&mut r, window);
        let shape = [
            r.random_range(1..4),
            r.random_range(1..50),
            r.random_range(1..50),
            r.random_range(1..200),
        ];
        let prob = r.random_bool(0.5);
        let ties = r.random_bool(0.5);
        let xs = random_strides(&mut r, shape);
        let mut x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -4.0, 4.0);
        // Every third case carries +inf, -inf and NaN through the max-pools.
        if n % 3 == 2 {
            sprinkle_specials(&mut r, &mut x, 0.05);
        }
        let z = random_logits(&mut r, shape, window, &set, prob, ties);
        let n_out = max_tokens(shape[1], shape[2], window, &set);
        let ts = random_strides(&mut r, [shape[0], n_out, shape[3]]);
        let tokens: Tensor<T, 3> = Tensor::filled([shape[0], n_out, shape[3]], ts, T::POISON);
        let case = Case { window, set, prob };
        compare(
            &stream,
            &mut ws,
            &x,
            &z,
            tokens,
            &case,
            &format!("case {n}"),
        );
    }
}

/// A scale set for `window`: the 3- or 7-branch set at w = 4 (two draws in
/// three), otherwise 1 to 6 random kernels dividing the window.
fn random_set(r: &mut StdRng, window: usize) -> ScaleSet {
    match (window, r.random_range(0..3)) {
        (4, 0) => ScaleSet::three(),
        (4, 1) => ScaleSet::seven(),
        _ => {
            let divs: Vec<usize> = (1..=window)
                .filter(|&d| window.checked_rem(d) == Some(0))
                .collect();
            let k = r.random_range(1..=6);
            let s: Vec<(usize, usize)> = (0..k)
                .map(|_| {
                    (
                        divs[r.random_range(0..divs.len())],
                        divs[r.random_range(0..divs.len())],
                    )
                })
                .collect();
            ScaleSet::new(&s).unwrap()
        }
    }
}

/// The layouts of `paths`: which of the pool kernel's two paths they take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// 16-byte aligned bases and strides, C a multiple of 16 bytes: the vector path.
    Vector,
    /// The same, but the map's base one element further: the scalar path.
    OffsetBase,
    /// The same, but the tokens' base one element further: the scalar path.
    OffsetTokens,
    /// C one element short of a multiple of 16 bytes: the scalar path.
    OddChannels,
    /// A pixel stride one element longer: the scalar path.
    OddStride,
}

/// Every path of the pool kernel (docs/ops/multiscale_gather.md) on layouts
/// built to take it: 16-byte columns and single channels; windows of 1, 2
/// and 4 (every pixel in one chunk of the token-major list) and 3, 6 and 8
/// (lists of several chunks, tokens across chunks, kernels larger than a
/// border window); map sides that are and are not multiples of the window;
/// C from one vector to three column blocks of 64 threads; the padding
/// blocks (slots past the count, more than one 64-slot chunk).
fn paths<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let vec = 16 / std::mem::size_of::<T>();
    let mut r = rng(seed);
    let all = [
        Path::Vector,
        Path::OffsetBase,
        Path::OffsetTokens,
        Path::OddChannels,
        Path::OddStride,
    ];
    for n in 0..cases(60) {
        let path = if n < all.len() {
            all[n]
        } else {
            all[r.random_range(0..all.len())]
        };
        let window = [1, 2, 3, 4, 4, 4, 6, 8][r.random_range(0..8)];
        let set = random_set(&mut r, window);
        let side = |r: &mut StdRng| {
            if r.random_bool(0.5) {
                window * r.random_range(1..5)
            } else {
                r.random_range(1..3 * window + 2)
            }
        };
        let vectors = [1, 2, 7, 64, 65, 130][r.random_range(0..6)];
        let channels = match path {
            Path::OddChannels => vectors * vec - 1,
            _ => vectors * vec,
        }
        .max(1);
        let shape = [r.random_range(1..3), side(&mut r), side(&mut r), channels];
        let xs = if path == Path::OddStride {
            let sx = channels.next_multiple_of(vec) + 1;
            [sx * shape[2] * shape[1], sx * shape[2], sx, 1]
        } else {
            aligned_strides(&mut r, shape, vec)
        };
        let mut x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -4.0, 4.0);
        if path == Path::OffsetBase {
            x = x.offset_by(1, T::POISON);
        }
        let n_out = max_tokens(shape[1], shape[2], window, &set);
        let tshape = [shape[0], n_out, channels];
        let ts = aligned_strides(&mut r, tshape, vec);
        let mut tokens: Tensor<T, 3> = Tensor::filled(tshape, ts, T::POISON);
        if path == Path::OffsetTokens {
            tokens = tokens.offset_by(1, T::POISON);
        }
        let (prob, ties) = (r.random_bool(0.3), r.random_bool(0.3));
        let z = random_logits(&mut r, shape, window, &set, prob, ties);
        let case = Case { window, set, prob };
        compare(
            &stream,
            &mut ws,
            &x,
            &z,
            tokens,
            &case,
            &format!("case {n} ({path:?})"),
        );
    }
}

/// Selector logits `[B, M, S]` for a map of `shape`: uniform in [-3, 3),
/// or drawn from a few values (`ties`); without the probability scaling,
/// NaN one time in ten.
fn random_logits(
    r: &mut StdRng,
    shape: [usize; 4],
    window: usize,
    set: &ScaleSet,
    prob: bool,
    ties: bool,
) -> Tensor<f32, 3> {
    let zshape = [shape[0], num_windows(shape[1], shape[2], window), set.len()];
    let zs = random_strides(r, zshape);
    Tensor::from_fn(zshape, zs, f32::NAN, |_| {
        if !prob && r.random_bool(0.1) {
            f32::NAN
        } else if ties {
            TIES[r.random_range(0..TIES.len())]
        } else {
            r.random_range(-3.0f32..3.0)
        }
    })
}

/// The arguments of a case besides the tensors.
struct Case {
    window: usize,
    set: ScaleSet,
    /// Eq. 2's probability scaling.
    prob: bool,
}

/// Runs both backends on `x` and `z` into copies of `tokens` and asserts
/// equal counts and positions, and tokens equal (within f32 rounding with
/// the probability scaling), gaps untouched.
fn compare<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    x: &Tensor<T, 4>,
    z: &Tensor<f32, 3>,
    tokens: Tensor<T, 3>,
    case: &Case,
    what: &str,
) {
    let Case {
        window,
        ref set,
        prob,
    } = *case;
    let shape = x.shape;
    let n_out = tokens.shape[1];
    let mut want_t = tokens;
    let mut want_p: Tensor<i32, 2> = Tensor::filled([shape[0], n_out], [n_out + 3, 1], i32::MIN);
    let mut want_c = vec![i32::MIN; shape[0]];
    let got_t = want_t.clone();
    let got_p = want_p.clone();
    cpu::multiscale_gather(
        x.view(),
        z.view(),
        window,
        set,
        prob,
        &mut want_t.view_mut(),
        &mut want_p.view_mut(),
        &mut ViewMut::contiguous(&mut want_c, [shape[0]]).unwrap(),
    )
    .expect("CPU");
    let (dx, dz) = (x.upload(stream), z.upload(stream));
    let (mut dt, mut dp) = (got_t.upload(stream), got_p.upload(stream));
    let mut dc = poisoned::<i32>(stream, shape[0]);
    let mut cview = DevViewMut::new(dc.as_view_mut(), Layout::contiguous([shape[0]])).unwrap();
    cuda::multiscale_gather(
        stream,
        &x.dev_view(&dx),
        &z.dev_view(&dz),
        window,
        set,
        prob,
        &mut got_t.dev_view_mut(&mut dt),
        &mut got_p.dev_view_mut(&mut dp),
        &mut cview,
        ws,
    )
    .expect("CUDA");
    let what = format!(
        "{what}: {shape:?}, strides {:?}, w {window}, {set:?}, prob {prob}",
        x.strides
    );
    assert_eq!(
        download(stream, &dc)[..shape[0]],
        want_c[..],
        "{what}: counts"
    );
    assert_eq!(download(stream, &dp), want_p.data, "{what}: positions");
    let tol = Tol {
        rel: if prob { Tol::for_elem::<T>().rel } else { 0.0 },
        abs: 0.0,
    };
    for (o, (g, w)) in download(stream, &dt).iter().zip(&want_t.data).enumerate() {
        let ok = same_value(*g, *w) || tol.allows(to_f64(*g), to_f64(*w), 0.0);
        assert!(ok, "{what}: token storage offset {o}: GPU {g:?}, CPU {w:?}");
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(21);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(22);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(23);
}

#[test]
fn paths_f32() {
    paths::<f32>(24);
}

#[test]
fn paths_f16() {
    paths::<f16>(25);
}

#[test]
fn paths_bf16() {
    paths::<bf16>(26);
}

#[test]
fn refuses_scales_not_dividing_the_window() {
    let Some(stream) = gpu() else { return };
    let x: Tensor<f32, 4> = Tensor::filled([1, 4, 4, 2], [32, 8, 2, 1], 0.0);
    let z: Tensor<f32, 3> = Tensor::filled([1, 1, 1], [1, 1, 1], 0.0);
    let t: Tensor<f32, 3> = Tensor::filled([1, 16, 2], [32, 2, 1], f32::NAN);
    let p: Tensor<i32, 2> = Tensor::filled([1, 16], [16, 1], -7);
    let (dx, dz, mut dt, mut dp) = (
        x.upload(&stream),
        z.upload(&stream),
        t.upload(&stream),
        p.upload(&stream),
    );
    let mut dc = poisoned::<i32>(&stream, 1);
    let mut cview = DevViewMut::new(dc.as_view_mut(), Layout::contiguous([1])).unwrap();
    let set = ScaleSet::new(&[(3, 3)]).unwrap();
    let e = cuda::multiscale_gather(
        &stream,
        &x.dev_view(&dx),
        &z.dev_view(&dz),
        4,
        &set,
        false,
        &mut t.dev_view_mut(&mut dt),
        &mut p.dev_view_mut(&mut dp),
        &mut cview,
        &mut Workspace::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Value { arg: "scales", .. }));
    assert!(
        download(&stream, &dp).iter().all(|&v| v == -7),
        "written on error"
    );
}
