//! gaze_route_decode: the CUDA path (one launch) against the CPU reference
//! (feature `cuda`; every test skips where there is no GPU).
//!
//! The routes must equal the CPU's exactly (the kernel forms the scores in
//! route_topk's order with its roundings, ties and NaN included). o and lse
//! accumulate in f32 in another order (lane-split dot products, splits merged
//! by log-sum-exp, exp2), so they are compared with the f64 oracle over the
//! positions those routes name, within twice the oracle's f32 accumulation
//! bound (the bound gaze_decode's GPU tests use). Keys
//! and values no head of a group attends are NaN (a kernel that reads an
//! unrouted token fails); outputs are poisoned first.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::{DevView, Workspace};
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::gaze_route_decode::cuda;
use foveal::{Error, GazeLayout, GazeRow, Layout, Routes};
use foveal_tests::gaze_cases::GazeOpts;
use foveal_tests::gpu::{
    assert_bits_eq, assert_untouched, cases, download, gpu, poisoned, upload, GpuElem,
};
use foveal_tests::{rng, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

use foveal_tests::gaze_decode::{
    assert_matches_tainted, attended, oracle, poison_shared_rows, Taint,
};
use foveal_tests::gaze_route_decode::{inf_value_case, outputs, run_cpu, Case, Inputs};

const GROUPS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16];

fn random_case<T>(r: &mut StdRng, seed: u64, long: bool) -> Case {
    let vec = (16 / std::mem::size_of::<T>()).max(4);
    let dims = [vec, 2 * vec, 64, 80, 96, 128, 256];
    let (batch, kv_heads) = if long {
        (r.random_range(1..=2), 1)
    } else {
        (r.random_range(1..=4), r.random_range(1..=3))
    };
    Case {
        seed,
        batch,
        kv_heads,
        group: GROUPS[r.random_range(0..GROUPS.len())],
        head_dim: dims[r.random_range(0..dims.len())],
        ties: r.random_bool(0.4),
        all: r.random_bool(0.15),
        scale: [None, Some(0.05), Some(0.3)][r.random_range(0..3)],
        aligned: true,
        // long rows: one unit of up to 36 x 36 tokens (3 frames at most), so at
        // most 3,888 regions (the kernel's bound is 4,096)
        opts: if long {
            GazeOpts {
                max_units: 1,
                max_side: 36,
            }
        } else {
            GazeOpts::default()
        },
    }
}

/// The CUDA path on `inp` into poisoned outputs laid out like `o_like` /
/// `lse_like`: o, lse and the routes.
fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    inp: &Inputs<T>,
    o_like: &Tensor<T, 3>,
    lse_like: &Tensor<f32, 2>,
) -> (Vec<T>, Vec<f32>, Routes) {
    let (res, o, lse, routes) = try_run_gpu(stream, ws, inp, o_like, lse_like);
    res.expect("valid call");
    (o, lse, routes.to_host(stream).expect("routes"))
}

/// [`run_gpu`] that returns the call's result beside the outputs' storage
/// and the device routes, whatever it is.
fn try_run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    inp: &Inputs<T>,
    o_like: &Tensor<T, 3>,
    lse_like: &Tensor<f32, 2>,
) -> (Result<(), Error>, Vec<T>, Vec<f32>, DeviceRoutes) {
    let layout = DeviceGazeLayout::new(stream, &inp.layout).expect("device layout");
    let mut routes =
        DeviceRoutes::new(stream, &layout, 1, inp.q.shape[1], inp.top_k).expect("routes");
    // Every id poison: an id (or -1 padding) the kernel fails to write differs.
    routes.poison_for_tests(stream).expect("poison");
    let (q_dev, k_dev, v_dev, desc_dev) = (
        inp.q.upload(stream),
        inp.k.upload(stream),
        inp.v.upload(stream),
        inp.desc.upload(stream),
    );
    let mut o_dev = poisoned::<T>(stream, o_like.data.len());
    let mut lse_dev = poisoned::<f32>(stream, lse_like.data.len());
    let res = {
        let mut o = o_like.dev_view_mut(&mut o_dev);
        let mut lse = lse_like.dev_view_mut(&mut lse_dev);
        cuda::gaze_route_decode(
            stream,
            &inp.q.dev_view(&q_dev),
            &inp.k.dev_view(&k_dev),
            &inp.v.dev_view(&v_dev),
            &inp.desc.dev_view(&desc_dev),
            &layout,
            inp.top_k,
            inp.scale,
            &mut o,
            Some(&mut lse),
            &mut routes,
            ws,
        )
    };
    (
        res,
        download(stream, &o_dev),
        download(stream, &lse_dev),
        routes,
    )
}

