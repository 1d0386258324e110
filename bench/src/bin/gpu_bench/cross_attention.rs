//! gpu_bench section `cross_attention`: VISOR's text-to-image attention
//! (`foveal_bench::cross_attention`, issue 13's sweep): LLaVA-OneVision-0.5B
//! heads (14 query / 2 KV, D 64) and 7B-like heads (28 / 4, D 128), Nq 1
//! (decode), 16, 64, 256 and 512 over Nk 729, 2,916 and 7,290 visual tokens,
//! B 1 and 8, bf16, keys `[B, Nk, Hkv, D]` (two `[B, Hkv, Nk, D]` cases); and
//! Glance2Gaze's Gaze Compression, the same op layer by layer at Table 7's
//! schedules (`G2G` rows: `p_l` queries over the previous layer's tokens,
//! LLaVA-1.5-7B's 32 / 32 heads, D 128, one image).
//!
//! Each row reports the figure of the ceiling that bounds the case on this
//! machine (`Case::bound` with the measured ceilings): GB/s of the bytes floor
//! against the copy bandwidth always, and TFLOP/s (`4 B Hq Nq Nk D`) against
//! the bf16 matrix rate where compute bounds it. Checked once (output
//! poisoned first): every output written, and the first and last rows'
//! outputs at up to 8 queries against the CPU reference. The PyTorch
//! baseline: `scaled_dot_product_attention` on the same tensors, flash and
//! cuDNN backends (`sdpa_cross`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cross_attention::cpu;
use foveal::cross_attention::cuda::{self, DeviceSeqLens};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::{SeqLens, View, ViewMut};
use foveal_bench::cross_attention::{self as ca, Bound, GazeStep, GAZE_SCHEDULES, HEADS};
use foveal_bench::{KvLayout, QWEN25_VL_7B};
use half::bf16;
use serde_json::json;

use crate::env::Env;
use crate::table::Row;
use crate::torch::TorchCase;
use crate::{boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "cross_attention",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        // One compute-bound prefill, one memory-bound decode step.
        return boxed(vec![
            ca::Case::new(QWEN25_VL_7B, 1, 256, 2916),
            ca::Case::new(QWEN25_VL_7B, 8, 1, 7290),
        ]);
    }
    let mut sweep: Vec<ca::Case> = HEADS.into_iter().flat_map(ca::sweep).collect();
    sweep.push(ca::Case::new(QWEN25_VL_7B, 8, 1, 7290).with_layout(KvLayout::Bhsd));
    sweep.push(ca::Case::new(QWEN25_VL_7B, 8, 256, 2916).with_layout(KvLayout::Bhsd));
    let mut cases = boxed(sweep);
    cases.extend(boxed(
        GAZE_SCHEDULES.iter().flat_map(|s| s.steps()).collect(),
    ));
    cases
}

/// The PyTorch baseline of `case`: SDPA over the same shapes and memory orders.
fn sdpa_cross(case: &ca::Case) -> TorchCase {
    let d = case.dims;
    TorchCase::new(
        "sdpa_cross",
        json!({
            "batch": case.batch, "queries": case.queries, "keys": case.keys,
            "q_heads": d.q_heads, "kv_heads": d.kv_heads, "head_dim": d.head_dim,
            "kv_layout": case.kv_layout.name(),
        }),
    )
}

impl Case for ca::Case {
    fn label(&self) -> String {
        ca::Case::label(self)
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(sdpa_cross(self))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        prepare(self, env)
    }
}

impl Case for GazeStep {
    fn label(&self) -> String {
        GazeStep::label(self)
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(sdpa_cross(&self.case))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        prepare(&self.case, env)
    }
}

fn prepare<'a>(case: &'a ca::Case, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
    let (q_len, kv_len) = (case.q_layout().span(), case.kv_layout().span());
    let sets = env.n_sets((2 * (2 * q_len + 2 * kv_len)) as u64)?;
    let data = (0..sets)
        .map(|_| {
            Ok(Set {
                q: env.pool.filled(&env.stream, q_len)?,
                k: env.pool.filled(&env.stream, kv_len)?,
                v: env.pool.filled(&env.stream, kv_len)?,
                o: env.stream.alloc_zeros(q_len.max(1))?,
            })
        })
        .collect::<Res<_>>()?;
    Ok(Box::new(Prepared {
        case,
        lens: DeviceSeqLens::new(&env.stream, &case.lens())?,
        data,
        ws: Workspace::new(),
    }))
}

/// One input set: q, k, v and the output.
struct Set {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
}

struct Prepared<'a> {
    case: &'a ca::Case,
    lens: DeviceSeqLens,
    data: Vec<Set>,
    ws: Workspace,
}

/// Queries of a row compared with the CPU reference: at most this many,
/// spread over the row (the first and the last among them).
const CHECKED_QUERIES: usize = 8;

