//! gaze_decode: the CUDA path against the CPU reference on identical inputs
//! (feature `cuda`; every test skips where there is no GPU).
//!
//! Both sides accumulate in f32 over the same bf16 / f16 / f32 values; they
//! differ in the order of the sums (lane-split dot products, key splits merged
//! by log-sum-exp), in exp2 against exp, and in the final rounding to the
//! storage type, so the bound is the oracle's with twice its slack on each
//! side. Keys and values no head of a group attends are NaN (a kernel that
//! reads an unrouted token fails); outputs are poisoned first (an element not
//! written, or written outside its view, fails).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::gaze_decode::{cpu, cuda};
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::{Error, GazeLayout, GazeRow, Layout, Routes};
use foveal_tests::gpu::{
    assert_bits_eq, assert_untouched, cases, download, gpu, in_sweep, poisoned, upload, GpuElem,
};
use foveal_tests::{random_elems, rng, Bits, Poison, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

use foveal_tests::gaze_decode::{
    all_routes, assert_large_logits, assert_matches, assert_matches_tainted, attended,
    cancellation_case, gapless_rows, gaze_oracle, inf_value_case, large_logit_case, outputs,
    poison_shared_rows, Case, Inputs, Taint, Want,
};

/// GQA group sizes: every size one pass serves (1..=8) and two served in
/// chunks of 8 query heads.
const GROUPS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16];

fn random_case<T>(r: &mut StdRng, seed: u64, long: bool) -> Case {
    let vec = 16 / std::mem::size_of::<T>();
    let dims = [vec, 2 * vec, 64, 80, 96, 128, 256];
    // long rows: one or two rows and one KV head, to keep the CPU side cheap
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
        scale: [None, Some(0.05), Some(0.3)][r.random_range(0..3)],
        long,
        aligned: true,
    }
}

/// Runs the CUDA path on `inp` into poisoned outputs laid out like
/// `o_like` / `lse_like`; returns their storage.
fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    inp: &Inputs<T>,
    o_like: &Tensor<T, 3>,
    lse_like: &Tensor<f32, 2>,
) -> (Vec<T>, Vec<f32>) {
    let layout = DeviceGazeLayout::new(stream, &inp.layout).expect("device layout");
    let routes = DeviceRoutes::from_host(stream, &inp.routes).expect("device routes");
    let (q_dev, k_dev, v_dev) = (
        inp.q.upload(stream),
        inp.k.upload(stream),
        inp.v.upload(stream),
    );
    let mut o_dev = poisoned::<T>(stream, o_like.data.len());
    let mut lse_dev = poisoned::<f32>(stream, lse_like.data.len());
    {
        let mut o = o_like.dev_view_mut(&mut o_dev);
        let mut lse = lse_like.dev_view_mut(&mut lse_dev);
        cuda::gaze_decode(
            stream,
            &inp.q.dev_view(&q_dev),
            &inp.k.dev_view(&k_dev),
            &inp.v.dev_view(&v_dev),
            &layout,
            &routes,
            inp.scale,
            &mut o,
            Some(&mut lse),
            ws,
        )
        .expect("valid call");
    }
    (download(stream, &o_dev), download(stream, &lse_dev))
}

/// GPU against the CPU reference (and both within twice the oracle's bound).
fn check_case<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace, c: &Case) {
    let inp = Inputs::<T>::new(c);
    check_inputs(stream, ws, &inp, &gaze_oracle(&inp), &format!("{c:?}"));
}

fn check_inputs<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    inp: &Inputs<T>,
    want: &[Want],
    what: &str,
) {
    check_tainted(stream, ws, inp, want, &[], what);
}

