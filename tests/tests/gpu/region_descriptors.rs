//! region_descriptors: the CUDA path against the CPU reference (feature
//! `cuda`; every test skips where there is no GPU).
//!
//! The kernel sums each region's keys in list order in f32 with the CPU's
//! roundings, so the whole descriptor buffer (regions outside the range
//! still poison) must be bit-identical to the CPU's (NaN payloads aside:
//! keys with +inf, -inf and NaN in a third of the cases); computing the
//! regions piecewise must give the same bits.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::DevView;
use foveal::gaze_layout::cuda::DeviceGazeLayout;
use foveal::region_descriptors::{cpu, cuda};
use foveal::{Error, GazeLayout, GazeRow, RegionShape};
use foveal_tests::gaze_cases::{random_gaze_rows, GazeOpts};
use foveal_tests::gpu::{
    assert_bits_eq, assert_same_values, assert_untouched, cases, download, gpu, GpuElem,
};
use foveal_tests::{
    contiguous_strides, random_tensor, rng, sprinkle_specials, KvOrder, Poison, Tensor,
};
use half::{bf16, f16};
use rand::Rng;

fn poisoned_desc(shape: [usize; 4]) -> Tensor<f32, 4> {
    Tensor::filled(shape, contiguous_strides(shape), f32::POISON)
}

/// Runs the GPU path for `range` over `desc`'s current contents; returns them after.
fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    k: &Tensor<T, 4>,
    layout: &GazeLayout,
    ranges: &[Range<usize>],
    desc: &Tensor<f32, 4>,
) -> Result<Vec<f32>, Error> {
    let dk = k.upload(stream);
    let dlayout = DeviceGazeLayout::new(stream, layout)?;
    let mut dd = desc.upload(stream);
    {
        let kv: DevView<'_, T, 4> = k.dev_view(&dk);
        let mut dv = desc.dev_view_mut(&mut dd);
        for range in ranges {
            cuda::region_descriptors(stream, &kv, &dlayout, range.clone(), &mut dv)?;
        }
    }
    Ok(download(stream, &dd))
}

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut r = rng(seed);
    for case in 0..cases(24) {
        let batch = r.random_range(1..4);
        let opts = GazeOpts {
            max_units: 3,
            max_side: if case % 4 == 3 { 40 } else { 14 },
        };
        let (seq, rows) = random_gaze_rows(&mut r, batch, opts);
        let layout = GazeLayout::new(seq, &rows).unwrap();
        let kv_heads = r.random_range(1..5);
        let head_dim = [8, 16, 64, 80, 96, 128, 256][r.random_range(0..7)];
        let kshape = [batch, seq + r.random_range(0..3), kv_heads, head_dim];
        let order = KvOrder::pick_aligned(&mut r);
        let strides = order.strides(&mut r, kshape);
        let mut k: Tensor<T, 4> = random_tensor(&mut r, kshape, strides, -4.0, 4.0);
        // Every third case carries +inf, -inf and NaN into the means.
        if case % 3 == 2 {
            sprinkle_specials(&mut r, &mut k, 0.02);
        }
        let r_cap = layout.max_regions() + r.random_range(0..3);
        let fresh = poisoned_desc([batch, kv_heads, r_cap, head_dim]);
        let a = r.random_range(0..=r_cap);
        let range = a..r.random_range(a..=r_cap + 1);
        let what = format!(
            "case {case}: k {kshape:?} {order:?}, {} regions max, range {range:?}",
            layout.max_regions()
        );

        let mut want = fresh.clone();
        cpu::region_descriptors(k.view(), &layout, range.clone(), &mut want.view_mut())
            .expect("CPU");
        let got =
            run_gpu(&stream, &k, &layout, std::slice::from_ref(&range), &fresh).expect("CUDA");
        assert_same_values(&got, &want.data, &what);

        // every region, in pieces, on top of the range computed above
        let cuts = [0, r.random_range(0..=r_cap), r_cap];
        let pieces = [cuts[0]..cuts[1], cuts[1]..cuts[2]];
        let mut all = fresh.clone();
        cpu::region_descriptors(k.view(), &layout, 0..r_cap, &mut all.view_mut()).expect("CPU");
        let got = run_gpu(&stream, &k, &layout, &pieces, &fresh).expect("CUDA");
        assert_same_values(&got, &all.data, &format!("{what}: pieces {pieces:?}"));
    }
}

