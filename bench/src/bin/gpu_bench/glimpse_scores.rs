//! gpu_bench section `glimpse_scores`: the glimpse token's scores over the
//! pruning layer's key cache (`foveal_bench::glimpse_scores`: Qwen2.5-VL-7B
//! heads, ragged chat rows of 1K, 4K and 16K visual tokens, batch 1 and 4,
//! both cache orders, log-softmax and logits). Checked once against the CPU
//! reference (scores poisoned first; relative error within 1e-4).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, DeviceRowLayout, Workspace};
use foveal::glimpse_scores::{cpu, cuda};
use foveal::{Layout, ScoreMode, View, ViewMut};
use foveal_bench::glimpse_scores as gs;
use foveal_bench::{KvLayout, VISUAL_TOKENS};
use half::bf16;

use crate::env::Env;
use crate::table::Row;
use crate::{boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "glimpse_scores",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![
            gs::Case::new(1, 1024, KvLayout::Bshd),
            gs::Case::new(4, 16384, KvLayout::Bshd),
            gs::Case::new(4, 16384, KvLayout::Bhsd).with_mode(ScoreMode::Logits),
        ]);
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4] {
            for layout in KvLayout::ALL {
                for mode in [ScoreMode::LogSoftmax, ScoreMode::Logits] {
                    cases.push(gs::Case::new(batch, nv, layout).with_mode(mode));
                }
            }
        }
    }
    boxed(cases)
}

impl Case for gs::Case {
    fn label(&self) -> String {
        gs::Case::label(self)
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let plan = gs::plan(self);
        let (q_len, k_len, out_len) = (plan.q_layout.span(), plan.k_layout.span(), plan.out_len());
        let sets = env.n_sets((2 * q_len + 2 * k_len + 4 * out_len) as u64)?;
        Ok(Box::new(Prepared {
            q: env.filled(sets, q_len)?,
            k: env.filled(sets, k_len)?,
            out: env.zeroed(sets, out_len)?,
            rows: DeviceRowLayout::new(&env.stream, &plan.rows)?,
            ws: Workspace::new(),
            plan,
        }))
    }
}

/// The input sets of a case.
struct Prepared {
    plan: gs::Plan,
    q: Vec<CudaSlice<bf16>>,
    k: Vec<CudaSlice<bf16>>,
    out: Vec<CudaSlice<f32>>,
    rows: DeviceRowLayout,
    ws: Workspace,
}

impl Prepared {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let plan = &self.plan;
        let q = DevView::of(&self.q[set], plan.q_layout)?;
        let k = DevView::of(&self.k[set], plan.k_layout)?;
        let mut out = DevViewMut::of(&mut self.out[set], Layout::contiguous(plan.out_shape()))?;
        cuda::glimpse_scores(
            stream,
            &q,
            &k,
            &self.rows,
            None,
            plan.mode,
            &mut out,
            &mut self.ws,
        )?;
        Ok(())
    }
}

impl Bench for Prepared {
    fn sets(&self) -> usize {
        self.q.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let stream = &env.stream;
        env.poison(&mut self.out[0], f32::NAN)?;
        self.launch(stream, 0)?;
        let got = stream.clone_dtoh(&self.out[0])?;
        let (q, k) = (
            stream.clone_dtoh(&self.q[0])?,
            stream.clone_dtoh(&self.k[0])?,
        );
        let plan = &self.plan;
        let mut want = vec![0f32; plan.out_len()];
        cpu::glimpse_scores(
            View::new(&q, plan.q_layout)?,
            View::new(&k, plan.k_layout)?,
            &plan.rows,
            None,
            plan.mode,
            &mut ViewMut::contiguous(&mut want, plan.out_shape())?,
        )?;
        let err = rel_err(&got, &want);
        Ok(Check::when(
            err <= 1e-4,
            format!("rel err {err:.0e}"),
            format!("rel err {err:.1e}"),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        Ok(vec![Row::new(stats, self.plan.floor_bytes(2))])
    }
}