/// [`check_inputs`] where the heads `taint` marks attend a poisoned row
/// (their output must be non-finite; every other head must match).
fn check_tainted<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    inp: &Inputs<T>,
    want: &[Want],
    taint: &[Taint],
    what: &str,
) {
    let (mut o, mut lse) = outputs::<T>(&mut rng(7), inp.q.shape, true);
    cpu::gaze_decode(
        inp.q.view(),
        inp.k.view(),
        inp.v.view(),
        &inp.layout,
        &inp.routes,
        inp.scale,
        &mut o.view_mut(),
        Some(&mut lse.view_mut()),
    )
    .expect("cpu");
    let (got_o, got_lse) = run_gpu(stream, ws, inp, &o, &lse);
    let gpu_o = Tensor {
        data: got_o,
        ..o.clone()
    };
    let gpu_lse = Tensor {
        data: got_lse,
        ..lse.clone()
    };
    assert_matches_tainted(
        &gpu_o,
        &gpu_lse,
        want,
        taint,
        2.0,
        &format!("GPU vs oracle, {what}"),
    );
    // and the reference itself, beside it, within the same bound of the oracle
    assert_matches_tainted(
        &o,
        &lse,
        want,
        taint,
        1.0,
        &format!("CPU vs oracle, {what}"),
    );
}

fn random_cases<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let mut r = rng(seed);
    let mut ws = Workspace::new();
    for n in 0..cases(120) as u64 {
        let c = random_case::<T>(&mut r, seed * 1000 + n, n % 10 == 9);
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
/// attends it; head 1 shares the KV head (one unit: the same loads) and
/// attends {0, 2}. Head 1's output must be finite and equal that attention;
/// before the fix the shared accumulation added 0 x inf = NaN to it.
#[test]
fn inf_value_attended_by_one_head_of_the_group() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let taint = [Taint::Value, Taint::Clean];
    let inp = inf_value_case::<f32>();
    check_tainted(&stream, &mut ws, &inp, &gaze_oracle(&inp), &taint, "f32");
    let inp = inf_value_case::<f16>();
    check_tainted(&stream, &mut ws, &inp, &gaze_oracle(&inp), &taint, "f16");
    let inp = inf_value_case::<bf16>();
    check_tainted(&stream, &mut ws, &inp, &gaze_oracle(&inp), &taint, "bf16");
}

/// [`cancellation_case`]: outputs that cancel between values of 1000 to
/// 2,226 under weights of similar size, on the tensor cores (bf16, f16) and
/// the f32 path, within the oracle's bound at slack 1 (about 0.04 in the
/// cancelled columns): a single rounding of the weights to bf16 or f16
/// (P's low half dropped or misplaced) errs by more there.
#[test]
fn cancelling_outputs_keep_the_weights_bits() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace) {
        let inp = cancellation_case::<T>();
        let (o, lse) = outputs::<T>(&mut rng(5), inp.q.shape, true);
        let (got_o, got_lse) = run_gpu(stream, ws, &inp, &o, &lse);
        assert_matches(
            &Tensor { data: got_o, ..o },
            &Tensor {
                data: got_lse,
                ..lse
            },
            &gaze_oracle(&inp),
            1.0,
            &format!("cancellation, {:?}", T::DTYPE),
        );
    }
    let mut ws = Workspace::new();
    run::<bf16>(&stream, &mut ws);
    run::<f16>(&stream, &mut ws);
    run::<f32>(&stream, &mut ws);
}

/// Random cases (GQA 2 to 16, every element type, long rows now and then)
/// in which value rows (+inf, -inf, NaN) and key rows (NaN) that some heads
/// of a group attend, not all, are poisoned: every head that attends none
/// matches the oracle, every head that does is non-finite, on the GPU as on
/// the CPU. (A NaN score must reach the head's output even where it is the
/// first its lane group sees: before common.cuh's online softmax the attend
/// loop dropped it while its running max was -inf.)
#[test]
fn poisoned_rows_attended_by_some_heads() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
        let mut r = rng(seed);
        let mut ws = Workspace::new();
        for n in 0..cases(30) as u64 {
            let mut c = random_case::<T>(&mut r, seed * 1000 + n, n % 10 == 9);
            c.group = c.group.max(2);
            let mut inp = Inputs::<T>::new(&c);
            let (layout, routes) = (&inp.layout, &inp.routes);
            let taint =
                poison_shared_rows(&mut r, &mut inp.k, &mut inp.v, c.group, 3, true, |b, h| {
                    attended(layout, routes, b, h)
                });
            check_tainted(
                stream,
                &mut ws,
                &inp,
                &gaze_oracle(&inp),
                &taint,
                &format!("{c:?}"),
            );
        }
    }
    run::<f32>(&stream, 61);
    run::<f16>(&stream, 62);
    run::<bf16>(&stream, 63);
}

