//! gpu_bench section `gaze_route_decode`: the fused op (route_topk and
//! gaze_decode in one launch) at the gaze_decode section's shapes
//! (Qwen2.5-VL-7B heads, bf16, 1K/4K/16K visual tokens, 5 to 50% attended,
//! batch 1 and 8; `foveal_bench::gaze_route_decode`: the share is set by the
//! scores), two rows per case: against route_topk + gaze_decode (two ops,
//! four launches) and against dense decode attention over the same cache
//! (gaze_decode with every position visible). Checked once against the CPU
//! reference (routes equal, o within a bf16 rounding; outputs poisoned
//! first), then timed gated and eagerly as the gaze_decode section.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::gaze_route_decode::{cpu, cuda};
use foveal::{gaze_decode, route_topk, Routes, View, ViewMut};
use foveal_bench::gaze_decode::{self as gd, Plan};
use foveal_bench::gaze_route_decode::{generate, FusedInput};
use half::bf16;

use super::{gaze_decode::cases as gd_cases, rel_err, Baseline, Env, Res, Row};

pub(super) fn cases(quick: bool) -> Vec<gd::Case> {
    gd_cases(quick)
}

/// One input set: q, k, v, desc and the output.
struct Set {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    desc: CudaSlice<f32>,
    o: CudaSlice<bf16>,
}

struct Ctx<'a> {
    f: &'a FusedInput<bf16>,
    layout: DeviceGazeLayout,
    routes: DeviceRoutes,
    dense_layout: DeviceGazeLayout,
    dense_routes: DeviceRoutes,
    dense: Plan,
}

fn fused(stream: &Arc<CudaStream>, ctx: &mut Ctx, set: &mut Set, ws: &mut Workspace) -> Res<()> {
    let plan = &ctx.f.input.plan;
    let q = DevView::of(&set.q, plan.q_layout)?;
    let k = DevView::of(&set.k, plan.kv_layout)?;
    let v = DevView::of(&set.v, plan.kv_layout)?;
    let desc = DevView::of(&set.desc, ctx.f.desc_layout)?;
    let mut o = DevViewMut::of(&mut set.o, plan.q_layout)?;
    cuda::gaze_route_decode(
        stream,
        &q,
        &k,
        &v,
        &desc,
        &ctx.layout,
        ctx.f.top_k,
        None,
        &mut o,
        None,
        &mut ctx.routes,
        ws,
    )?;
    Ok(())
}

fn two_ops(stream: &Arc<CudaStream>, ctx: &mut Ctx, set: &mut Set, ws: &mut Workspace) -> Res<()> {
    let plan = &ctx.f.input.plan;
    let q4 = DevView::of(&set.q, ctx.f.q4_layout())?;
    let desc = DevView::of(&set.desc, ctx.f.desc_layout)?;
    route_topk::cuda::route_topk(
        stream,
        &q4,
        &desc,
        &ctx.layout,
        ctx.f.top_k,
        &mut ctx.routes,
        ws,
    )?;
    let q = DevView::of(&set.q, plan.q_layout)?;
    let k = DevView::of(&set.k, plan.kv_layout)?;
    let v = DevView::of(&set.v, plan.kv_layout)?;
    let mut o = DevViewMut::of(&mut set.o, plan.q_layout)?;
    gaze_decode::cuda::gaze_decode(
        stream,
        &q,
        &k,
        &v,
        &ctx.layout,
        &ctx.routes,
        None,
        &mut o,
        None,
        ws,
    )?;
    Ok(())
}

fn dense(stream: &Arc<CudaStream>, ctx: &mut Ctx, set: &mut Set, ws: &mut Workspace) -> Res<()> {
    let plan = &ctx.dense;
    let q = DevView::of(&set.q, plan.q_layout)?;
    let k = DevView::of(&set.k, plan.kv_layout)?;
    let v = DevView::of(&set.v, plan.kv_layout)?;
    let mut o = DevViewMut::of(&mut set.o, plan.q_layout)?;
    gaze_decode::cuda::gaze_decode(
        stream,
        &q,
        &k,
        &v,
        &ctx.dense_layout,
        &ctx.dense_routes,
        None,
        &mut o,
        None,
        ws,
    )?;
    Ok(())
}

