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

use crate::env::Env;
use crate::table::Row;
use crate::{boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "route_topk",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![
            rt::Case::new(1, 16384),
            rt::Case::new(4, 4096).with_queries(16),
        ]);
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4] {
            cases.push(rt::Case::new(batch, nv));
        }
    }
    cases.push(rt::Case::new(1, 16384).with_queries(16));
    boxed(cases)
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

impl Case for rt::Case {
    fn label(&self) -> String {
        rt::Case::label(self)
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let host = self.layout();
        let regions = host.max_regions();
        let (q_len, desc_len) = (
            self.q_shape().iter().product::<usize>(),
            self.desc_shape(regions).iter().product::<usize>(),
        );
        let sets = env.n_sets((q_len * 2 + desc_len * 4 + self.routes_len() * 4) as u64)?;
        let start = short_routes(&host, self)?;
        let mut data = Vec::with_capacity(sets);
        for s in 0..sets {
            let desc: Vec<f32> = random_elems(&mut rng(self.seed + s as u64), desc_len, -1.0, 1.0);
            data.push(Set {
                q: env.pool.filled(&env.stream, q_len)?,
                desc: env.stream.clone_htod(&desc)?,
                routes: DeviceRoutes::from_host(&env.stream, &start)?,
            });
        }
        Ok(Box::new(Prepared {
            case: self,
            layout: DeviceGazeLayout::new(&env.stream, &host)?,
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: queries, descriptors, routes.
struct Set {
    q: CudaSlice<bf16>,
    desc: CudaSlice<f32>,
    routes: DeviceRoutes,
}

/// The input sets of a case.
struct Prepared<'a> {
    case: &'a rt::Case,
    layout: DeviceGazeLayout,
    data: Vec<Set>,
    ws: Workspace,
}

impl Prepared<'_> {
    fn desc_shape(&self) -> [usize; 4] {
        self.case.desc_shape(self.layout.host().max_regions())
    }

    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let (case, desc_shape, set) = (self.case, self.desc_shape(), &mut self.data[set]);
        let q = DevView::of(&set.q, Layout::contiguous(case.q_shape()))?;
        let desc = DevView::of(&set.desc, Layout::contiguous(desc_shape))?;
        cuda::route_topk(
            stream,
            &q,
            &desc,
            &self.layout,
            case.k,
            &mut set.routes,
            &mut self.ws,
        )?;
        Ok(())
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.data.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let (stream, case) = (&env.stream, self.case);
        self.launch(stream, 0)?;
        let got = self.data[0].routes.to_host(stream)?;
        let (q, desc) = (
            stream.clone_dtoh(&self.data[0].q)?,
            stream.clone_dtoh(&self.data[0].desc)?,
        );
        let host = self.layout.host();
        let mut want = Routes::new(host, case.queries, case.dims.q_heads, case.k);
        cpu::route_topk(
            View::contiguous(&q, case.q_shape())?,
            View::contiguous(&desc, self.desc_shape())?,
            host,
            case.k,
            &mut want,
        )?;
        Ok(Check::when(
            got == want,
            format!("exact, {} regions", host.max_regions()),
            "routes differ from the CPU reference",
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        Ok(vec![Row::new(
            stats,
            floor_bytes(self.case, self.layout.host().max_regions(), 2),
        )])
    }
}