/// Logits of 1e3 to 1e6 (issue 11, fault 4), exact in every element type:
/// `o` and `lse` against the oracle with bounds that do not grow with the
/// logits. The attend step forms `exp2f((s - m) log2 e)`; scores scaled by
/// log2 e before the difference (as before common.cuh's online softmax)
/// were rounded at 1.4e6 (an ulp of 0.125) and failed here.
#[test]
fn large_logits_keep_their_precision() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace, b: f32) {
        let inp = large_logit_case::<T>(b);
        let (o, lse) = outputs::<T>(&mut rng(7), inp.q.shape, true);
        let (got_o, got_lse) = run_gpu(stream, ws, &inp, &o, &lse);
        let gpu_o = Tensor { data: got_o, ..o };
        let gpu_lse = Tensor {
            data: got_lse,
            ..lse
        };
        assert_large_logits(
            &gpu_o,
            &gpu_lse,
            &gaze_oracle(&inp),
            &format!("logits {}", 1000.0 * b),
        );
    }
    let mut ws = Workspace::new();
    for b in [1.0, 10.0, 100.0, 1000.0] {
        run::<f32>(&stream, &mut ws, b);
        run::<f16>(&stream, &mut ws, b);
        run::<bf16>(&stream, &mut ws, b);
    }
}

/// Every head dim the SPEC names, every group size, long rows (many key
/// splits per unit, merged by log-sum-exp); bf16 and f16 (the tensor-core
/// path serves units of 3 to 8 heads: odd sizes, and 12 and 16 heads in
/// chunks of 8 and 4 or 8 and 8, leave rows of the 16-row tile empty).
#[test]
fn head_dims_groups_long_rows() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
        let mut ws = Workspace::new();
        let configs: Vec<(usize, usize)> = [64, 80, 96, 128, 256]
            .into_iter()
            .flat_map(|d| GROUPS.map(|g| (d, g)))
            .collect();
        for (n, &(head_dim, group)) in configs.iter().enumerate() {
            if !in_sweep(n, configs.len()) {
                continue;
            }
            let c = Case {
                seed: seed + n as u64,
                batch: 2,
                kv_heads: 1,
                group,
                head_dim,
                scale: None,
                long: n % 3 == 0,
                aligned: true,
            };
            check_case::<T>(stream, &mut ws, &c);
        }
    }
    run::<bf16>(&stream, 900);
    run::<f16>(&stream, 1900);
}

/// The attend kernels' tiles (64 tokens at bf16/f16 up to D 128, 32 or 16
/// for larger rows and f32; a tensor-core warp owns 16 keys of a tile)
/// against attended counts just under, on and over their multiples, and
/// slices holding many tiles: with 24 KV heads x 6 rows (144 units, more
/// than two per SM up to 144 SMs) the split rule gives each unit one block,
/// so a block streams up to 24 tiles through its ring (4 stages at D 64,
/// 3 at D 128 and 256 on sm_90; 2 on sm_80), wrapping it many times, the
/// last tile partly filled. Every element type, lane groups and tensor
/// cores.
#[test]
fn tile_tails_and_deep_pipelines() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
        let mut ws = Workspace::new();
        let lens = [1, 15, 16, 17, 33, 63, 64, 65, 127, 129, 500, 1537];
        let configs = [(1, 64), (2, 128), (4, 256), (7, 128), (8, 64), (3, 96)];
        for (n, &(group, head_dim)) in configs.iter().enumerate() {
            if !in_sweep(n, configs.len()) {
                continue;
            }
            let mut r = rng(seed + n as u64);
            // six rows of lengths drawn from `lens`, one of them the longest
            let mut picked: Vec<usize> = (0..5)
                .map(|_| lens[r.random_range(0..lens.len())])
                .collect();
            picked.push(1537);
            let rows: Vec<GazeRow> = picked
                .iter()
                .map(|&len| {
                    let mut row = GazeRow::new();
                    row.push_visible(0..len);
                    row
                })
                .collect();
            let layout = GazeLayout::new(1537, &rows).expect("layout");
            let kv_heads = 24;
            let routes = Routes::from_ids(
                &layout,
                1,
                group * kv_heads,
                1,
                &vec![-1; 6 * group * kv_heads],
            )
            .expect("routes");
            let c = Case {
                seed: seed + n as u64,
                batch: 6,
                kv_heads,
                group,
                head_dim,
                scale: None,
                long: false,
                aligned: true,
            };
            let inp = Inputs::<T>::with(&mut r, &c, layout, routes);
            check_inputs(
                stream,
                &mut ws,
                &inp,
                &gaze_oracle(&inp),
                &format!("{picked:?}, {c:?}"),
            );
        }
    }
    run::<bf16>(&stream, 3100);
    run::<f16>(&stream, 3200);
    run::<f32>(&stream, 3300);
}

