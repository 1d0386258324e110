//! gpu_bench section `route_topk`: routing a decode step (and a 16-query
//! step) of Qwen2.5-VL-7B over the regions of `foveal_bench::route_topk`
//! (36 per 32 x 32 frame), k a tenth of them. Checked once against the CPU
//! reference: the routes start one id short in every list (wrong for every
//! row), and the GPU's must equal the CPU's exactly.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, Workspace};
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::route_topk::{cpu, cuda};
use foveal::{GazeLayout, Layout, Routes, View};
use foveal_bench::route_topk::{self as rt, floor_bytes};
use foveal_bench::{random_elems, rng, VISUAL_TOKENS};
use half::bf16;

use super::{Env, Res, Row};

pub(super) fn cases(quick: bool) -> Vec<rt::Case> {
    if quick {
        return vec![
            rt::Case::new(1, 16384),
            rt::Case::new(4, 4096).with_queries(16),
        ];
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4] {
            cases.push(rt::Case::new(batch, nv));
        }
    }
    cases.push(rt::Case::new(1, 16384).with_queries(16));
    cases
}

/// One input set: queries, descriptors, routes.
struct Set {
    q: CudaSlice<bf16>,
    desc: CudaSlice<f32>,
    routes: DeviceRoutes,
}

fn launch(
    stream: &Arc<CudaStream>,
    case: &rt::Case,
    layout: &DeviceGazeLayout,
    set: &mut Set,
    ws: &mut Workspace,
) -> Res<()> {
    let q = DevView::of(&set.q, Layout::contiguous(case.q_shape()))?;
    let desc = DevView::of(
        &set.desc,
        Layout::contiguous(case.desc_shape(layout.host().max_regions())),
    )?;
    cuda::route_topk(stream, &q, &desc, layout, case.k, &mut set.routes, ws)?;
    Ok(())
}

/// Routes one id short of any correct answer in every list with regions.
fn short_routes(layout: &GazeLayout, case: &rt::Case) -> Res<Routes> {
    let heads = case.dims.q_heads;
    let mut ids = vec![-1; case.routes_len()];
    for (i, list) in ids.chunks_mut(case.k).enumerate() {
        let n = case
            .k
            .min(layout.regions(i / (case.queries * heads)))
            .saturating_sub(1);
        for (j, slot) in list[..n].iter_mut().enumerate() {
            *slot = j as i32;
        }
    }
    Ok(Routes::from_ids(layout, case.queries, heads, case.k, &ids)?)
}

pub(super) fn run(env: &mut Env, case: &rt::Case) -> Res<Row> {
    let stream = env.stream.clone();
    let host = case.layout();
    let regions = host.max_regions();
    let layout = DeviceGazeLayout::new(&stream, &host)?;
    let (q_len, desc_len) = (
        case.q_shape().iter().product::<usize>(),
        case.desc_shape(regions).iter().product::<usize>(),
    );
    let sets = env.n_sets((q_len * 2 + desc_len * 4 + case.routes_len() * 4) as u64)?;
    let start = short_routes(&host, case)?;
    let mut data: Vec<Set> = Vec::with_capacity(sets);
    for s in 0..sets {
        let desc: Vec<f32> = random_elems(&mut rng(case.seed + s as u64), desc_len, -1.0, 1.0);
        data.push(Set {
            q: env.pool.filled(&stream, q_len)?,
            desc: stream.clone_htod(&desc)?,
            routes: DeviceRoutes::from_host(&stream, &start)?,
        });
    }
    let mut ws = Workspace::new();

    let check = if env.check {
        launch(&stream, case, &layout, &mut data[0], &mut ws)?;
        let got = data[0].routes.to_host(&stream)?;
        let (qh, dh) = (
            stream.clone_dtoh(&data[0].q)?,
            stream.clone_dtoh(&data[0].desc)?,
        );
        let mut want = Routes::new(&host, case.queries, case.dims.q_heads, case.k);
        cpu::route_topk(
            View::contiguous(&qh, case.q_shape())?,
            View::contiguous(&dh, case.desc_shape(regions))?,
            &host,
            case.k,
            &mut want,
        )?;
        if got == want {
            format!("ok (exact, {regions} regions, {sets} sets)")
        } else {
            "FAIL (routes differ from the CPU reference)".to_string()
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env
        .timer
        .gpu(|i| launch(&stream, case, &layout, &mut data[i % sets], &mut ws))?;
    Ok(Row {
        op: "route_topk",
        shape: case.label(),
        stats: Some(stats),
        bytes: floor_bytes(case, regions, 2),
        baseline: None,
        check,
    })
}