fn check_case<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace, c: &Case) {
    let inp = Inputs::<T>::new(c);
    let (o_like, lse_like) = outputs::<T>(&mut rng(c.seed ^ 3), inp.q.shape, true);
    let got = run_gpu(stream, ws, &inp, &o_like, &lse_like);
    check_outputs(&inp, &o_like, &lse_like, got, c);
}

/// The GPU's outputs `got` (run on `inp` into outputs laid out like `o_like`
/// / `lse_like`) against the f64 oracle over the positions the CPU's routes
/// name (equal to the GPU's).
fn check_outputs<T: GpuElem>(
    inp: &Inputs<T>,
    o_like: &Tensor<T, 3>,
    lse_like: &Tensor<f32, 2>,
    got: (Vec<T>, Vec<f32>, Routes),
    c: &Case,
) {
    check_tainted(inp, o_like, lse_like, got, &[], c);
}

/// [`check_outputs`] where the heads `taint` marks (`[b * Hq + h]`; empty:
/// none) attend a poisoned row: their `o` must be non-finite, their `lse`
/// too where a key row is poisoned; every other head must match the oracle.
fn check_tainted<T: GpuElem>(
    inp: &Inputs<T>,
    o_like: &Tensor<T, 3>,
    lse_like: &Tensor<f32, 2>,
    got: (Vec<T>, Vec<f32>, Routes),
    taint: &[Taint],
    c: &Case,
) {
    let (_, _, routes) = run_cpu(inp, o_like, lse_like);
    let (got_o, got_lse, got_routes) = got;
    assert_eq!(got_routes.ids(), routes.ids(), "routes, {c:?}");
    // o and lse against the f64 oracle over the positions the routes name,
    // within twice its f32 accumulation bound (gaze_decode's GPU bound).
    let want = oracle(&inp.q, &inp.k, &inp.v, inp.scale, |b, h| {
        attended(&inp.layout, &routes, b, h)
    });
    let gpu_o = Tensor {
        data: got_o,
        ..o_like.clone()
    };
    let gpu_lse = Tensor {
        data: got_lse,
        ..lse_like.clone()
    };
    assert_matches_tainted(
        &gpu_o,
        &gpu_lse,
        &want,
        taint,
        2.0,
        &format!("GPU vs oracle, {c:?}"),
    );
}

fn random_cases<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let mut r = rng(seed);
    let mut ws = Workspace::new();
    for n in 0..cases(40) as u64 {
        let c = random_case::<T>(&mut r, seed * 1000 + n, n % 5 == 4);
        check_case::<T>(stream, &mut ws, &c);
    }
}

#[test]
fn matches_cpu_f32() {
    let Some(stream) = gpu() else { return };
    random_cases::<f32>(&stream, 1);
}

#[test]
fn matches_cpu_f16() {
    let Some(stream) = gpu() else { return };
    random_cases::<f16>(&stream, 2);
}

#[test]
fn matches_cpu_bf16() {
    let Some(stream) = gpu() else { return };
    random_cases::<bf16>(&stream, 3);
}

/// Issue 11, fault 2, its minimal case: V[1] is +inf and only head 0
/// routes the region holding it; head 1 shares the unit (the same loads)
/// and must stay finite, equal to the CPU; before the fix the shared
/// accumulation added 0 x inf = NaN to it.
#[test]
fn inf_value_attended_by_one_head_of_the_group() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>) {
        let inp = inf_value_case::<T>();
        let (o_like, lse_like) = outputs::<T>(&mut rng(1), inp.q.shape, true);
        let got = run_gpu(stream, &mut Workspace::new(), &inp, &o_like, &lse_like);
        let c = Case {
            seed: 0,
            batch: 1,
            kv_heads: 1,
            group: 2,
            head_dim: 8,
            ties: false,
            all: false,
            scale: None,
            aligned: true,
            opts: GazeOpts::default(),
        };
        check_tainted(
            &inp,
            &o_like,
            &lse_like,
            got,
            &[Taint::Value, Taint::Clean],
            &c,
        );
    }
    run::<f32>(&stream);
    run::<f16>(&stream);
    run::<bf16>(&stream);
}