/// One unit over about 10,000 attended tokens (one row, one KV head): one
/// split per SM (two units), each of whole 64-token tiles (two on an H200's
/// 132 splits, the last splits empty), merged by the last block to finish
/// (its lanes stride over the splits); a second row with a few tokens beside
/// it. Tensor cores (G 4) and lane groups (G 1).
#[test]
fn many_splits_of_one_unit() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    for (n, group) in [4usize, 1].into_iter().enumerate() {
        let mut r = rng(3400 + n as u64);
        let mut long = GazeRow::new();
        long.push_visible(0..40);
        long.push_units(&[40], 100, 100, foveal::RegionShape::default())
            .expect("grid");
        let mut short = GazeRow::new();
        short.push_visible(0..9);
        let layout = GazeLayout::new(10_040, &[long, short]).expect("layout");
        let routes = all_routes(&layout, group);
        let c = Case {
            seed: 3400 + n as u64,
            batch: 2,
            kv_heads: 1,
            group,
            head_dim: 64,
            scale: None,
            long: true,
            aligned: true,
        };
        let inp = Inputs::<bf16>::with(&mut r, &c, layout, routes);
        check_inputs(
            &stream,
            &mut ws,
            &inp,
            &gaze_oracle(&inp),
            &format!("{c:?}"),
        );
    }
}

/// Regions of 1 to 5 tokens routed by random subsets of a unit's heads: the
/// 16 keys of a tensor-core warp carry many head masks (a pass of P V each,
/// the other keys zeroed in its V fragments), and value rows (+inf, -inf,
/// NaN) and key rows (NaN) that some heads attend, not all, are poisoned:
/// every head attending none of them matches the oracle, each that does is
/// not finite. Lane groups (G 2) and f32 beside it.
#[test]
fn tiny_regions_many_head_masks() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
        let mut ws = Workspace::new();
        for (n, &(group, head_dim)) in [(8, 128), (5, 64), (3, 256), (2, 64), (7, 80)]
            .iter()
            .enumerate()
        {
            let mut r = rng(seed + n as u64);
            let mut rows = Vec::new();
            let mut seq = 0;
            for _ in 0..2 {
                let mut row = GazeRow::new();
                let mut pos = r.random_range(0..3);
                row.push_visible(pos..pos + 3);
                pos += 3;
                for _ in 0..r.random_range(2..4) {
                    let width = r.random_range(1..=5);
                    let cols = r.random_range(20..90);
                    let shape = foveal::RegionShape {
                        frames: 1,
                        height: 1,
                        width,
                    };
                    row.push_units(&[pos], 1, cols, shape).expect("grid");
                    pos += cols;
                    row.push_visible(pos..pos + r.random_range(0..3));
                    pos += 3;
                }
                seq = usize::max(seq, pos);
                rows.push(row);
            }
            let layout = GazeLayout::new(seq, &rows).expect("layout");
            let routes = foveal_tests::gaze_decode::random_routes(&mut r, &layout, group * 2);
            let c = Case {
                seed: seed + n as u64,
                batch: 2,
                kv_heads: 2,
                group,
                head_dim,
                scale: None,
                long: false,
                aligned: true,
            };
            let mut inp = Inputs::<T>::with(&mut r, &c, layout, routes);
            let (layout, routes) = (&inp.layout, &inp.routes);
            let taint =
                poison_shared_rows(&mut r, &mut inp.k, &mut inp.v, group, 6, true, |b, h| {
                    attended(layout, routes, b, h)
                });
            check_tainted(
                stream,
                &mut ws,
                &inp,
                &gaze_oracle(&inp),
                &taint,
                &format!("{c:?}"),
            );
        }
    }
    run::<bf16>(&stream, 3500);
    run::<f16>(&stream, 3600);
    run::<f32>(&stream, 3700);
}

