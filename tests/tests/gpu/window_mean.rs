//! window_mean: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU). Both sum the same f32 terms in
//! the same order, so the outputs must be equal (±0 alike); outputs are
//! poisoned first and their gaps must stay poisoned.
//!
//! The kernel has two paths (docs/ops/window_mean.md): 16-byte columns where
//! the views are 16-byte aligned and C a multiple of 16 bytes, one channel a
//! thread otherwise; and, on each, windows of w <= 4 as one 4 x 4 tile (the
//! interior windows of w = 4 without predicates) or a row at a time in
//! chunks of 16 cells. `paths_*` builds layouts that take each of them.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::window_mean::{cpu, cuda, num_windows};
use foveal::{Error, Pool};
use foveal_tests::gpu::{cases, download, gpu, GpuElem};
use foveal_tests::{
    aligned_strides, random_strides, random_tensor, rng, same_value, sprinkle_specials, to_f64,
    Tensor,
};
use half::{bf16, f16};
use rand::Rng;

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut r = rng(seed);
    for n in 0..cases(40) {
        let shape = [
            r.random_range(1..4),
            r.random_range(1..40),
            r.random_range(1..40),
            r.random_range(1..300),
        ];
        let window = r.random_range(1..9);
        let pool = if r.random_bool(0.5) {
            Pool::Max
        } else {
            Pool::Mean
        };
        let xs = random_strides(&mut r, shape);
        let mut x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -4.0, 4.0);
        // Every third case carries +inf, -inf and NaN through the pools.
        if n % 3 == 2 {
            sprinkle_specials(&mut r, &mut x, 0.05);
        }
        let out_shape = [shape[0], num_windows(shape[1], shape[2], window), shape[3]];
        let os = random_strides(&mut r, out_shape);
        let out: Tensor<T, 3> = Tensor::filled(out_shape, os, T::POISON);
        compare(&stream, &x, window, pool, out, &format!("case {n}"));
    }
}

/// The layouts of `paths`: which of the kernel's two paths they take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// 16-byte aligned bases and strides, C a multiple of 16 bytes: the vector path.
    Vector,
    /// The same, but the map's base one element further: the scalar path.
    OffsetBase,
    /// The same, but the output's base one element further: the scalar path.
    OffsetOut,
    /// C one element short of a multiple of 16 bytes (aligned strides): the scalar path.
    OddChannels,
    /// A cell stride one element longer: the scalar path.
    OddStride,
}

/// Every path of the kernel on layouts built to take it: windows of 1 to 5
/// (w <= 4: the 4 x 4 tile, interior and border windows; w = 5: rows), 17
/// to 20 (rows of more than one 16-cell chunk, with and without a
/// remainder), maps whose sides are and are not multiples of the window, C
/// from one vector to several column blocks of 64 threads (and one vector
/// short or over), every pool.
fn paths<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let vec = 16 / std::mem::size_of::<T>();
    let mut r = rng(seed);
    let all = [
        Path::Vector,
        Path::OffsetBase,
        Path::OffsetOut,
        Path::OddChannels,
        Path::OddStride,
    ];
    for n in 0..cases(60) {
        let path = if n < all.len() {
            all[n]
        } else {
            all[r.random_range(0..all.len())]
        };
        let window = [1, 2, 3, 4, 4, 4, 5, 17, 20][r.random_range(0..9)];
        let side = |r: &mut rand::rngs::StdRng| {
            if r.random_bool(0.5) {
                window * r.random_range(1..4)
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
        let pool = if r.random_bool(0.5) {
            Pool::Max
        } else {
            Pool::Mean
        };
        let xs = if path == Path::OddStride {
            // [B, Hx, Wx, C] in that order, rows one element longer than
            // a multiple of the vector.
            let sx = channels.next_multiple_of(vec) + 1;
            [sx * shape[2] * shape[1], sx * shape[2], sx, 1]
        } else {
            aligned_strides(&mut r, shape, vec)
        };
        let mut x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -4.0, 4.0);
        if path == Path::OffsetBase {
            x = x.offset_by(1, T::POISON);
        }
        let out_shape = [shape[0], num_windows(shape[1], shape[2], window), channels];
        let os = aligned_strides(&mut r, out_shape, vec);
        let mut out: Tensor<T, 3> = Tensor::filled(out_shape, os, T::POISON);
        if path == Path::OffsetOut {
            out = out.offset_by(1, T::POISON);
        }
        compare(
            &stream,
            &x,
            window,
            pool,
            out,
            &format!("case {n} ({path:?})"),
        );
    }
}

/// Runs both backends on `x` into copies of `out` and asserts equal outputs
/// (and untouched gaps).
fn compare<T: GpuElem>(
    stream: &Arc<CudaStream>,
    x: &Tensor<T, 4>,
    window: usize,
    pool: Pool,
    out: Tensor<T, 3>,
    what: &str,
) {
    let mut want = out;
    let got_t = want.clone();
    cpu::window_mean(x.view(), window, pool, &mut want.view_mut()).expect("CPU");
    let dx = x.upload(stream);
    let mut dout = got_t.upload(stream);
    cuda::window_mean(
        stream,
        &x.dev_view(&dx),
        window,
        pool,
        &mut got_t.dev_view_mut(&mut dout),
    )
    .expect("CUDA");
    let got = download(stream, &dout);
    for (o, (g, w)) in got.iter().zip(&want.data).enumerate() {
        let same = same_value(*g, *w) || to_f64(*g) == to_f64(*w);
        assert!(
            same,
            "{what} ({:?}, strides {:?}, w {window}, {pool:?}): offset {o}: GPU {g:?}, CPU {w:?}",
            x.shape, x.strides
        );
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(1);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(2);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(3);
}

#[test]
fn paths_f32() {
    paths::<f32>(4);
}

#[test]
fn paths_f16() {
    paths::<f16>(5);
}

#[test]
fn paths_bf16() {
    paths::<bf16>(6);
}

#[test]
fn refuses_bad_window() {
    let Some(stream) = gpu() else { return };
    let x: Tensor<f32, 4> = Tensor::filled([1, 4, 4, 2], [32, 8, 2, 1], 0.0);
    let out: Tensor<f32, 3> = Tensor::filled([1, 1, 2], [2, 2, 1], f32::NAN);
    let dx = x.upload(&stream);
    let mut dout = out.upload(&stream);
    let e = cuda::window_mean(
        &stream,
        &x.dev_view(&dx),
        0,
        Pool::Mean,
        &mut out.dev_view_mut(&mut dout),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Value { arg: "window", .. }));
}