impl Prepared<'_> {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let (case, set) = (self.case, &mut self.data[set]);
        let q = DevView::of(&set.q, case.q_layout())?;
        let k = DevView::of(&set.k, case.kv_layout())?;
        let v = DevView::of(&set.v, case.kv_layout())?;
        let mut o = DevViewMut::of(&mut set.o, case.q_layout())?;
        cuda::cross_attention(
            stream,
            &q,
            &k,
            &v,
            &self.lens,
            None,
            &mut o,
            None,
            &mut self.ws,
        )?;
        Ok(())
    }

    /// Row `b`'s outputs at `picks` (query indices): the GPU's from `got`
    /// (all of o), and the CPU reference's on the same inputs, both
    /// `[picks, Hq, D]` in f32.
    fn row_outputs(
        &self,
        stream: &Arc<CudaStream>,
        b: usize,
        picks: &[usize],
        got: &[bf16],
    ) -> Res<(Vec<f32>, Vec<f32>)> {
        let case = self.case;
        let (nq, nk) = (case.queries, case.keys);
        let (hq, hkv, d) = (case.dims.q_heads, case.dims.kv_heads, case.dims.head_dim);
        let set = &self.data[0];
        // q and o are [B, Nq, Hq, D] contiguous; k and v hold their rows one
        // after the other in either memory order.
        let token = hq * d;
        let kv_row = nk * hkv * d;
        let q_row = stream.clone_dtoh(&set.q.slice(b * nq * token..(b + 1) * nq * token))?;
        let k = stream.clone_dtoh(&set.k.slice(b * kv_row..(b + 1) * kv_row))?;
        let v = stream.clone_dtoh(&set.v.slice(b * kv_row..(b + 1) * kv_row))?;
        let q: Vec<bf16> = picks
            .iter()
            .flat_map(|&i| q_row[i * token..(i + 1) * token].iter().copied())
            .collect();
        let shape = [1, picks.len(), hq, d];
        let one_row = case.kv_layout.layout(1, nk, hkv, d);
        let mut want = vec![bf16::ZERO; picks.len() * token];
        cpu::cross_attention(
            View::contiguous(&q, shape)?,
            View::new(&k, one_row)?,
            View::new(&v, one_row)?,
            &SeqLens::full(1, picks.len(), nk),
            None,
            &mut ViewMut::contiguous(&mut want, shape)?,
            None,
        )?;
        let got: Vec<f32> = picks
            .iter()
            .flat_map(|&i| {
                let at = (b * nq + i) * token;
                got[at..at + token].iter().map(|x| x.to_f32())
            })
            .collect();
        Ok((got, want.iter().map(|x| x.to_f32()).collect()))
    }
}

/// Up to `n` query indices of `0..nq` spread evenly, the first and the last among them.
fn spread(nq: usize, n: usize) -> Vec<usize> {
    let n = n.min(nq);
    match n {
        0 => vec![],
        1 => vec![0],
        _ => (0..n).map(|j| j * (nq - 1) / (n - 1)).collect(),
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.data.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let stream = env.stream.clone();
        let case = self.case;
        // Both rows' spans are contiguous only if the layouts are dense.
        let dense = case.q_layout().span() == case.q_layout().numel()
            && case.kv_layout().span() == case.kv_layout().numel();
        if !dense {
            return Err(format!("{}: the check expects dense tensors", case.label()).into());
        }
        env.poison(&mut self.data[0].o, bf16::NAN)?;
        self.launch(&stream, 0)?;
        let got = stream.clone_dtoh(&self.data[0].o)?;
        // Inputs in [-1, 1): every output is finite, so a NaN is an unwritten one.
        let unwritten = got.iter().filter(|x| x.is_nan()).count();
        let picks = spread(case.queries, CHECKED_QUERIES);
        let rows = if case.batch > 1 {
            vec![0, case.batch - 1]
        } else {
            vec![0]
        };
        let mut worst = 0f64;
        for &b in &rows {
            let (g, w) = self.row_outputs(&stream, b, &picks, &got)?;
            worst = worst.max(rel_err(&g, &w));
        }
        let what = format!(
            "rows {rows:?} x {} queries: rel err {worst:.0e}",
            picks.len()
        );
        // bf16 outputs of f32 sums in different orders, P rounded to bf16: a rounding apart.
        Ok(Check::when(
            unwritten == 0 && worst <= 1e-2,
            format!("{what}; every output written"),
            format!("{what}; {unwritten} outputs unwritten"),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        let case = self.case;
        let row = Row::new(stats, case.floor_bytes(2));
        // The figure of the ceiling that bounds the case (both while one is unmeasured).
        let bound = match (env.ceilings.matmul_tflops, env.ceilings.copy_gbps) {
            (Some(tflops), Some(gbps)) => case.bound(2, tflops * 1e12, gbps * 1e9).1,
            _ => Bound::Compute,
        };
        Ok(vec![match bound {
            Bound::Compute => row.with_flops(case.flops()),
            Bound::Memory => row,
        }])
    }
}