/// With every region routed the result is dense attention; the same kernel
/// with everything visible (one range per row, no regions) agrees.
#[test]
fn all_regions_routed_is_dense() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(11);
    let (rows, seq) = gapless_rows(&mut r, 3);
    let layout = GazeLayout::new(seq, &rows).unwrap();
    let routes = all_routes(&layout, 28);
    let c = Case {
        seed: 0,
        batch: 3,
        kv_heads: 4,
        group: 7,
        head_dim: 128,
        scale: None,
        long: false,
        aligned: true,
    };
    let routed = Inputs::<bf16>::with(&mut r, &c, layout, routes);
    let dense_rows: Vec<GazeRow> = rows
        .iter()
        .map(|row| {
            let mut dense = GazeRow::new();
            dense.push_visible(0..row.visible.last().unwrap().end);
            dense
        })
        .collect();
    let dense_layout = GazeLayout::new(seq, &dense_rows).unwrap();
    let dense_routes = Routes::from_ids(&dense_layout, 1, 28, 1, &[-1; 3 * 28]).unwrap();
    let dense = Inputs {
        layout: dense_layout,
        routes: dense_routes,
        ..routed.clone()
    };
    let want = gaze_oracle(&dense);
    check_inputs(&stream, &mut ws, &routed, &want, "every region routed");
    check_inputs(&stream, &mut ws, &dense, &want, "everything visible");
}

/// The same inputs give bit-identical outputs: twice with one workspace,
/// once more with a fresh workspace on another stream.
#[test]
fn deterministic_runs() {
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
            (&second, "second run"),
            (&third, "fresh workspace, other stream"),
        ] {
            assert_bits_eq(&run.0, &first.0, &format!("{c:?}: o, {what}"));
            assert_bits_eq(&run.1, &first.1, &format!("{c:?}: lse, {what}"));
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
        scale: None,
        long: true,
        aligned: true,
    };
    let inp = Inputs::<f16>::new(&c);
    let layout = DeviceGazeLayout::new(&stream, &inp.layout).unwrap();
    let need =
        cuda::workspace_bytes(&stream, &layout, inp.q.shape, 2, inp.routes.shape()[3]).unwrap();
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

// ---------------------------------------------------------------------------
// Arguments the CUDA path refuses before launching
// ---------------------------------------------------------------------------

/// A small call: q `[1, 2, d]`, k and v `[1, 8, 1, d]` starting `shift`
/// elements into their buffers, q's head stride `q_stride`; returns the
/// result and o's storage (poisoned before).
fn small_call<T: GpuElem>(
    stream: &Arc<CudaStream>,
    d: usize,
    shift: [usize; 3],
    q_stride: usize,
    foreign: bool,
) -> (Result<(), Error>, Vec<T>) {
    let mut row = GazeRow::new();
    row.push_visible(0..2);
    row.regions.push((2..8).collect());
    let host = GazeLayout::new(8, &[row]).unwrap();
    let routes_layout = if foreign {
        GazeLayout::new(
            8,
            &[GazeRow {
                visible: vec![],
                regions: vec![vec![0]],
            }],
        )
        .unwrap()
    } else {
        host.clone()
    };
    let routes = Routes::from_ids(&routes_layout, 1, 2, 1, &[0, -1]).unwrap();
    let layout = DeviceGazeLayout::new(stream, &host).unwrap();
    let routes = DeviceRoutes::from_host(stream, &routes).unwrap();
    let mut r = rng(9);
    let buf = |r: &mut StdRng, n: usize| upload(stream, &random_elems::<T>(r, n + 1, -1.0, 1.0));
    let (q_dev, k_dev, v_dev) = (
        buf(&mut r, 2 * q_stride),
        buf(&mut r, 8 * d),
        buf(&mut r, 8 * d),
    );
    let q = DevView::new(
        q_dev.slice(shift[0]..),
        Layout::strided([1, 2, d], [2 * q_stride, q_stride, 1]).unwrap(),
    )
    .unwrap();
    let k = DevView::new(k_dev.slice(shift[1]..), Layout::bshd(1, 8, 1, d)).unwrap();
    let v = DevView::new(v_dev.slice(shift[2]..), Layout::bhsd(1, 8, 1, d)).unwrap();
    let mut o_dev = poisoned::<T>(stream, 2 * d);
    let res = {
        let mut o = DevViewMut::new(o_dev.as_view_mut(), Layout::contiguous([1, 2, d])).unwrap();
        cuda::gaze_decode(
            stream,
            &q,
            &k,
            &v,
            &layout,
            &routes,
            None,
            &mut o,
            None,
            &mut Workspace::new(),
        )
    };
    (res, download(stream, &o_dev))
}

