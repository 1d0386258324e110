//! glance_fusion: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU).
//!
//! The two sides sum in other orders (the GPU: 16 interleaved partial means,
//! per-thread columns, then warp and block trees), so each must lie within
//! the f64 oracle's error bound of the exact result
//! (foveal_tests::glance_fusion): the GPU's output is compared with the
//! CPU's within twice that bound plus both roundings to the element type.
//! Padding rows must be exactly 0, one layer exactly the identity. Outputs
//! are poisoned first (their gaps must stay poisoned, their guards too); a
//! second run must be bit-identical. Shapes cover both access paths: 16-byte
//! columns (aligned strides, dt a multiple of 16 bytes) and element accesses
//! (any strides, odd dt, a base off the 16-byte boundary).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::Workspace;
use foveal::glance_fusion::cuda::DeviceLengths;
use foveal::glance_fusion::{cpu, cuda, Lengths};
use foveal::Error;
use foveal_tests::glance_fusion::{
    around_reference, assert_matches, inputs, oracle, strides, Case,
};
use foveal_tests::gpu::{assert_untouched, cases, download, gpu, GpuElem};
use foveal_tests::{contiguous_strides, rng, Poison, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

/// Runs the GPU path into copies of the (poisoned) output tensors.
#[allow(clippy::too_many_arguments)]
fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    vq: &Tensor<T, 4>,
    e: &Tensor<T, 4>,
    lengths: &Lengths,
    out: &Tensor<T, 3>,
    weights: Option<&Tensor<f32, 3>>,
    ws: &mut Workspace,
) -> Result<(Tensor<T, 3>, Option<Tensor<f32, 3>>), Error> {
    let (dvq, de) = (vq.upload(stream), e.upload(stream));
    let dl = DeviceLengths::new(stream, lengths)?;
    let mut dout = out.upload(stream);
    let mut dw = weights.map(|w| w.upload(stream));
    {
        let mut ov = out.dev_view_mut(&mut dout);
        let mut wv = weights.zip(dw.as_mut()).map(|(w, d)| w.dev_view_mut(d));
        cuda::glance_fusion(
            stream,
            &vq.dev_view(&dvq),
            &e.dev_view(&de),
            &dl,
            &mut ov,
            wv.as_mut(),
            ws,
        )?;
    }
    let got_out = Tensor {
        data: download(stream, &dout),
        ..out.clone()
    };
    let got_w = weights.zip(dw).map(|(w, d)| Tensor {
        data: download(stream, &d),
        ..w.clone()
    });
    Ok((got_out, got_w))
}

