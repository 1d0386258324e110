//! gpu_bench section `gaze_decode`: one decode step of Qwen2.5-VL-7B (28
//! query heads, 4 KV heads, D 128, bf16) over 1K, 4K and 16K visual tokens
//! plus 64 visible text tokens, at 5, 10, 25 and 50% of the visual entries
//! attended (6 x 6 regions), batch 1 and 8, against dense decode attention
//! over the same cache: the same kernels with every position visible and no
//! region (`foveal_bench::gaze_decode::Plan::dense`). Both are checked once
//! against the CPU reference (outputs poisoned first), then timed gated (GPU
//! time: `median_us`, `base_us`, `speedup`) and eagerly (host launch overhead
//! included: `eager_us`, `base_eager_us`, `speedup_eager`). `bytes` is q, o
//! and the KV entries the op reads once per group. The PyTorch baseline:
//! dense decode attention over the same cache by
//! `scaled_dot_product_attention` (flash and cuDNN backends).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::gaze_decode::{cpu, cuda};
use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use foveal::{View, ViewMut};
use foveal_bench::gaze_decode::{self as gd, Plan, ATTENDED_PCT};
use foveal_bench::{KvLayout, VISUAL_TOKENS};
use half::bf16;
use serde_json::json;

use crate::env::Env;
use crate::table::{Baseline, Row};
use crate::torch::TorchCase;
use crate::{boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "gaze_decode",
    cases,
};

/// The decode steps of this section and of gaze_route_decode's.
pub fn decode_cases(mode: Mode) -> Vec<gd::Case> {
    if mode == Mode::Quick {
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

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    boxed(decode_cases(mode))
}

/// Dense decode attention over the cache of `case` (every position visible),
/// the PyTorch baseline of this section and of gaze_route_decode's.
pub fn sdpa_decode(case: &gd::Case) -> TorchCase {
    let d = case.dims;
    TorchCase::new(
        "sdpa_decode",
        json!({
            "batch": case.batch, "q_heads": d.q_heads, "kv_heads": d.kv_heads, "head_dim": d.head_dim,
            "seq": case.seq(), "kv_layout": case.kv_layout.name(),
        }),
    )
}

impl Case for gd::Case {
    fn label(&self) -> String {
        gd::Case::label(self)
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(sdpa_decode(self))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let plan = gd::plan(self);
        let (q_len, kv_len) = (plan.q_layout.span(), plan.kv_layout.span());
        let sets = env.n_sets((4 * q_len + 4 * kv_len) as u64)?;
        let data = (0..sets)
            .map(|_| Set::new(env, &plan, None))
            .collect::<Res<_>>()?;
        let dense = plan.dense();
        Ok(Box::new(Prepared {
            sparse: DevicePlan::new(&env.stream, plan)?,
            dense: DevicePlan::new(&env.stream, dense)?,
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: q, k, v and the output (gaze_route_decode's too).
pub struct Set {
    pub q: CudaSlice<bf16>,
    pub k: CudaSlice<bf16>,
    pub v: CudaSlice<bf16>,
    pub o: CudaSlice<bf16>,
}

impl Set {
    /// q (filled from the pool unless given), k and v from the pool.
    pub fn new(env: &mut Env, plan: &Plan, q: Option<&[bf16]>) -> Res<Self> {
        let (q_len, kv_len) = (plan.q_layout.span(), plan.kv_layout.span());
        Ok(Set {
            q: match q {
                Some(q) => env.stream.clone_htod(q)?,
                None => env.pool.filled(&env.stream, q_len)?,
            },
            k: env.pool.filled(&env.stream, kv_len)?,
            v: env.pool.filled(&env.stream, kv_len)?,
            o: env.stream.alloc_zeros(q_len)?,
        })
    }
}

/// A plan, and its layout and routes on the device.
pub struct DevicePlan {
    pub plan: Plan,
    pub layout: DeviceGazeLayout,
    pub routes: DeviceRoutes,
}

impl DevicePlan {
    /// The plan's layout and routes uploaded.
    pub fn new(stream: &Arc<CudaStream>, plan: Plan) -> Res<Self> {
        Ok(DevicePlan {
            layout: DeviceGazeLayout::new(stream, &plan.layout)?,
            routes: DeviceRoutes::from_host(stream, &plan.routes)?,
            plan,
        })
    }

    /// The plan's layout uploaded, with unwritten routes of `top_k` regions
    /// per head (for route_topk or gaze_route_decode to fill).
    pub fn routed(stream: &Arc<CudaStream>, plan: Plan, top_k: usize) -> Res<Self> {
        let layout = DeviceGazeLayout::new(stream, &plan.layout)?;
        Ok(DevicePlan {
            routes: DeviceRoutes::new(stream, &layout, 1, plan.dims.q_heads, top_k)?,
            layout,
            plan,
        })
    }

    pub fn launch(&self, stream: &Arc<CudaStream>, set: &mut Set, ws: &mut Workspace) -> Res<()> {
        let plan = &self.plan;
        let q = DevView::of(&set.q, plan.q_layout)?;
        let k = DevView::of(&set.k, plan.kv_layout)?;
        let v = DevView::of(&set.v, plan.kv_layout)?;
        let mut o = DevViewMut::of(&mut set.o, plan.q_layout)?;
        cuda::gaze_decode(
            stream,
            &q,
            &k,
            &v,
            &self.layout,
            &self.routes,
            None,
            &mut o,
            None,
            ws,
        )?;
        Ok(())
    }

    /// Runs on `set` into a poisoned output; the relative error against the
    /// CPU reference.
    fn check(&self, env: &Env, set: &mut Set, ws: &mut Workspace) -> Res<f64> {
        let (stream, plan) = (&env.stream, &self.plan);
        env.poison(&mut set.o, bf16::NAN)?;
        self.launch(stream, set, ws)?;
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
}

/// The input sets of a case, its plan and the dense plan.
struct Prepared {
    sparse: DevicePlan,
    dense: DevicePlan,
    data: Vec<Set>,
    ws: Workspace,
}

impl Bench for Prepared {
    fn sets(&self) -> usize {
        self.data.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let sparse = self.sparse.check(env, &mut self.data[0], &mut self.ws)?;
        let dense = self.dense.check(env, &mut self.data[0], &mut self.ws)?;
        let share = 100.0 * self.sparse.plan.attended_share();
        // bf16 outputs of f32 sums in different orders: a rounding apart.
        Ok(Check::when(
            sparse <= 1e-2 && dense <= 1e-2,
            format!(
                "rel err {sparse:.0e}, dense {dense:.0e}; read {share:.1}% of the visual entries"
            ),
            format!("rel err {sparse:.1e}, dense {dense:.1e}"),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let sets = self.sets();
        let Prepared {
            sparse,
            dense,
            data,
            ws,
        } = self;
        let stats = env.gpu(sets, |s, set| sparse.launch(s, &mut data[set], ws))?;
        let dense_stats = env.gpu(sets, |s, set| dense.launch(s, &mut data[set], ws))?;
        let op_eager = env.eager(sets, |s, set| sparse.launch(s, &mut data[set], ws))?;
        let dense_eager = env.eager(sets, |s, set| dense.launch(s, &mut data[set], ws))?;
        Ok(vec![Row::new(stats, sparse.plan.floor_bytes(2))
            .with_baseline(Baseline {
                name: "dense (gaze_decode, all visible)".into(),
                gpu_us: Some(dense_stats.median_us),
                op_eager_us: op_eager.median_us,
                eager_us: dense_eager.median_us,
            })])
    }
}