/// Random cases (GQA 2 to 16, every element type, long rows now and then)
/// in which value rows (+inf, -inf, NaN) and key rows (NaN) that some heads
/// of a group route, not all, are poisoned: every head that attends none
/// equals the CPU, every head that does is non-finite on both sides.
#[test]
fn poisoned_rows_attended_by_some_heads() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
        let mut r = rng(seed);
        let mut ws = Workspace::new();
        for n in 0..cases(20) as u64 {
            let mut c = random_case::<T>(&mut r, seed * 1000 + n, n % 5 == 4);
            c.group = c.group.max(2);
            c.all = false;
            let mut inp = Inputs::<T>::new(&c);
            let (layout, routes) = (&inp.layout, &inp.routes);
            let taint =
                poison_shared_rows(&mut r, &mut inp.k, &mut inp.v, c.group, 3, true, |b, h| {
                    attended(layout, routes, b, h)
                });
            let (o_like, lse_like) = outputs::<T>(&mut rng(c.seed ^ 3), inp.q.shape, true);
            let got = run_gpu(stream, &mut ws, &inp, &o_like, &lse_like);
            check_tainted(&inp, &o_like, &lse_like, got, &taint, &c);
        }
    }
    run::<f32>(&stream, 61);
    run::<f16>(&stream, 62);
    run::<bf16>(&stream, 63);
}

/// Routing is done once per (unit, query head) by router blocks that run
/// before the attend blocks, which wait for their unit's plan: with 48 rows
/// x 3 KV heads x 8 heads (1,152 routers, more than the GPU holds at once)
/// attend blocks wait while other units still route; with 12 and 16 heads
/// per KV head the units hold 8 and 4 or 8 and 8 heads (a router of a
/// missing head only takes its ticket). Routes equal the CPU's, o and lse
/// the oracle's; twice on one workspace (its records are zeroed per call).
#[test]
fn routers_before_attend_blocks() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    for (n, &(batch, kv_heads, group)) in [(48, 3, 8), (5, 2, 12), (3, 1, 16)].iter().enumerate() {
        let c = Case {
            seed: 7_000 + n as u64,
            batch,
            kv_heads,
            group,
            head_dim: 16,
            ties: n == 1,
            all: false,
            scale: None,
            aligned: true,
            opts: GazeOpts {
                max_units: 2,
                max_side: 12,
            },
        };
        let inp = Inputs::<f16>::new(&c);
        let (o_like, lse_like) = outputs::<f16>(&mut rng(c.seed ^ 3), inp.q.shape, true);
        for _ in 0..2 {
            let got = run_gpu(&stream, &mut ws, &inp, &o_like, &lse_like);
            check_outputs(&inp, &o_like, &lse_like, got, &c);
        }
    }
}

/// Each call zeroes its units' records, ready flags and block counter
/// itself: two cases of different rows, layouts and routes (1,152 routers
/// each, more than the GPU holds at once, so attend blocks wait on flags),
/// alternated on one workspace reserved for both, so that a call whose
/// reset failed would read the other's plan (a replay of the same inputs
/// cannot show it: its stale plan is the right one). Each equals the
/// oracle.
#[test]
fn records_reset_between_different_calls() {
    let Some(stream) = gpu() else { return };
    let cases: Vec<Case> = [7_100, 7_200]
        .into_iter()
        .map(|seed| Case {
            seed,
            batch: 48,
            kv_heads: 3,
            group: 8,
            head_dim: 16,
            ties: false,
            all: false,
            scale: None,
            aligned: true,
            opts: GazeOpts {
                max_units: 2,
                max_side: 12,
            },
        })
        .collect();
    let inputs: Vec<Inputs<f16>> = cases.iter().map(Inputs::new).collect();
    let need = cases
        .iter()
        .zip(&inputs)
        .map(|(c, inp)| {
            let layout = DeviceGazeLayout::new(&stream, &inp.layout).unwrap();
            cuda::workspace_bytes(&stream, &layout, inp.q.shape, c.kv_heads, inp.top_k).unwrap()
        })
        .max()
        .unwrap();
    let mut ws = Workspace::new();
    ws.reserve(&stream, need).unwrap();
    for i in [0, 1, 0, 1] {
        let (c, inp) = (&cases[i], &inputs[i]);
        let (o_like, lse_like) = outputs::<f16>(&mut rng(c.seed ^ 3), inp.q.shape, true);
        let got = run_gpu(&stream, &mut ws, inp, &o_like, &lse_like);
        check_outputs(inp, &o_like, &lse_like, got, c);
    }
}

