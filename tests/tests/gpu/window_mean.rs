//! window_mean: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU). Both sum the same f32 terms in
//! the same order, so the outputs must be equal (±0 alike); outputs are
//! poisoned first and their gaps must stay poisoned.

use foveal::window_mean::{cpu, cuda, num_windows};
use foveal::{Error, Pool};
use foveal_tests::gpu::{cases, download, gpu, GpuElem};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, Tensor};
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
        let x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -4.0, 4.0);
        let out_shape = [shape[0], num_windows(shape[1], shape[2], window), shape[3]];
        let os = random_strides(&mut r, out_shape);
        let mut want: Tensor<T, 3> = Tensor::filled(out_shape, os, T::POISON);
        let got_t = want.clone();
        cpu::window_mean(x.view(), window, pool, &mut want.view_mut()).expect("CPU");
        let dx = x.upload(&stream);
        let mut dout = got_t.upload(&stream);
        cuda::window_mean(
            &stream,
            &x.dev_view(&dx),
            window,
            pool,
            &mut got_t.dev_view_mut(&mut dout),
        )
        .expect("CUDA");
        let got = download(&stream, &dout);
        for (o, (g, w)) in got.iter().zip(&want.data).enumerate() {
            let same = g.bits() == w.bits() || to_f64(*g) == to_f64(*w);
            assert!(
                same,
                "case {n} ({shape:?}, w {window}, {pool:?}): offset {o}: GPU {g:?}, CPU {w:?}"
            );
        }
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
