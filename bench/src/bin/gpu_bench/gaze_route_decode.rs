//! gpu_bench section `gaze_route_decode`: the fused op (route_topk and
//! gaze_decode in one launch) at the gaze_decode section's shapes
//! (Qwen2.5-VL-7B heads, bf16, 1K/4K/16K visual tokens, 5 to 50% attended,
//! batch 1 and 8; `foveal_bench::gaze_route_decode`: the share is set by the
//! scores), two rows per case: against route_topk + gaze_decode (two ops,
//! four launches) and against dense decode attention over the same cache
//! (gaze_decode with every position visible). Checked once against the CPU
//! reference (routes equal, o within a bf16 rounding; outputs poisoned
//! first), then timed gated and eagerly as the gaze_decode section. The
//! PyTorch baseline is gaze_decode's (dense decode attention by SDPA).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::gaze_route_decode::{cpu, cuda};
use foveal::route_topk::cuda::route_topk;
use foveal::{Routes, View, ViewMut};
use foveal_bench::gaze_decode as gd;
use foveal_bench::gaze_route_decode::{generate, FusedInput};
use half::bf16;

use crate::env::Env;
use crate::gaze_decode::{self, decode_cases, sdpa_decode, DevicePlan};
use crate::table::{Baseline, Row};
use crate::torch::TorchCase;
use crate::{boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "gaze_route_decode",
    cases,
};

/// A decode step of the gaze_decode section, routed by the op itself.
struct Routed(gd::Case);

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    boxed(decode_cases(mode).into_iter().map(Routed).collect())
}

