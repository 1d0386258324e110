//! gpu_bench section `gaze_decode`: one decode step of Qwen2.5-VL-7B (28
//! query heads, 4 KV heads, D 128, bf16) over 1K, 4K and 16K visual tokens
//! plus 64 visible text tokens, at 5, 10, 25 and 50% of the visual entries
//! attended (6 x 6 regions), batch 1 and 8, against dense decode attention
//! over the same cache: the same kernels with every position visible and no
//! region (`foveal_bench::gaze_decode::Plan::dense`). Both are checked once
//! against the CPU reference (outputs poisoned first), then timed gated (GPU
//! time: `median_us`, `base_us`, `speedup`) and eagerly (host launch overhead
//! included: `eager_us`, `base_eager_us`, `speedup_eager`). `bytes` is q, o
//! and the KV entries the op reads once per group.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::gaze_decode::{cpu, cuda};
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::{View, ViewMut};
use foveal_bench::gaze_decode::{self as gd, Plan, ATTENDED_PCT};
use foveal_bench::{KvLayout, VISUAL_TOKENS};
use half::bf16;

use super::{rel_err, Baseline, Env, Res, Row};

pub(super) fn cases(quick: bool) -> Vec<gd::Case> {
    if quick {
        return vec![
            gd::Case::new(1, 16384, 10, KvLayout::Bshd),
            gd::Case::new(8, 4096, 25, KvLayout::Bhsd),
        ];
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 8] {
            for pct in ATTENDED_PCT {
                cases.push(gd::Case::new(batch, nv, pct, KvLayout::Bshd));
            }
        }
    }
    cases.push(gd::Case::new(1, 16384, 10, KvLayout::Bhsd));
    cases.push(gd::Case::new(8, 16384, 10, KvLayout::Bhsd));
    cases
}

/// One input set: q, k, v and the output.
struct Set {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
}

/// A plan on the device.
struct DevicePlan {
    layout: DeviceGazeLayout,
    routes: DeviceRoutes,
}

impl DevicePlan {
    fn new(stream: &Arc<CudaStream>, plan: &Plan) -> Res<Self> {
        Ok(DevicePlan {
            layout: DeviceGazeLayout::new(stream, &plan.layout)?,
            routes: DeviceRoutes::from_host(stream, &plan.routes)?,
        })
    }
}

fn launch(
    stream: &Arc<CudaStream>,
    plan: &Plan,
    dev: &DevicePlan,
    set: &mut Set,
    ws: &mut Workspace,
) -> Res<()> {
    let q = DevView::of(&set.q, plan.q_layout)?;
    let k = DevView::of(&set.k, plan.kv_layout)?;
    let v = DevView::of(&set.v, plan.kv_layout)?;
    let mut o = DevViewMut::of(&mut set.o, plan.q_layout)?;
    cuda::gaze_decode(
        stream,
        &q,
        &k,
        &v,
        &dev.layout,
        &dev.routes,
        None,
        &mut o,
        None,
        ws,
    )?;
    Ok(())
}

/// Runs `plan` on set 0 into a poisoned output and compares it with the CPU
/// reference; returns the relative error.
fn check(
    env: &mut Env,
    plan: &Plan,
    dev: &DevicePlan,
    set: &mut Set,
    ws: &mut Workspace,
) -> Res<f64> {
    let stream = env.stream.clone();
    stream.memcpy_htod(&vec![bf16::NAN; plan.q_layout.numel()], &mut set.o)?;
    launch(&stream, plan, dev, set, ws)?;
    let got = stream.clone_dtoh(&set.o)?;
    let (q, k, v) = (
        stream.clone_dtoh(&set.q)?,
        stream.clone_dtoh(&set.k)?,
        stream.clone_dtoh(&set.v)?,
    );
    let mut want = vec![bf16::ZERO; plan.q_layout.numel()];
    cpu::gaze_decode(
        View::new(&q, plan.q_layout)?,
        View::new(&k, plan.kv_layout)?,
        View::new(&v, plan.kv_layout)?,
        &plan.layout,
        &plan.routes,
        None,
        &mut ViewMut::contiguous(&mut want, plan.o_shape())?,
        None,
    )?;
    let f = |x: &[bf16]| x.iter().map(|e| e.to_f32()).collect::<Vec<_>>();
    Ok(rel_err(&f(&got), &f(&want)))
}

pub(super) fn run_case(env: &mut Env, case: &gd::Case) -> Res<Row> {
    let stream = env.stream.clone();
    let plan = gd::plan(case);
    let dense = plan.dense();
    let (q_len, kv_len) = (plan.q_layout.span(), plan.kv_layout.span());
    let sets = env.n_sets((4 * q_len + 4 * kv_len) as u64)?;
    let mut data: Vec<Set> = Vec::with_capacity(sets);
    for _ in 0..sets {
        data.push(Set {
            q: env.pool.filled(&stream, q_len)?,
            k: env.pool.filled(&stream, kv_len)?,
            v: env.pool.filled(&stream, kv_len)?,
            o: stream.alloc_zeros::<bf16>(q_len)?,
        });
    }
    let (sparse_dev, dense_dev) = (
        DevicePlan::new(&stream, &plan)?,
        DevicePlan::new(&stream, &dense)?,
    );
    let mut ws = Workspace::new();

    let share = 100.0 * plan.attended_share();
    let check = if env.check {
        let sparse_err = check(env, &plan, &sparse_dev, &mut data[0], &mut ws)?;
        let dense_err = check(env, &dense, &dense_dev, &mut data[0], &mut ws)?;
        // bf16 outputs of f32 sums in different orders: a rounding apart
        if sparse_err <= 1e-2 && dense_err <= 1e-2 {
            format!("ok (rel err {sparse_err:.0e}, dense {dense_err:.0e}; read {share:.1}% of the visual entries; {sets} sets)")
        } else {
            format!("FAIL (rel err {sparse_err:.1e}, dense {dense_err:.1e})")
        }
    } else {
        format!("unchecked (read {share:.1}% of the visual entries; {sets} sets)")
    };

    let stats = env
        .timer
        .gpu(|i| launch(&stream, &plan, &sparse_dev, &mut data[i % sets], &mut ws))?;
    let dense_stats = env
        .timer
        .gpu(|i| launch(&stream, &dense, &dense_dev, &mut data[i % sets], &mut ws))?;
    let op_eager = env
        .timer
        .eager(|i| launch(&stream, &plan, &sparse_dev, &mut data[i % sets], &mut ws))?;
    let dense_eager = env
        .timer
        .eager(|i| launch(&stream, &dense, &dense_dev, &mut data[i % sets], &mut ws))?;
    Ok(Row {
        op: "gaze_decode",
        shape: case.label(),
        stats: Some(stats),
        bytes: plan.floor_bytes(2),
        baseline: Some(Baseline {
            name: "dense (gaze_decode, all visible)".into(),
            op_eager_us: op_eager.median_us,
            eager_us: dense_eager.median_us,
            graph_us: Some(dense_stats.median_us),
        }),
        check,
    })
}
