//! gpu_bench section `compact_kv`: the KV cache of 16 or 28 layers compacted
//! to the kept positions (`foveal_bench::compact_kv`: Qwen2.5-VL-7B heads,
//! 1K to 16K visual tokens, a quarter kept, batch 1 and 4, both cache orders),
//! every layer's K and V in one call, against the per-layer loop: one
//! `gather_rows` per layer's K and per V (`2L` launches; for the `[B, H, S,
//! D]` order, which has no single-plane row view, `L` two-plane compact_kv
//! launches), replayed from a CUDA graph and gated (its GPU time alone,
//! against the op's), and eagerly, a loop of calls issued back to back
//! without the gate (what an eager framework pays, host launch overhead
//! included, against the op issued the same way). Both checked once against
//! the CPU reference (set 0's first K and last V planes poisoned first;
//! bit-identical). The PyTorch baseline: a per-layer loop of `index_select`
//! over the same caches.

use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream};
use foveal::compact_kv::{cpu, cuda};
use foveal::cuda::{DevView, DevViewMut, DeviceKeepPositions};
use foveal::{Layout, View, ViewMut};
use foveal_bench::compact_kv as ck;
use foveal_bench::{KvLayout, VISUAL_TOKENS};
use half::bf16;
use serde_json::json;

use crate::env::Env;
use crate::table::{Baseline, Row};
use crate::timing::capture;
use crate::torch::TorchCase;
use crate::{bit_equal, boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "compact_kv",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![
            ck::Case::new(16, 1, 1024, KvLayout::Bshd),
            ck::Case::new(28, 4, 16384, KvLayout::Bshd),
            ck::Case::new(28, 4, 16384, KvLayout::Bhsd),
        ]);
    }
    let mut cases = Vec::new();
    for layers in [16, 28] {
        for batch in [1, 4] {
            for nv in VISUAL_TOKENS {
                for layout in KvLayout::ALL {
                    cases.push(ck::Case::new(layers, batch, nv, layout));
                }
            }
        }
    }
    boxed(cases)
}

impl Case for ck::Case {
    fn label(&self) -> String {
        ck::Case::label(self)
    }

    /// The caches' shapes and each row's kept positions (the destination
    /// holds `width` slots per row; the rest of a row is padding).
    fn torch(&self) -> Option<TorchCase> {
        let plan = ck::plan(self);
        let [batch, seq, kv_heads, head_dim] = plan.src_layout.shape();
        let keep: Vec<&[i32]> = (0..batch).map(|b| plan.keep.row(b)).collect();
        Some(TorchCase::new(
            "index_select",
            json!({
                "layers": plan.layers, "batch": batch, "seq": seq, "kv_heads": kv_heads,
                "head_dim": head_dim, "kv_layout": self.kv_layout.name(),
                "width": plan.keep.width(), "keep": keep,
            }),
        ))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let plan = ck::plan(self);
        let (src_len, dst_len) = (plan.src_len(), plan.dst_len());
        let sets = env.n_sets((plan.planes() * (src_len + dst_len) * 2) as u64)?;
        let mut data = Vec::with_capacity(sets);
        for _ in 0..sets {
            data.push(KvSet {
                k_src: env.filled(plan.layers, src_len)?,
                v_src: env.filled(plan.layers, src_len)?,
                k_dst: env.zeroed(plan.layers, dst_len)?,
                v_dst: env.zeroed(plan.layers, dst_len)?,
            });
        }
        let keep = DeviceKeepPositions::from_host(&env.stream, &plan.keep)?;
        Ok(Box::new(Prepared { plan, keep, data }))
    }
}

/// The K and V planes of one input set, sources and destinations.
struct KvSet {
    k_src: Vec<CudaSlice<bf16>>,
    v_src: Vec<CudaSlice<bf16>>,
    k_dst: Vec<CudaSlice<bf16>>,
    v_dst: Vec<CudaSlice<bf16>>,
}

/// The input sets of a case.
struct Prepared {
    plan: ck::Plan,
    keep: DeviceKeepPositions,
    data: Vec<KvSet>,
}

fn src_views(planes: &[CudaSlice<bf16>], layout: Layout<4>) -> Res<Vec<DevView<'_, bf16, 4>>> {
    Ok(planes
        .iter()
        .map(|p| DevView::of(p, layout))
        .collect::<Result<_, _>>()?)
}

fn dst_views(
    planes: &mut [CudaSlice<bf16>],
    layout: Layout<4>,
) -> Res<Vec<DevViewMut<'_, bf16, 4>>> {
    Ok(planes
        .iter_mut()
        .map(|p| DevViewMut::of(p, layout))
        .collect::<Result<_, _>>()?)
}

/// The op: every layer's K and V in one compact_kv call.
fn one_call(
    stream: &Arc<CudaStream>,
    plan: &ck::Plan,
    keep: &DeviceKeepPositions,
    set: &mut KvSet,
) -> Res<()> {
    let (ks, vs) = (
        src_views(&set.k_src, plan.src_layout)?,
        src_views(&set.v_src, plan.src_layout)?,
    );
    let mut kd = dst_views(&mut set.k_dst, plan.dst_layout)?;
    let mut vd = dst_views(&mut set.v_dst, plan.dst_layout)?;
    cuda::compact_kv(stream, &ks, &vs, keep, plan.padding, &mut kd, &mut vd)?;
    Ok(())
}