/// dt: odd and small, a multiple of the 16-byte column, or large (up to
/// 4,096; f32 past 2,048 takes two columns a thread).
fn random_dim(r: &mut StdRng, vec: usize) -> usize {
    match r.random_range(0..10) {
        0..=3 => r.random_range(1..=300),
        4..=7 => vec * r.random_range(1..=64),
        8 => vec * r.random_range(256..=4096 / vec),
        _ => 4096,
    }
}

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    let vec = 16 / std::mem::size_of::<T>();
    for i in 0..cases(40) {
        let dim = random_dim(&mut r, vec);
        // keep the large-dt cases small in tokens
        let tokens = if dim > 512 { 1..=6 } else { 1..=40 };
        let case = Case::draw(&mut r, [1..=8, 1..=3, tokens, 1..=20, dim..=dim]);
        let aligned = r.random_bool(0.7);
        let align = aligned.then_some(vec);
        let (mut vq, e) = inputs::<T>(&mut r, &case, align, if i % 2 == 0 { 1.0 } else { 3.0 });
        if !aligned && r.random_bool(0.5) {
            vq = vq.offset_by(r.random_range(1..vec), T::POISON);
        }
        let lengths = case.lengths();
        let out_t = Tensor::filled(
            case.out_shape(),
            strides(&mut r, case.out_shape(), align),
            T::POISON,
        );
        let w_t = Tensor::filled(
            case.weights_shape(),
            strides(&mut r, case.weights_shape(), None),
            f32::NAN,
        );
        let (mut want_out, mut want_w) = (out_t.clone(), w_t.clone());
        cpu::glance_fusion(
            vq.view(),
            e.view(),
            &lengths,
            &mut want_out.view_mut(),
            Some(&mut want_w.view_mut()),
        )
        .expect("CPU");
        let with_weights = i % 4 != 3;
        let (got, got_w) = run_gpu(
            &stream,
            &vq,
            &e,
            &lengths,
            &out_t,
            with_weights.then_some(&w_t),
            &mut ws,
        )
        .expect("CUDA");
        let what = format!("case {i} ({case:?}, aligned {aligned})");
        let want = around_reference(&oracle(&vq, &e, &lengths), &want_out, &want_w);
        assert_matches(&got, got_w.as_ref(), &want, 1.0, &what);
        for o in got.gap_offsets() {
            assert_eq!(
                got.data[o].bits(),
                T::POISON.bits(),
                "{what}: out gap {o} written"
            );
        }
        if let Some(w) = &got_w {
            for o in w.gap_offsets() {
                assert!(w.data[o].is_nan(), "{what}: weights gap {o} written");
            }
        }
        // deterministic: a second run gives the same bits
        let (again, _) = run_gpu(&stream, &vq, &e, &lengths, &out_t, None, &mut ws).expect("CUDA");
        let same = got
            .data
            .iter()
            .zip(&again.data)
            .all(|(a, b)| a.bits() == b.bits());
        assert!(same, "{what}: a second run differs");
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

/// One layer: weights exactly 1, out equal to vq bit for bit (on both paths).
fn single_layer<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    let vec = 16 / std::mem::size_of::<T>();
    for i in 0..cases(8) {
        let dim = random_dim(&mut r, vec);
        let case = Case::draw(&mut r, [1..=1, 1..=3, 1..=9, 1..=5, dim..=dim]);
        let align = (i % 2 == 0).then_some(vec);
        let (mut vq, e) = inputs::<T>(&mut r, &case, align, 3.0);
        let o = vq.offset([0, 0, 0, 0]);
        vq.data[o] = T::from_f32(-0.0);
        let out_t = Tensor::filled(
            case.out_shape(),
            contiguous_strides(case.out_shape()),
            T::POISON,
        );
        let w_t = Tensor::filled(
            case.weights_shape(),
            contiguous_strides(case.weights_shape()),
            f32::NAN,
        );
        let (got, w) = run_gpu(
            &stream,
            &vq,
            &e,
            &case.lengths(),
            &out_t,
            Some(&w_t),
            &mut ws,
        )
        .expect("CUDA");
        let w = w.expect("weights");
        for b in 0..case.batch {
            for n in 0..case.tokens {
                let valid = n < case.n_len[b];
                assert_eq!(w.get([b, n, 0]), if valid { 1.0 } else { 0.0 }, "{case:?}");
                for c in 0..case.dim {
                    let want = if valid {
                        vq.get([0, b, n, c])
                    } else {
                        T::from_f32(0.0)
                    };
                    assert_eq!(
                        got.get([b, n, c]).bits(),
                        want.bits(),
                        "{case:?}: [{b}, {n}, {c}]"
                    );
                }
            }
        }
    }
}

#[test]
fn one_layer_is_the_identity() {
    single_layer::<f32>(11);
    single_layer::<f16>(12);
    single_layer::<bf16>(13);
}

/// Non-finite scores (module docs of foveal::glance_fusion): the GPU's NaNs
/// where the CPU's are, its finite values close to the CPU's.
#[test]
fn non_finite_scores_match_cpu() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let (layers, tokens, dim) = (3, 5, 16);
    let e = Tensor::from_fn(
        [layers, 1, 1, dim],
        contiguous_strides([layers, 1, 1, dim]),
        0.0f32,
        |[s, _, _, c]| {
            if s == 0 && c == 0 {
                f32::INFINITY
            } else {
                0.1 * (1 + s + c) as f32
            }
        },
    );
    // layer-0 channel 0: -1 (score -inf, weight 0), +1 (+inf: NaN), 0 (NaN);
    // token 3 has a NaN in layer 2, token 4 is finite throughout.
    let vq = Tensor::from_fn(
        [layers, 1, tokens, dim],
        contiguous_strides([layers, 1, tokens, dim]),
        0.0f32,
        |[s, _, n, c]| match (n, s, c) {
            (0, 0, 0) => -1.0,
            (1, 0, 0) => 1.0,
            (2, 0, 0) | (4, 0, 0) => 0.0,
            (3, 2, 5) => f32::NAN,
            _ => 0.05 * (1 + n + s + c) as f32,
        },
    );
    let lengths = Lengths::full(1, tokens, 1);
    let out_t = Tensor::filled(
        [1, tokens, dim],
        contiguous_strides([1, tokens, dim]),
        f32::NAN,
    );
    let w_t = Tensor::filled(
        [1, tokens, layers],
        contiguous_strides([1, tokens, layers]),
        f32::NAN,
    );
    let (mut want, mut want_w) = (out_t.clone(), w_t.clone());
    cpu::glance_fusion(
        vq.view(),
        e.view(),
        &lengths,
        &mut want.view_mut(),
        Some(&mut want_w.view_mut()),
    )
    .unwrap();
    let (got, got_w) =
        run_gpu(&stream, &vq, &e, &lengths, &out_t, Some(&w_t), &mut ws).expect("CUDA");
    let got_w = got_w.expect("weights");
    let pairs = got
        .data
        .iter()
        .zip(&want.data)
        .chain(got_w.data.iter().zip(&want_w.data));
    for (k, (&g, &w)) in pairs.enumerate() {
        assert_eq!(g.is_nan(), w.is_nan(), "element {k}: GPU {g}, CPU {w}");
        if !w.is_nan() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "element {k}: GPU {g}, CPU {w}"
            );
        }
    }
    assert_eq!(got_w.get([0, 0, 0]), 0.0, "a -inf score weighs 0");
    assert!(
        (0..dim).all(|c| got.get([0, 4, c]).is_finite()),
        "token 4 is finite"
    );
}

