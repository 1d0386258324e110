//! route_topk: the CUDA path against the CPU reference (feature `cuda`;
//! every test skips where there is no GPU).
//!
//! The score kernel forms each dot product in the CPU's order with the CPU's
//! roundings (no FMA), so the scores, and hence the routes, must equal the
//! CPU's exactly, on random data as on data full of exact ties and NaN. The
//! routes start "one id short" in every list (a wrong answer for every row
//! with regions), so a list the kernels fail to write cannot pass. Rows of
//! more regions than the select kernel caches in shared memory take its
//! fallback path.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::Workspace;
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::route_topk::{cpu, cuda};
use foveal::{Error, GazeLayout, GazeRow, Routes};
use foveal_tests::gaze_cases::{random_gaze_rows, GazeOpts};
use foveal_tests::gpu::{cases, gpu, GpuElem};
use foveal_tests::{contiguous_strides, random_strides, rng, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

struct Case<T> {
    layout: GazeLayout,
    q: Tensor<T, 4>,
    desc: Tensor<f32, 4>,
    k: usize,
}

/// Each list one id short of any correct answer: ids `0..min(k, count) - 1`.
fn short_routes(layout: &GazeLayout, queries: usize, heads: usize, k: usize) -> Routes {
    let mut ids = vec![-1; layout.batch() * queries * heads * k];
    for (i, list) in ids.chunks_mut(k).enumerate() {
        let count = layout.regions(i / (queries * heads));
        for (j, slot) in list
            .iter_mut()
            .enumerate()
            .take(k.min(count).saturating_sub(1))
        {
            *slot = j as i32;
        }
    }
    Routes::from_ids(layout, queries, heads, k, &ids).unwrap()
}

fn value(r: &mut StdRng, exact: bool) -> f32 {
    if exact {
        r.random_range(-3..=3) as f32
    } else {
        r.random_range(-2.0..2.0)
    }
}

fn random_case<T: GpuElem>(r: &mut StdRng, layout: GazeLayout, big_k: bool) -> Case<T> {
    let batch = layout.batch();
    let exact = r.random_bool(0.5);
    let queries = r.random_range(1..4);
    let kv_heads = r.random_range(1..4);
    let group = r.random_range(1..=9);
    let head_dim = [4, 8, 64, 80, 96, 128, 256][r.random_range(0..7)];
    let qshape = [batch, queries, kv_heads * group, head_dim];
    let qs = random_strides(r, qshape);
    let q = Tensor::from_fn(qshape, qs, T::POISON, |_| T::from_f32(value(r, exact)));
    let dshape = [
        batch,
        kv_heads,
        layout.max_regions() + r.random_range(0..3),
        head_dim,
    ];
    // rows 16-byte aligned: strides multiples of 4 floats
    let mut ds = contiguous_strides(dshape);
    if r.random_bool(0.5) {
        ds[2] += 4;
        ds[1] = ds[2] * dshape[2];
        ds[0] = ds[1] * dshape[1];
    }
    let nan = if exact { 0.03 } else { 0.0 };
    let mut desc = Tensor::from_fn(dshape, ds, f32::NAN, |_| {
        if r.random_bool(nan) {
            f32::NAN
        } else {
            value(r, exact)
        }
    });
    if exact {
        // duplicate some descriptor rows: exact ties
        for b in 0..batch {
            for reg in 1..layout.regions(b) {
                if r.random_bool(0.2) {
                    let (h, from) = (r.random_range(0..kv_heads), r.random_range(0..reg));
                    for e in 0..head_dim {
                        let (src, dst) =
                            (desc.offset([b, h, from, e]), desc.offset([b, h, reg, e]));
                        desc.data[dst] = desc.data[src];
                    }
                }
            }
        }
    }
    let max = layout.max_regions().max(1);
    let k = if big_k {
        r.random_range(1..max + 4)
    } else {
        r.random_range(1..9)
    };
    Case { layout, q, desc, k }
}

fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    c: &Case<T>,
    start: &Routes,
    ws: &mut Workspace,
) -> Result<Routes, Error> {
    let [_, queries, heads, _] = c.q.shape;
    let (dq, dd) = (c.q.upload(stream), c.desc.upload(stream));
    let layout = DeviceGazeLayout::new(stream, &c.layout)?;
    let mut routes = DeviceRoutes::from_host(stream, start)?;
    assert_eq!(routes.shape(), [c.layout.batch(), queries, heads, c.k]);
    cuda::route_topk(
        stream,
        &c.q.dev_view(&dq),
        &c.desc.dev_view(&dd),
        &layout,
        c.k,
        &mut routes,
        ws,
    )?;
    routes.to_host(stream)
}