/// Region lengths around the kernel's batches of 16 keys (1, 4, 15, 16, 17,
/// 32, 33, 36, 48 and 98 tokens, and border regions of 6 to 30: one unit
/// each, one and two frames deep), so that every tail of a batch, exact
/// multiples of it and the prefetch past a region's last token are taken;
/// head dims 64, 128 and 256 (8, 16 and 32 threads a head at bf16), 1 to 4
/// KV heads. Bit-identical to the CPU.
fn batch_tails<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut r = rng(seed);
    let units = [
        (1, 1, 1, 1, 1),
        (2, 2, 1, 2, 2),
        (3, 5, 1, 3, 5),
        (4, 4, 1, 4, 4),
        (1, 17, 1, 1, 17),
        (4, 8, 1, 4, 8),
        (3, 11, 1, 3, 11),
        (6, 6, 1, 6, 6),
        (9, 13, 1, 6, 6),
        (4, 6, 2, 4, 6),
        (7, 7, 2, 7, 7),
    ];
    for (n, &(h, w, frames, rh, rw)) in units.iter().enumerate() {
        let mut row = GazeRow::new();
        row.push_visible(0..3);
        let mut at = 3;
        let mut starts = Vec::new();
        for _ in 0..frames {
            starts.push(at);
            at += h * w;
        }
        let shape = RegionShape {
            frames,
            height: rh,
            width: rw,
        };
        row.push_units(&starts, h, w, shape).expect("units");
        row.push_visible(at..at + 2);
        let seq = at + 2;
        let layout = GazeLayout::new(seq, &[row]).unwrap();
        let kv_heads = 1 + n % 4;
        let head_dim = [64, 128, 256][n % 3];
        let kshape = [1, seq, kv_heads, head_dim];
        let order = KvOrder::pick_aligned(&mut r);
        let strides = order.strides(&mut r, kshape);
        let k: Tensor<T, 4> = random_tensor(&mut r, kshape, strides, -4.0, 4.0);
        let r_cap = layout.max_regions();
        let fresh = poisoned_desc([1, kv_heads, r_cap, head_dim]);
        let mut want = fresh.clone();
        cpu::region_descriptors(k.view(), &layout, 0..r_cap, &mut want.view_mut()).expect("CPU");
        let got = run_gpu(
            &stream,
            &k,
            &layout,
            std::slice::from_ref(&(0..r_cap)),
            &fresh,
        )
        .expect("CUDA");
        let what = format!(
            "unit {h} x {w} x {frames}, regions {rh} x {rw}: longest {}, k {kshape:?} {order:?}",
            layout.max_region_len()
        );
        assert_bits_eq(&got, &want.data, &what);
    }
}

#[test]
fn batch_tails_f32() {
    batch_tails::<f32>(11);
}

#[test]
fn batch_tails_f16() {
    batch_tails::<f16>(12);
}

#[test]
fn batch_tails_bf16() {
    batch_tails::<bf16>(13);
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(41);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(42);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(43);
}

#[test]
fn refuses_unsupported_head_dims_strides_and_alignment() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(44);
    let mut row = GazeRow::new();
    row.regions.push(vec![0, 2, 3]);
    let layout = GazeLayout::new(4, &[row]).unwrap();
    let desc = |d: usize| poisoned_desc([1, 2, 1, d]);
    let unsupported = |k: &Tensor<bf16, 4>, d: usize| {
        let out = run_gpu(&stream, k, &layout, std::slice::from_ref(&(0..1)), &desc(d));
        assert!(
            matches!(out, Err(Error::Unsupported { .. })),
            "k {:?} {:?}: {out:?}",
            k.shape,
            k.strides
        );
    };
    // head dim 12: not a multiple of 16 bytes
    unsupported(
        &random_tensor(&mut r, [1, 4, 2, 12], [96, 24, 12, 1], -1.0, 1.0),
        12,
    );
    // a token stride of 20 elements (40 bytes)
    unsupported(
        &random_tensor(&mut r, [1, 4, 2, 8], [80, 20, 8, 1], -1.0, 1.0),
        8,
    );
    // a base 2 bytes past a 16-byte boundary
    unsupported(
        &random_tensor::<bf16, 4>(&mut r, [1, 4, 2, 8], [64, 16, 8, 1], -1.0, 1.0)
            .offset_by(1, bf16::POISON),
        8,
    );
    // an argument error comes first and writes nothing
    let k: Tensor<bf16, 4> = random_tensor(&mut r, [1, 4, 2, 8], [64, 16, 8, 1], -1.0, 1.0);
    let fresh = desc(8);
    let dk = k.upload(&stream);
    let dlayout = DeviceGazeLayout::new(&stream, &layout).unwrap();
    let mut dd = fresh.upload(&stream);
    {
        let mut dv = fresh.dev_view_mut(&mut dd);
        #[allow(clippy::reversed_empty_ranges)]
        let out = cuda::region_descriptors(&stream, &k.dev_view(&dk), &dlayout, 1..0, &mut dv);
        assert!(
            matches!(out, Err(Error::Value { arg: "regions", .. })),
            "{out:?}"
        );
    }
    assert_untouched(&download(&stream, &dd), "desc");
}