fn assert_refused<T: Poison + Bits + std::fmt::Debug>(
    res: Result<(), Error>,
    out: &[T],
    unsupported: bool,
    what: &str,
) {
    match res {
        Err(Error::Unsupported {
            op: "gaze_decode", ..
        }) if unsupported => {}
        Err(Error::Value {
            op: "gaze_decode",
            arg: "routes",
            ..
        }) if !unsupported => {}
        other => panic!("{what}: refused as expected? got {other:?}"),
    }
    assert_untouched(out, what);
}

#[test]
fn refuses_misaligned_inputs() {
    let Some(stream) = gpu() else { return };
    let (res, out) = small_call::<bf16>(&stream, 64, [0, 0, 0], 64, false);
    res.expect("aligned call");
    assert!(out.iter().all(|x| x.is_finite()));
    for (shift, what) in [([1, 0, 0], "q"), ([0, 1, 0], "k"), ([0, 0, 1], "v")] {
        let (res, out) = small_call::<bf16>(&stream, 64, shift, 64, false);
        assert_refused(
            res,
            &out,
            true,
            &format!("bf16 {what} one element into its buffer"),
        );
    }
    let (res, out) = small_call::<f32>(&stream, 16, [0, 0, 0], 18, false);
    assert_refused(res, &out, true, "f32 q head stride 18");
}

#[test]
fn refuses_head_dims_off_the_vector_width() {
    let Some(stream) = gpu() else { return };
    for (d, what) in [(6, "f32 head dim 6"), (264, "f32 head dim 264")] {
        let (res, out) = small_call::<f32>(&stream, d, [0, 0, 0], d, false);
        assert_refused(res, &out, true, what);
    }
    let (res, out) = small_call::<f16>(&stream, 12, [0, 0, 0], 12, false);
    assert_refused(res, &out, true, "f16 head dim 12");
    small_call::<f32>(&stream, 4, [0, 0, 0], 4, false)
        .0
        .expect("f32 head dim 4");
}

#[test]
fn refuses_routes_of_another_layout() {
    let Some(stream) = gpu() else { return };
    let (res, out) = small_call::<f32>(&stream, 16, [0, 0, 0], 16, true);
    assert_refused(res, &out, false, "routes of another layout");
}

/// The output views' strides are free (scalar writes): a padded o and a
/// transposed lse are written in place.
#[test]
fn strided_outputs() {
    let Some(stream) = gpu() else { return };
    let c = Case {
        seed: 41,
        batch: 3,
        kv_heads: 2,
        group: 3,
        head_dim: 32,
        scale: None,
        long: false,
        aligned: true,
    };
    let inp = Inputs::<f32>::new(&c);
    let want = gaze_oracle(&inp);
    let o = Tensor::filled(inp.q.shape, [6 * 40, 40, 1], f32::POISON);
    let lse = Tensor::filled([3, 6], [1, 5], f32::POISON);
    let (got_o, got_lse) = run_gpu(&stream, &mut Workspace::new(), &inp, &o, &lse);
    assert_matches(
        &Tensor { data: got_o, ..o },
        &Tensor {
            data: got_lse,
            ..lse
        },
        &want,
        2.0,
        "strided outputs",
    );
}