fn compare<T: GpuElem>(stream: &Arc<CudaStream>, c: &Case<T>, ws: &mut Workspace, what: &str) {
    let [_, queries, heads, _] = c.q.shape;
    let mut want = Routes::new(&c.layout, queries, heads, c.k);
    cpu::route_topk(c.q.view(), c.desc.view(), &c.layout, c.k, &mut want).expect("CPU");
    let start = short_routes(&c.layout, queries, heads, c.k);
    let got = run_gpu(stream, c, &start, ws).expect("CUDA");
    assert_eq!(got.shape(), want.shape(), "{what}");
    if let Some(i) = (0..got.ids().len()).find(|&i| got.ids()[i] != want.ids()[i]) {
        let list = i / c.k * c.k;
        panic!(
            "{what}: list {} differs: GPU {:?}, CPU {:?}",
            list / c.k,
            &got.ids()[list..list + c.k],
            &want.ids()[list..list + c.k]
        );
    }
    assert_eq!(got, want, "{what}: the routes' layout");
    // deterministic: again, and on another stream with a fresh workspace
    assert_eq!(
        run_gpu(stream, c, &start, ws).expect("CUDA"),
        want,
        "{what}: rerun"
    );
    let other = gpu().expect("second stream");
    assert_eq!(
        run_gpu(&other, c, &start, &mut Workspace::new()).expect("CUDA"),
        want,
        "{what}: other stream"
    );
}

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    for case in 0..cases(24) {
        let batch = r.random_range(1..4);
        let (seq, rows) = random_gaze_rows(
            &mut r,
            batch,
            GazeOpts {
                max_units: 3,
                max_side: 20,
            },
        );
        let c: Case<T> = random_case(&mut r, GazeLayout::new(seq, &rows).unwrap(), case % 2 == 1);
        let what = format!(
            "case {case}: q {:?}, desc {:?}, k {}",
            c.q.shape, c.desc.shape, c.k
        );
        compare(&stream, &c, &mut ws, &what);
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(51);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(52);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(53);
}

/// Rows of more regions than the select kernel keeps in shared memory (4,096):
/// a long video of single-token regions beside a short row.
#[test]
fn long_rows_take_the_uncached_path() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(54);
    let mut long = GazeRow::new();
    long.regions.extend((0..5000).map(|p| vec![p]));
    let mut short = GazeRow::new();
    short.regions.extend((0..7).map(|p| vec![2 * p, 2 * p + 1]));
    let layout = GazeLayout::new(5000, &[long, short]).unwrap();
    for k in [1, 37, 4999, 5000, 6000] {
        let mut c: Case<bf16> = random_case(&mut r, layout.clone(), false);
        c.k = k;
        compare(&stream, &c, &mut ws, &format!("k {k}, q {:?}", c.q.shape));
    }
}

#[test]
fn refuses_unsupported_head_dims_and_descriptor_layouts() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(55);
    let mut row = GazeRow::new();
    row.regions.extend((0..3).map(|p| vec![p]));
    let layout = GazeLayout::new(3, &[row]).unwrap();
    let mut ws = Workspace::new();
    let case = |r: &mut StdRng, d: usize, dstrides: [usize; 4], offset: usize| Case::<f32> {
        layout: layout.clone(),
        q: Tensor::from_fn([1, 1, 2, d], contiguous_strides([1, 1, 2, d]), 0.0, |_| {
            value(r, false)
        }),
        desc: Tensor::from_fn([1, 1, 3, d], dstrides, 0.0, |_| value(r, false))
            .offset_by(offset, 0.0),
        k: 2,
    };
    let start = short_routes(&layout, 1, 2, 2);
    let unsupported = |c: &Case<f32>, ws: &mut Workspace, what: &str| {
        let out = run_gpu(&stream, c, &start, ws);
        assert!(
            matches!(out, Err(Error::Unsupported { .. })),
            "{what}: {out:?}"
        );
    };
    unsupported(&case(&mut r, 6, [18, 18, 6, 1], 0), &mut ws, "head dim 6");
    unsupported(
        &case(&mut r, 260, [780, 780, 260, 1], 0),
        &mut ws,
        "head dim 260",
    );
    unsupported(
        &case(&mut r, 8, [30, 30, 10, 1], 0),
        &mut ws,
        "region stride 10",
    );
    unsupported(
        &case(&mut r, 8, [24, 24, 8, 1], 1),
        &mut ws,
        "base 4 bytes off",
    );
    // routes of another shape: an argument error, nothing written
    let c = case(&mut r, 8, [24, 24, 8, 1], 0);
    let (dq, dd) = (c.q.upload(&stream), c.desc.upload(&stream));
    let dlayout = DeviceGazeLayout::new(&stream, &layout).unwrap();
    let mut routes = DeviceRoutes::from_host(&stream, &start).unwrap();
    let out = cuda::route_topk(
        &stream,
        &c.q.dev_view(&dq),
        &c.desc.dev_view(&dd),
        &dlayout,
        3,
        &mut routes,
        &mut ws,
    );
    assert!(
        matches!(out, Err(Error::Shape { arg: "routes", .. })),
        "{out:?}"
    );
    assert_eq!(routes.to_host(&stream).unwrap(), start, "written on error");
    // the same call with k = 2 succeeds
    cuda::route_topk(
        &stream,
        &c.q.dev_view(&dq),
        &c.desc.dev_view(&dd),
        &dlayout,
        2,
        &mut routes,
        &mut ws,
    )
    .unwrap();
    assert_eq!(
        routes
            .to_host(&stream)
            .unwrap()
            .ids()
            .iter()
            .filter(|&&x| x >= 0)
            .count(),
        4
    );
}
