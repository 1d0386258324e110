//! token_pack: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU). Both compute the same f32
//! operations in the same order (source indices, weights, interpolation), so
//! the outputs must be bit-identical, in the vector path and the scalar one
//! alike. Outputs are poisoned first and compared over their whole storage
//! (gaps included).

use foveal::token_pack::{cpu, cuda, resized_grid};
use foveal::Error;
use foveal_tests::gpu::{assert_bits_eq, assert_untouched, cases, download, gpu, GpuElem};
use foveal_tests::{contiguous_strides, random_strides, random_tensor, rng, Tensor};
use half::{bf16, f16};
use rand::Rng;

/// The identity resize (4), a 2x upsample (1) and non-powers of two.
const RATIOS: [f64; 8] = [1.0, 1.5, 2.0, 2.7, 3.0, 4.0, 5.3, 9.0];

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut r = rng(seed);
    let vec = 16 / std::mem::size_of::<T>();
    let mut n = 0;
    while n < cases(40) {
        let vector = n % 2 == 0;
        let c = if vector {
            vec * r.random_range(1..20)
        } else {
            r.random_range(1..40)
        };
        // LLaVA-OneVision's 27 x 27 grid now and then
        let (h, w) = if r.random_bool(0.2) {
            (27, 27)
        } else {
            (r.random_range(1..40), r.random_range(1..40))
        };
        let rho = RATIOS[r.random_range(0..RATIOS.len())];
        let Ok([oh, ow]) = resized_grid(h, w, rho) else {
            continue;
        };
        n += 1;
        let shape = [r.random_range(1..3), h, w, c];
        let out_shape = [shape[0], oh / 2, ow / 2, 4 * c];
        let (xs, os) = if vector {
            (contiguous_strides(shape), contiguous_strides(out_shape))
        } else {
            (
                random_strides(&mut r, shape),
                random_strides(&mut r, out_shape),
            )
        };
        let x: Tensor<T, 4> = random_tensor(&mut r, shape, xs, -3.0, 3.0);
        let mut want: Tensor<T, 4> = Tensor::filled(out_shape, os, T::POISON);
        let out = want.clone();
        cpu::token_pack(x.view(), rho, &mut want.view_mut()).expect("CPU");
        let dx = x.upload(&stream);
        let mut dout = out.upload(&stream);
        cuda::token_pack(
            &stream,
            &x.dev_view(&dx),
            rho,
            &mut out.dev_view_mut(&mut dout),
        )
        .expect("CUDA");
        assert_bits_eq(
            &download(&stream, &dout),
            &want.data,
            &format!("case {n}: {shape:?}, rho {rho}, vector {vector}"),
        );
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(71);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(72);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(73);
}

#[test]
fn refuses_a_ratio_that_leaves_nothing() {
    let Some(stream) = gpu() else { return };
    let x: Tensor<f32, 4> = Tensor::filled([1, 3, 3, 2], [18, 6, 2, 1], 1.0);
    let out: Tensor<f32, 4> = Tensor::filled([1, 1, 1, 8], [8, 8, 8, 1], f32::NAN);
    let dx = x.upload(&stream);
    let mut dout = out.upload(&stream);
    let e = cuda::token_pack(
        &stream,
        &x.dev_view(&dx),
        100.0,
        &mut out.dev_view_mut(&mut dout),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Value { arg: "rho", .. }), "{e:?}");
    assert_untouched(&download(&stream, &dout), "refused call");
}
