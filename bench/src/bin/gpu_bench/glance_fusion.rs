//! gpu_bench section `glance_fusion`: Glance2Gaze's Glance Fusion
//! (`foveal_bench::glance_fusion`: LLaVA-1.5-7B, S = 4 ViT layers, 576 tokens
//! per image, dt 4,096, bf16, instructions of 16, 64 and 256 tokens, B 1 and
//! 8; LLaVA-NeXT's 5 sub-images as 2,880 tokens of a row). GB/s of the floor
//! (`vq` and `e` read once, `out` written once) against the copy bandwidth.
//!
//! Against the literal formula in unfused candle ops, timed in the same run
//! on the same buffers ([`unfused`]): the logits `vq e^T` `[S, B, N, M]` as
//! one bf16 batched matmul, their mean over the instruction in f32, the
//! scale, a softmax over the layers, then `sum_s w[s] vq[s]` as a broadcast
//! multiply and a sum over the leading (layer) dimension. Both run on
//! candle's stream (foveal reads candle's device buffers through views),
//! gated (`base_us`, `speedup`) and eagerly (`eager_us`, `base_eager_us`,
//! `speedup_eager`). The PyTorch baseline is the same chain in torch ops
//! (`glance_unfused`).
//!
//! Checked once: foveal's output (poisoned first) on the first and last rows
//! within 1e-2 relative error of the CPU reference, and on every row within
//! 2e-2 of the unfused chain's (bf16 logits, bf16 weighted sum).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::glance_fusion::cuda::{self, DeviceLengths};
use foveal::glance_fusion::{cpu, Lengths};
use foveal::{Layout, View, ViewMut};
use foveal_bench::glance_fusion::{self as gf, INSTR};
use half::bf16;
use serde_json::json;

use crate::env::{candle_slice, Env};
use crate::table::{Baseline, Row};
use crate::torch::TorchCase;
use crate::{boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "glance_fusion",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![gf::Case::new(8, 1, 64), gf::Case::new(1, 5, 64)]);
    }
    let mut cases = Vec::new();
    for images in [1, 5] {
        for batch in [1, 8] {
            for instr in INSTR {
                cases.push(gf::Case::new(batch, images, instr));
            }
        }
    }
    boxed(cases)
}