/// Bit-identical outputs and routes: twice in a row on one workspace (its
/// units' records and block counter, zeroed by the call's memset, reused:
/// what a graph replay does), and with a fresh workspace on another stream.
#[test]
fn deterministic_and_replay_safe() {
    let Some(stream) = gpu() else { return };
    let other = gpu().expect("a second stream");
    let mut r = rng(21);
    let mut ws = Workspace::new();
    for n in 0..cases(12) as u64 {
        let c = random_case::<bf16>(&mut r, 2100 + n, n % 2 == 1);
        let inp = Inputs::<bf16>::new(&c);
        let (o, lse) = outputs::<bf16>(&mut rng(1), inp.q.shape, true);
        let first = run_gpu(&stream, &mut ws, &inp, &o, &lse);
        let second = run_gpu(&stream, &mut ws, &inp, &o, &lse);
        let third = run_gpu(&other, &mut Workspace::new(), &inp, &o, &lse);
        for (run, what) in [
            (&second, "second run, same workspace"),
            (&third, "fresh workspace, other stream"),
        ] {
            assert_bits_eq(&run.0, &first.0, &format!("{c:?}: o, {what}"));
            assert_bits_eq(&run.1, &first.1, &format!("{c:?}: lse, {what}"));
            assert_eq!(run.2.ids(), first.2.ids(), "{c:?}: routes, {what}");
        }
    }
}

/// `workspace_bytes` is what a call takes: a workspace reserved to it does
/// not grow (so a graph capture allocates nothing).
#[test]
fn workspace_bytes_suffice() {
    let Some(stream) = gpu() else { return };
    let c = Case {
        seed: 31,
        batch: 3,
        kv_heads: 2,
        group: 12,
        head_dim: 64,
        ties: false,
        all: false,
        scale: None,
        aligned: true,
        opts: GazeOpts {
            max_units: 1,
            max_side: 36,
        },
    };
    let inp = Inputs::<f16>::new(&c);
    let layout = DeviceGazeLayout::new(&stream, &inp.layout).unwrap();
    let need = cuda::workspace_bytes(&stream, &layout, inp.q.shape, 2, inp.top_k).unwrap();
    let mut ws = Workspace::new();
    ws.reserve(&stream, need).unwrap();
    let (o, lse) = outputs::<f16>(&mut rng(1), inp.q.shape, true);
    run_gpu(&stream, &mut ws, &inp, &o, &lse);
    assert_eq!(
        ws.bytes(),
        need,
        "the call grew a workspace reserved to workspace_bytes"
    );
}