impl Case for Routed {
    fn label(&self) -> String {
        self.0.label()
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(sdpa_decode(&self.0))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let f = generate::<bf16>(&self.0);
        let plan = &f.input.plan;
        let (q_len, kv_len, desc_len) = (
            plan.q_layout.span(),
            plan.kv_layout.span(),
            f.desc_layout.span(),
        );
        let sets = env.n_sets((4 * q_len + 4 * kv_len + 4 * desc_len) as u64)?;
        let mut data = Vec::with_capacity(sets);
        for _ in 0..sets {
            // q positive and the descriptors as generated (they set the
            // share); K and V from the pool.
            data.push(Set {
                decode: gaze_decode::Set::new(env, plan, Some(&f.input.q))?,
                desc: env.stream.clone_htod(&f.desc)?,
            });
        }
        Ok(Box::new(Prepared {
            routed: DevicePlan::routed(&env.stream, plan.clone(), f.top_k)?,
            dense: DevicePlan::new(&env.stream, plan.dense())?,
            f,
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: gaze_decode's (q, k, v, o) and the descriptors.
struct Set {
    decode: gaze_decode::Set,
    desc: CudaSlice<f32>,
}

/// The input sets of a case, its plan (routes written by the op) and the
/// dense plan.
struct Prepared {
    f: FusedInput<bf16>,
    routed: DevicePlan,
    dense: DevicePlan,
    data: Vec<Set>,
    ws: Workspace,
}

impl Prepared {
    fn fused(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let (plan, set) = (&self.f.input.plan, &mut self.data[set]);
        let q = DevView::of(&set.decode.q, plan.q_layout)?;
        let k = DevView::of(&set.decode.k, plan.kv_layout)?;
        let v = DevView::of(&set.decode.v, plan.kv_layout)?;
        let desc = DevView::of(&set.desc, self.f.desc_layout)?;
        let mut o = DevViewMut::of(&mut set.decode.o, plan.q_layout)?;
        let routed = &mut self.routed;
        cuda::gaze_route_decode(
            stream,
            &q,
            &k,
            &v,
            &desc,
            &routed.layout,
            self.f.top_k,
            None,
            &mut o,
            None,
            &mut routed.routes,
            &mut self.ws,
        )?;
        Ok(())
    }

    /// route_topk, then gaze_decode on its routes.
    fn two_ops(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let (routed, set) = (&mut self.routed, &mut self.data[set]);
        let q4 = DevView::of(&set.decode.q, self.f.q4_layout())?;
        let desc = DevView::of(&set.desc, self.f.desc_layout)?;
        let (layout, top_k) = (&routed.layout, self.f.top_k);
        route_topk(
            stream,
            &q4,
            &desc,
            layout,
            top_k,
            &mut routed.routes,
            &mut self.ws,
        )?;
        routed.launch(stream, &mut set.decode, &mut self.ws)
    }

    fn dense(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let set = &mut self.data[set].decode;
        self.dense.launch(stream, set, &mut self.ws)
    }
}

impl Bench for Prepared {
    fn sets(&self) -> usize {
        self.data.len()
    }

    /// The fused op on set 0 into a poisoned output against the CPU
    /// reference: the routes equal, o within a bf16 rounding.
    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let stream = &env.stream;
        env.poison(&mut self.data[0].decode.o, bf16::NAN)?;
        self.fused(stream, 0)?;
        let (f, set) = (&self.f, &self.data[0]);
        let plan = &f.input.plan;
        let got = stream.clone_dtoh(&set.decode.o)?;
        let got_routes = self.routed.routes.to_host(stream)?;
        let (q, k) = (
            stream.clone_dtoh(&set.decode.q)?,
            stream.clone_dtoh(&set.decode.k)?,
        );
        let (v, desc) = (
            stream.clone_dtoh(&set.decode.v)?,
            stream.clone_dtoh(&set.desc)?,
        );
        let mut want = vec![bf16::ZERO; plan.q_layout.numel()];
        let mut routes = Routes::new(&plan.layout, 1, plan.dims.q_heads, f.top_k);
        cpu::gaze_route_decode(
            View::new(&q, plan.q_layout)?,
            View::new(&k, plan.kv_layout)?,
            View::new(&v, plan.kv_layout)?,
            View::new(&desc, f.desc_layout)?,
            &plan.layout,
            f.top_k,
            None,
            &mut ViewMut::contiguous(&mut want, plan.o_shape())?,
            None,
            &mut routes,
        )?;
        let to_f32 = |x: &[bf16]| x.iter().map(|e| e.to_f32()).collect::<Vec<_>>();
        let (routes_ok, err) = (
            got_routes.ids() == routes.ids(),
            rel_err(&to_f32(&got), &to_f32(&want)),
        );
        let share = 100.0 * plan.attended_share();
        Ok(Check::when(
            routes_ok && err <= 1e-2,
            format!(
                "routes equal, rel err {err:.0e}; top_k {}, read {share:.1}% of the visual entries",
                f.top_k
            ),
            format!("routes equal: {routes_ok}, rel err {err:.1e}"),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let sets = self.sets();
        let stats = env.gpu(sets, |stream, set| self.fused(stream, set))?;
        let two_stats = env.gpu(sets, |stream, set| self.two_ops(stream, set))?;
        let dense_stats = env.gpu(sets, |stream, set| self.dense(stream, set))?;
        let op_eager = env.eager(sets, |stream, set| self.fused(stream, set))?;
        let two_eager = env.eager(sets, |stream, set| self.two_ops(stream, set))?;
        let dense_eager = env.eager(sets, |stream, set| self.dense(stream, set))?;
        let bytes = self.f.input.plan.floor_bytes(2) + (4 * self.f.desc_layout.span()) as u64;
        let row = |name: &str, base: f64, base_eager: f64| {
            Row::new(stats, bytes).with_baseline(Baseline {
                name: name.into(),
                gpu_us: Some(base),
                op_eager_us: op_eager.median_us,
                eager_us: base_eager,
            })
        };
        Ok(vec![
            row(
                "route_topk + gaze_decode",
                two_stats.median_us,
                two_eager.median_us,
            ),
            row(
                "dense (gaze_decode, all visible)",
                dense_stats.median_us,
                dense_eager.median_us,
            ),
        ])
    }
}