impl Case for gf::Case {
    fn label(&self) -> String {
        gf::Case::label(self)
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(TorchCase::new(
            "glance_unfused",
            json!({
                "layers": self.layers, "batch": self.batch, "tokens": self.tokens(),
                "instr": self.instr, "dim": self.dim,
            }),
        ))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let dev = env.candle()?;
        let device = Device::Cuda(dev.clone());
        let stream = dev.cuda_stream();
        let out_len = self.out_shape().iter().product::<usize>();
        let sets = env.n_sets(self.floor_bytes(2, false))?;
        let random = |shape: [usize; 4]| -> Res<Tensor> {
            Ok(Tensor::rand(-1f32, 1f32, shape.to_vec(), &device)?.to_dtype(DType::BF16)?)
        };
        let data = (0..sets)
            .map(|_| {
                Ok(Set {
                    vq: random(self.vq_shape())?,
                    e: random(self.e_shape())?,
                    out: stream.alloc_zeros(out_len)?,
                })
            })
            .collect::<Res<_>>()?;
        Ok(Box::new(Prepared {
            case: self,
            lengths: DeviceLengths::new(
                &stream,
                &Lengths::full(self.batch, self.tokens(), self.instr),
            )?,
            stream,
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: `vq [S, B, N, dt]` and `e [S, B, M, dt]` (bf16, on
/// candle's device) and foveal's output.
struct Set {
    vq: Tensor,
    e: Tensor,
    out: CudaSlice<bf16>,
}

/// The input sets of a case, on candle's stream.
struct Prepared<'a> {
    case: &'a gf::Case,
    stream: Arc<CudaStream>,
    lengths: DeviceLengths,
    data: Vec<Set>,
    ws: Workspace,
}

impl Prepared<'_> {
    fn fused(&mut self, set: usize) -> Res<()> {
        let (case, set) = (self.case, &mut self.data[set]);
        let (vq_buf, e_buf) = (candle_slice(&set.vq)?, candle_slice(&set.e)?);
        let vq = DevView::of(&vq_buf, Layout::contiguous(case.vq_shape()))?;
        let e = DevView::of(&e_buf, Layout::contiguous(case.e_shape()))?;
        let mut out = DevViewMut::of(&mut set.out, Layout::contiguous(case.out_shape()))?;
        cuda::glance_fusion(
            &self.stream,
            &vq,
            &e,
            &self.lengths,
            &mut out,
            None,
            &mut self.ws,
        )?;
        Ok(())
    }

    fn unfused(&self, set: usize) -> Res<Tensor> {
        let s = &self.data[set];
        Ok(unfused(&s.vq, &s.e)?)
    }
}

/// The literal formula in unfused candle ops (module docs): `out [B, N, dt]`.
fn unfused(vq: &Tensor, e: &Tensor) -> candle_core::Result<Tensor> {
    let dim = vq.dim(D::Minus1)?;
    let logits = vq.matmul(&e.t()?)?.to_dtype(DType::F32)?; // [S, B, N, M]
    let g = (logits.mean(D::Minus1)? * (dim as f64).powf(-0.5))?; // [S, B, N]
    let ex = g.broadcast_sub(&g.max_keepdim(0)?)?.exp()?;
    let w = ex.broadcast_div(&ex.sum_keepdim(0)?)?; // softmax over the layers
    vq.broadcast_mul(&w.to_dtype(DType::BF16)?.unsqueeze(D::Minus1)?)?
        .sum(0)
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.data.len()
    }

    fn check(&mut self, _: &mut Env) -> Res<Check> {
        let case = self.case;
        let stream = self.stream.clone();
        // Poisoned on candle's stream, the one the op runs on.
        let poison = vec![bf16::NAN; self.data[0].out.len()];
        stream.memcpy_htod(&poison, &mut self.data[0].out)?;
        self.fused(0)?;
        let got = stream.clone_dtoh(&self.data[0].out)?;
        let f = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let unfused = f(&self.unfused(0)?.flatten_all()?.to_vec1::<bf16>()?);
        let [layers, batch, n, dim] = case.vq_shape();
        let m = case.instr;
        let row = n * dim;
        // The first and last rows against the CPU reference (each row is one
        // [S, 1, N, dt] slice per layer of the inputs).
        let rows = if batch > 1 {
            vec![0, batch - 1]
        } else {
            vec![0]
        };
        let mut worst = 0f64;
        for &b in &rows {
            let slice = |t: &Tensor| -> Res<Vec<bf16>> {
                let mut out = Vec::new();
                for s in 0..layers {
                    out.extend(t.get(s)?.get(b)?.flatten_all()?.to_vec1::<bf16>()?);
                }
                Ok(out)
            };
            let (vq, e) = (slice(&self.data[0].vq)?, slice(&self.data[0].e)?);
            let mut want = vec![bf16::ZERO; row];
            cpu::glance_fusion(
                View::contiguous(&vq, [layers, 1, n, dim])?,
                View::contiguous(&e, [layers, 1, m, dim])?,
                &Lengths::full(1, n, m),
                &mut ViewMut::contiguous(&mut want, [1, n, dim])?,
                None,
            )?;
            worst = worst.max(rel_err(&f(&got[b * row..(b + 1) * row]), &f(&want)));
        }
        // Every row of the op against the unfused chain (a poisoned, unwritten
        // output is an infinite error).
        let vs_unfused = rel_err(&f(&got), &unfused);
        Ok(Check::when(
            worst <= 1e-2 && vs_unfused <= 2e-2,
            format!("rows {rows:?}: rel err {worst:.0e}; unfused within {vs_unfused:.0e}"),
            format!("rows {rows:?}: rel err {worst:.1e}; unfused off by {vs_unfused:.1e}"),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let sets = self.sets();
        let mut timer = env.timer.on(&self.stream)?;
        let op = timer.gpu(sets, |set| self.fused(set))?;
        let base = timer.gpu(sets, |set| self.unfused(set).map(drop))?;
        let op_eager = timer.eager(sets, |set| self.fused(set))?;
        let base_eager = timer.eager(sets, |set| self.unfused(set).map(drop))?;
        Ok(vec![Row::new(op, self.case.floor_bytes(2, false))
            .with_baseline(Baseline {
                name: "literal formula, unfused candle ops".to_string(),
                gpu_us: Some(base.median_us),
                op_eager_us: op_eager.median_us,
                eager_us: base_eager.median_us,
            })])
    }
}