/// More regions than the kernel holds in shared memory: Unsupported, the
/// outputs untouched.
#[test]
fn refuses_too_many_regions() {
    let Some(stream) = gpu() else { return };
    let regions = 4096 + 1; // FOVEAL_GAZE_ROUTE_MAX_REGIONS + 1
    let mut row = GazeRow::new();
    row.push_visible(0..1);
    row.push_units(
        &[1],
        1,
        regions,
        foveal::RegionShape {
            frames: 1,
            height: 1,
            width: 1,
        },
    )
    .unwrap();
    let layout = GazeLayout::new(regions + 1, &[row]).unwrap();
    let dev_layout = DeviceGazeLayout::new(&stream, &layout).unwrap();
    let d = 8;
    let q = upload(&stream, &vec![0.5f32; d]);
    let kv = upload(&stream, &vec![0.25f32; (regions + 1) * d]);
    let desc = upload(&stream, &vec![1.0f32; regions * d]);
    let mut o_dev = poisoned::<f32>(&stream, d);
    let mut routes = DeviceRoutes::new(&stream, &dev_layout, 1, 1, 4).unwrap();
    let res = {
        let mut o =
            foveal::cuda::DevViewMut::new(o_dev.as_view_mut(), Layout::contiguous([1, 1, d]))
                .unwrap();
        cuda::gaze_route_decode(
            &stream,
            &DevView::new(q.as_view(), Layout::contiguous([1, 1, d])).unwrap(),
            &DevView::new(kv.as_view(), Layout::bshd(1, regions + 1, 1, d)).unwrap(),
            &DevView::new(kv.as_view(), Layout::bshd(1, regions + 1, 1, d)).unwrap(),
            &DevView::new(desc.as_view(), Layout::contiguous([1, 1, regions, d])).unwrap(),
            &dev_layout,
            4,
            None,
            &mut o,
            None,
            &mut routes,
            &mut Workspace::new(),
        )
    };
    assert!(
        matches!(
            res,
            Err(Error::Unsupported {
                op: "gaze_route_decode",
                ..
            })
        ),
        "{res:?}"
    );
    assert_untouched(&download(&stream, &o_dev), "o");
}

/// Issue 11, fault 1: at bf16, D 128, G 8 the kernel holds about 23 KB of
/// static shared memory, and the region scores `8 x regions x 4` bytes
/// (plus a byte per region) of dynamic; from about 780 regions the total
/// passes 48 KiB while the dynamic part alone does not, and the launch
/// failed (invalid argument) because the kernel opted in only past 48 KiB of
/// dynamic memory. Each size must run and equal the CPU reference, or be
/// refused before launching with `Error::Unsupported` naming shared memory
/// (a device whose opt-in limit is smaller), the outputs untouched; never
/// fail to launch. Regions of one token each (a 1 x R grid), two rows of
/// different counts, top_k random.
#[test]
fn region_counts_past_48_kib_of_shared_memory() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let sizes = [
        700, 780, 800, 1_000, 1_200, 1_490, 1_500, 1_700, 2_500, 4_096,
    ];
    for (n, &regions) in sizes.iter().enumerate() {
        let mut rows = Vec::new();
        for count in [regions, regions / 2 + 1] {
            let mut row = GazeRow::new();
            row.push_visible(0..3);
            let shape = foveal::RegionShape {
                frames: 1,
                height: 1,
                width: 1,
            };
            row.push_units(&[3], 1, count, shape).expect("grid");
            row.push_visible(3 + count..7 + count);
            rows.push(row);
        }
        let layout = GazeLayout::new(regions + 8, &rows).expect("layout");
        assert_eq!(layout.max_regions(), regions);
        let c = Case {
            seed: 5_000 + n as u64,
            batch: 2,
            kv_heads: 1,
            group: 8,
            head_dim: 128,
            ties: false,
            all: false,
            scale: None,
            aligned: true,
            opts: GazeOpts::default(),
        };
        let inp = Inputs::<bf16>::with_layout(&mut rng(c.seed), &c, layout);
        let (o_like, lse_like) = outputs::<bf16>(&mut rng(c.seed ^ 3), inp.q.shape, true);
        let (res, o, lse, routes) = try_run_gpu(&stream, &mut ws, &inp, &o_like, &lse_like);
        match res {
            Ok(()) => {
                let routes = routes.to_host(&stream).expect("routes");
                check_outputs(&inp, &o_like, &lse_like, (o, lse, routes), &c);
            }
            Err(Error::Unsupported {
                op: "gaze_route_decode",
                msg,
            }) if msg.contains("shared memory") => {
                eprintln!("{regions} regions refused on this device: {msg}");
                assert_untouched(&o, "o of a refused call");
                assert_untouched(&lse, "lse of a refused call");
            }
            Err(e) => panic!("{regions} regions: neither run nor refused for shared memory: {e:?}"),
        }
    }
}