/// The name of the per-layer baseline of `plan`.
fn per_layer_name(plan: &ck::Plan) -> String {
    match plan.src_rows_layout() {
        Some(_) => format!("per-layer gather_rows ({} launches)", 2 * plan.layers),
        None => format!("per-layer compact_kv ({} launches)", plan.layers),
    }
}

/// The baseline: one gather_rows per layer's K and per V (2L launches); for
/// the [B, H, S, D] order, which has no [B, S, W] row view, one two-plane
/// compact_kv per layer (L launches).
fn per_layer(
    stream: &Arc<CudaStream>,
    plan: &ck::Plan,
    keep: &DeviceKeepPositions,
    set: &mut KvSet,
) -> Res<()> {
    match (plan.src_rows_layout(), plan.dst_rows_layout()) {
        (Some(src3), Some(dst3)) => {
            for l in 0..plan.layers {
                for (src, dst) in [
                    (&set.k_src[l], &mut set.k_dst[l]),
                    (&set.v_src[l], &mut set.v_dst[l]),
                ] {
                    let s = DevView::of(src, src3)?;
                    let mut d = DevViewMut::of(dst, dst3)?;
                    cuda::gather_rows(
                        stream,
                        &[s],
                        keep,
                        plan.padding,
                        std::slice::from_mut(&mut d),
                    )?;
                }
            }
        }
        _ => {
            for l in 0..plan.layers {
                let ks = DevView::of(&set.k_src[l], plan.src_layout)?;
                let vs = DevView::of(&set.v_src[l], plan.src_layout)?;
                let mut kd = DevViewMut::of(&mut set.k_dst[l], plan.dst_layout)?;
                let mut vd = DevViewMut::of(&mut set.v_dst[l], plan.dst_layout)?;
                cuda::compact_kv(
                    stream,
                    &[ks],
                    &[vs],
                    keep,
                    plan.padding,
                    std::slice::from_mut(&mut kd),
                    std::slice::from_mut(&mut vd),
                )?;
            }
        }
    }
    Ok(())
}

impl Prepared {
    /// Whether set 0's first K and last V destination planes, written by `f`
    /// after poisoning, equal `want` bit for bit.
    fn written_as(
        &mut self,
        env: &Env,
        want: &[Vec<bf16>; 2],
        f: fn(&Arc<CudaStream>, &ck::Plan, &DeviceKeepPositions, &mut KvSet) -> Res<()>,
    ) -> Res<bool> {
        let (stream, last, set) = (&env.stream, self.plan.layers - 1, &mut self.data[0]);
        env.poison(&mut set.k_dst[0], bf16::NAN)?;
        env.poison(&mut set.v_dst[last], bf16::NAN)?;
        f(stream, &self.plan, &self.keep, set)?;
        let got = [
            stream.clone_dtoh(&set.k_dst[0])?,
            stream.clone_dtoh(&set.v_dst[last])?,
        ];
        Ok((0..2).all(|i| bit_equal(&got[i], &want[i], bf16::to_bits)))
    }
}

impl Bench for Prepared {
    fn sets(&self) -> usize {
        self.data.len()
    }

    /// The op and the baseline against the CPU reference on set 0's first K
    /// and last V planes.
    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let (plan, last) = (&self.plan, self.plan.layers - 1);
        let kh = env.stream.clone_dtoh(&self.data[0].k_src[0])?;
        let vh = env.stream.clone_dtoh(&self.data[0].v_src[last])?;
        let mut want = [
            vec![bf16::ZERO; plan.dst_len()],
            vec![bf16::ZERO; plan.dst_len()],
        ];
        {
            let [kw, vw] = &mut want;
            cpu::compact_kv(
                &[View::new(&kh, plan.src_layout)?],
                &[View::new(&vh, plan.src_layout)?],
                &plan.keep,
                plan.padding,
                &mut [ViewMut::new(kw, plan.dst_layout)?],
                &mut [ViewMut::new(vw, plan.dst_layout)?],
            )?;
        }
        let op = self.written_as(env, &want, one_call)?;
        let base = self.written_as(env, &want, per_layer)?;
        Ok(match (op, base) {
            (true, true) => Check::Pass("exact".into()),
            (false, _) => Check::Fail("compact_kv differs from the CPU reference".into()),
            (true, false) => Check::Fail("the baseline differs from the CPU reference".into()),
        })
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let (stream, sets) = (env.stream.clone(), self.sets());
        let Prepared { plan, keep, data } = self;
        let stats = env.gpu(sets, |s, set| one_call(s, plan, keep, &mut data[set]))?;
        let op_eager = env.eager(sets, |s, set| one_call(s, plan, keep, &mut data[set]))?;
        let eager = env.eager(sets, |s, set| per_layer(s, plan, keep, &mut data[set]))?;
        // The same loop replayed from a graph per input set: its GPU time alone.
        let graphs: Res<Vec<CudaGraph>> = data
            .iter_mut()
            .map(|set| capture(&stream, || per_layer(&stream, plan, keep, set)))
            .collect();
        let gpu_us = match graphs {
            Ok(graphs) => Some(env.gpu(sets, |_, set| Ok(graphs[set].launch()?))?.median_us),
            Err(e) => {
                eprintln!("compact_kv: graph capture of the per-layer baseline failed: {e}");
                None
            }
        };
        Ok(vec![Row::new(stats, plan.floor_bytes(2)).with_baseline(
            Baseline {
                name: per_layer_name(plan),
                gpu_us,
                op_eager_us: op_eager.median_us,
                eager_us: eager.median_us,
            },
        )])
    }
}
