//! pos_conv1d: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU). Both compute the same f32
//! operations in the same order (separately rounded products and sums), so
//! the outputs must be bit-identical, in the vector path (16-byte aligned
//! tensors, C a multiple of the vector) and the scalar one alike. Outputs
//! are poisoned first and compared over their whole storage (gaps included);
//! tokens past each row's length are NaN.

use foveal::cuda::DeviceLens;
use foveal::pos_conv1d::{cpu, cuda, KERNEL_SIZE};
use foveal::Error;
use foveal_tests::gpu::{assert_bits_eq, assert_untouched, cases, download, gpu, GpuElem};
use foveal_tests::{contiguous_strides, random_strides, random_tensor, rng, Tensor};
use half::{bf16, f16};
use rand::Rng;

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut r = rng(seed);
    let vec = 16 / std::mem::size_of::<T>();
    for n in 0..cases(40) {
        // half of the cases in the vector path: contiguous, C a multiple of the vector
        let vector = n % 2 == 0;
        let c = if vector {
            vec * r.random_range(1..40)
        } else {
            r.random_range(1..70)
        };
        let shape = [r.random_range(1..4), r.random_range(1..300), c];
        let [batch, tokens, _] = shape;
        let lens: Vec<usize> = (0..batch)
            .map(|_| match r.random_range(0..5) {
                0 => 0,
                1 => tokens,
                2 => r.random_range(0..=tokens.min(6)),
                _ => r.random_range(0..=tokens),
            })
            .collect();
        let xs = if vector {
            contiguous_strides(shape)
        } else {
            random_strides(&mut r, shape)
        };
        let mut x: Tensor<T, 3> = random_tensor(&mut r, shape, xs, -2.0, 2.0);
        for (b, &len) in lens.iter().enumerate() {
            for i in len..tokens {
                for ch in 0..c {
                    let o = x.offset([b, i, ch]);
                    x.data[o] = T::POISON;
                }
            }
        }
        let ws = random_strides(&mut r, [c, KERNEL_SIZE]);
        let w: Tensor<T, 2> = random_tensor(&mut r, [c, KERNEL_SIZE], ws, -1.0, 1.0);
        let bias: Tensor<T, 1> = random_tensor(&mut r, [c], [1], -1.0, 1.0);
        let os = if vector {
            contiguous_strides(shape)
        } else {
            random_strides(&mut r, shape)
        };
        let mut want: Tensor<T, 3> = Tensor::filled(shape, os, T::POISON);
        let out = want.clone();
        cpu::pos_conv1d(x.view(), &lens, w.view(), bias.view(), &mut want.view_mut()).expect("CPU");
        let (dx, dw, db) = (x.upload(&stream), w.upload(&stream), bias.upload(&stream));
        let mut dout = out.upload(&stream);
        let dlens = DeviceLens::new(&stream, &lens).unwrap();
        cuda::pos_conv1d(
            &stream,
            &x.dev_view(&dx),
            &dlens,
            &w.dev_view(&dw),
            &bias.dev_view(&db),
            &mut out.dev_view_mut(&mut dout),
        )
        .expect("CUDA");
        assert_bits_eq(
            &download(&stream, &dout),
            &want.data,
            &format!("case {n}: {shape:?}, lens {lens:?}, vector {vector}"),
        );
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(61);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(62);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(63);
}

#[test]
fn refuses_lengths_past_the_tokens() {
    let Some(stream) = gpu() else { return };
    let x: Tensor<f32, 3> = Tensor::filled([1, 4, 8], [32, 8, 1], 0.5);
    let w: Tensor<f32, 2> = Tensor::filled([8, KERNEL_SIZE], [KERNEL_SIZE, 1], 0.5);
    let bias: Tensor<f32, 1> = Tensor::filled([8], [1], 0.5);
    let out: Tensor<f32, 3> = Tensor::filled([1, 4, 8], [32, 8, 1], f32::NAN);
    let (dx, dw, db) = (x.upload(&stream), w.upload(&stream), bias.upload(&stream));
    let mut dout = out.upload(&stream);
    let e = cuda::pos_conv1d(
        &stream,
        &x.dev_view(&dx),
        &DeviceLens::new(&stream, &[5]).unwrap(),
        &w.dev_view(&dw),
        &bias.dev_view(&db),
        &mut out.dev_view_mut(&mut dout),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Index { arg: "lens", .. }), "{e:?}");
    assert_untouched(&download(&stream, &dout), "refused call");
}