/// The fused op on set 0 into a poisoned output against the CPU reference:
/// whether the routes are equal, and o's relative error.
fn check(env: &mut Env, ctx: &mut Ctx, set: &mut Set, ws: &mut Workspace) -> Res<(bool, f64)> {
    let stream = env.stream.clone();
    let plan = &ctx.f.input.plan;
    stream.memcpy_htod(&vec![bf16::NAN; plan.q_layout.numel()], &mut set.o)?;
    fused(&stream, ctx, set, ws)?;
    let plan = &ctx.f.input.plan;
    let got = stream.clone_dtoh(&set.o)?;
    let got_routes = ctx.routes.to_host(&stream)?;
    let (q, k, v, desc) = (
        stream.clone_dtoh(&set.q)?,
        stream.clone_dtoh(&set.k)?,
        stream.clone_dtoh(&set.v)?,
        stream.clone_dtoh(&set.desc)?,
    );
    let mut want = vec![bf16::ZERO; plan.q_layout.numel()];
    let mut routes = Routes::new(&plan.layout, 1, plan.dims.q_heads, ctx.f.top_k);
    cpu::gaze_route_decode(
        View::new(&q, plan.q_layout)?,
        View::new(&k, plan.kv_layout)?,
        View::new(&v, plan.kv_layout)?,
        View::new(&desc, ctx.f.desc_layout)?,
        &plan.layout,
        ctx.f.top_k,
        None,
        &mut ViewMut::contiguous(&mut want, plan.o_shape())?,
        None,
        &mut routes,
    )?;
    let f = |x: &[bf16]| x.iter().map(|e| e.to_f32()).collect::<Vec<_>>();
    Ok((
        got_routes.ids() == routes.ids(),
        rel_err(&f(&got), &f(&want)),
    ))
}

pub(super) fn run_case(env: &mut Env, case: &gd::Case) -> Res<Vec<Row>> {
    let stream = env.stream.clone();
    let f = generate::<bf16>(case);
    let plan = &f.input.plan;
    let (q_len, kv_len, desc_len) = (
        plan.q_layout.span(),
        plan.kv_layout.span(),
        f.desc_layout.span(),
    );
    let sets = env.n_sets((4 * q_len + 4 * kv_len + 4 * desc_len) as u64)?;
    let mut data: Vec<Set> = Vec::with_capacity(sets);
    for _ in 0..sets {
        // q positive and the descriptors as generated (they set the share);
        // K and V from the pool.
        data.push(Set {
            q: stream.clone_htod(&f.input.q)?,
            k: env.pool.filled(&stream, kv_len)?,
            v: env.pool.filled(&stream, kv_len)?,
            desc: stream.clone_htod(&f.desc)?,
            o: stream.alloc_zeros::<bf16>(q_len)?,
        });
    }
    let dense_plan = plan.dense();
    let layout = DeviceGazeLayout::new(&stream, &plan.layout)?;
    let routes = DeviceRoutes::new(&stream, &layout, 1, plan.dims.q_heads, f.top_k)?;
    let dense_layout = DeviceGazeLayout::new(&stream, &dense_plan.layout)?;
    let dense_routes = DeviceRoutes::from_host(&stream, &dense_plan.routes)?;
    let mut ctx = Ctx {
        f: &f,
        layout,
        routes,
        dense_layout,
        dense_routes,
        dense: dense_plan,
    };
    let mut ws = Workspace::new();

    let share = 100.0 * plan.attended_share();
    let check = if env.check {
        let (routes_ok, err) = check(env, &mut ctx, &mut data[0], &mut ws)?;
        if routes_ok && err <= 1e-2 {
            format!("ok (routes equal, rel err {err:.0e}; top_k {}, read {share:.1}% of the visual entries; {sets} sets)", f.top_k)
        } else {
            format!("FAIL (routes equal: {routes_ok}, rel err {err:.1e})")
        }
    } else {
        format!(
            "unchecked (top_k {}, read {share:.1}% of the visual entries; {sets} sets)",
            f.top_k
        )
    };

    let stats = env
        .timer
        .gpu(|i| fused(&stream, &mut ctx, &mut data[i % sets], &mut ws))?;
    let two_stats = env
        .timer
        .gpu(|i| two_ops(&stream, &mut ctx, &mut data[i % sets], &mut ws))?;
    let dense_stats = env
        .timer
        .gpu(|i| dense(&stream, &mut ctx, &mut data[i % sets], &mut ws))?;
    let op_eager = env
        .timer
        .eager(|i| fused(&stream, &mut ctx, &mut data[i % sets], &mut ws))?;
    let two_eager = env
        .timer
        .eager(|i| two_ops(&stream, &mut ctx, &mut data[i % sets], &mut ws))?;
    let dense_eager = env
        .timer
        .eager(|i| dense(&stream, &mut ctx, &mut data[i % sets], &mut ws))?;
    let bytes = plan.floor_bytes(2) + (4 * desc_len) as u64;
    let row = |baseline: Baseline, stats| Row {
        op: "gaze_route_decode",
        shape: case.label(),
        stats: Some(stats),
        bytes,
        baseline: Some(baseline),
        check: check.clone(),
    };
    Ok(vec![
        row(
            Baseline {
                name: "route_topk + gaze_decode".into(),
                op_eager_us: op_eager.median_us,
                eager_us: two_eager.median_us,
                graph_us: Some(two_stats.median_us),
            },
            stats,
        ),
        row(
            Baseline {
                name: "dense (gaze_decode, all visible)".into(),
                op_eager_us: op_eager.median_us,
                eager_us: dense_eager.median_us,
                graph_us: Some(dense_stats.median_us),
            },
            stats,
        ),
    ])
}