/// Refused before launch, outputs untouched: past the kernels' limits
/// (`Unsupported`) and a row without instruction tokens (`m_len`).
#[test]
fn refuses_bad_input() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(5);
    for (case, is_err) in [
        (
            Case::random(&mut r, 9, 1, 2, 1, 8),
            Box::new(|e: &Error| matches!(e, Error::Unsupported { .. }))
                as Box<dyn Fn(&Error) -> bool>,
        ),
        (
            Case::random(&mut r, 2, 1, 2, 1, 4104),
            Box::new(|e: &Error| matches!(e, Error::Unsupported { .. })),
        ),
        (
            Case {
                m_len: vec![1, 0],
                ..Case::random(&mut r, 2, 2, 3, 2, 8)
            },
            Box::new(|e: &Error| matches!(e, Error::Value { arg: "m_len", .. })),
        ),
    ] {
        let (vq, e) = inputs::<bf16>(&mut r, &case, Some(8), 1.0);
        let out_t = Tensor::filled(
            case.out_shape(),
            contiguous_strides(case.out_shape()),
            bf16::POISON,
        );
        let (dvq, de) = (vq.upload(&stream), e.upload(&stream));
        let dl = DeviceLengths::new(&stream, &case.lengths()).unwrap();
        let mut dout = out_t.upload(&stream);
        let err = cuda::glance_fusion(
            &stream,
            &vq.dev_view(&dvq),
            &e.dev_view(&de),
            &dl,
            &mut out_t.dev_view_mut(&mut dout),
            None,
            &mut ws,
        )
        .unwrap_err();
        assert!(is_err(&err), "{case:?}: {err}");
        assert_untouched(&download(&stream, &dout), "out");
    }
}

/// The two access paths (16-byte columns; element accesses, taken here
/// because `vq` starts one element off the 16-byte boundary) have the same
/// columns and summation order: the same inputs give the same bits.
fn paths_agree<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    let vec = 16 / std::mem::size_of::<T>();
    for _ in 0..cases(6) {
        let dim = vec * r.random_range(1..=64);
        let case = Case::draw(&mut r, [1..=8, 1..=3, 1..=20, 1..=10, dim..=dim]);
        let (vq, e) = inputs::<T>(&mut r, &case, Some(vec), 3.0);
        let shifted = vq.clone().offset_by(1, T::POISON);
        let lengths = case.lengths();
        let out_t = Tensor::filled(
            case.out_shape(),
            contiguous_strides(case.out_shape()),
            T::POISON,
        );
        let w_t = Tensor::filled(
            case.weights_shape(),
            contiguous_strides(case.weights_shape()),
            f32::NAN,
        );
        let (wide, ww) =
            run_gpu(&stream, &vq, &e, &lengths, &out_t, Some(&w_t), &mut ws).expect("CUDA");
        let (narrow, nw) =
            run_gpu(&stream, &shifted, &e, &lengths, &out_t, Some(&w_t), &mut ws).expect("CUDA");
        let same = wide
            .data
            .iter()
            .zip(&narrow.data)
            .all(|(a, b)| a.bits() == b.bits());
        assert!(
            same,
            "{case:?}: the element path differs from the 16-byte path"
        );
        let (ww, nw) = (ww.expect("weights"), nw.expect("weights"));
        assert!(
            ww.data
                .iter()
                .zip(&nw.data)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case:?}: weights differ"
        );
    }
}

#[test]
fn access_paths_give_the_same_bits() {
    paths_agree::<f32>(21);
    paths_agree::<f16>(22);
    paths_agree::<bf16>(23);
}
