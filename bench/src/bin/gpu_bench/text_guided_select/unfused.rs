//! text_guided_select against the same computation in unfused candle ops
//! (SPEC "Speed targets": >= 3x faster than matmul / softmax / max / mean /
//! sort / cumsum), both on candle's CUDA stream, timed in the same run; the
//! same cases are the PyTorch baseline's (`torch_baselines.py`: the same
//! steps in torch ops).
//!
//! The case is a Qwen2.5-VL-7B-like layer ([`QWEN25_VL_7B`]: 28 query heads,
//! 4 KV heads, head dim 128, bf16), 64 text tokens and 2,880 visual tokens,
//! gamma 0.85. The inputs live in candle tensors as a decoder holds them
//! (`q [B, Hq, T, D]`, `k [B, Hkv, N, D]`); foveal reads the same device
//! buffers through strided views (the `cudarc` of candle and foveal is one
//! version, so the slices pass without a copy).
//!
//! The unfused form, as a framework writes it (the FocusLLaVA reference code's
//! steps): the logits as one bf16 batched matmul per KV head group, softmax
//! over the visual tokens in f32 (max, subtract, exp, sum, divide), max over
//! the heads, mean over the text tokens, a descending arg-sort of S, the
//! sorted values gathered, their cumulative sum (as candle's `cumsum`
//! computes it: a product with the upper-triangular ones matrix, built once
//! outside the timed region since building it copies from the host), the
//! threshold `gamma * sum(S)` (a token is kept when the sum before it is
//! below it), and an ascending arg-sort that brings the kept indices first
//! in position order; the count is the sum of the kept flags. No host
//! synchronisation, like the fused op.
//!
//! Timed: both GPU times behind the gate (base_us / speedup: the unfused
//! ops' median over the op's), and both issued eagerly (host overhead
//! included: eager_us, base_eager_us, speedup_eager). Checked: the kept sets
//! of both on the first input set (the op's outputs poisoned first; bf16
//! logits in the unfused form move a few tokens at the threshold: the check
//! wants the counts within 2% of N and an overlap of at least 95%).

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::text_guided_select::cuda::{self, DeviceLengths};
use foveal::Layout;
use foveal_bench::text_guided_select::{self as tg, TEXT};
use foveal_bench::{rng, KvLayout, QWEN25_VL_7B};
use half::bf16;
use serde_json::json;

use crate::env::{candle_slice, Env};
use crate::table::{Baseline, Row};
use crate::torch::TorchCase;
use crate::{boxed, Bench, Case, Check, Mode, Res};

/// The visual tokens of the comparison (an anyres image of 5 x 576).
const VISUAL: usize = 2880;

/// A case of the comparison.
struct VsUnfused(tg::Case);

pub(super) fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    let case = |batch| {
        VsUnfused(tg::Case {
            dims: QWEN25_VL_7B,
            ..tg::Case::new(batch, VISUAL, KvLayout::Bhsd).with_text(TEXT)
        })
    };
    match mode {
        Mode::Quick => boxed(vec![case(1)]),
        Mode::Full => boxed(vec![case(1), case(4)]),
    }
}

impl Case for VsUnfused {
    fn label(&self) -> String {
        let dims = self.0.dims;
        format!("{} Hq{}/Hkv{}", self.0.label(), dims.q_heads, dims.kv_heads)
    }

    /// `q [B, Hq, T, D]`, `k [B, Hkv, N, D]` in bf16 and gamma.
    fn torch(&self) -> Option<TorchCase> {
        let c = &self.0;
        Some(TorchCase::new(
            "text_guided_unfused",
            json!({
                "batch": c.batch, "text": c.text, "visual": c.visual, "q_heads": c.dims.q_heads,
                "kv_heads": c.dims.kv_heads, "head_dim": c.dims.head_dim, "gamma": c.gamma,
            }),
        ))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let case = &self.0;
        let dev = env.candle()?;
        let device = Device::Cuda(dev.clone());
        let stream = dev.cuda_stream();
        let (b, t, n) = (case.batch, case.text, case.visual);
        let (hq, hkv, d) = (case.dims.q_heads, case.dims.kv_heads, case.dims.head_dim);
        let sets = env.n_sets(((b * hq * t * d + b * hkv * n * d) * 2 + b * n * 4) as u64)?;
        let mut data = Vec::with_capacity(sets);
        for s in 0..sets {
            let (q, k) = tg::attention_inputs::<bf16>(&mut rng(case.seed + s as u64), case);
            data.push(Set {
                q: Tensor::from_vec(q, (b, t, hq, d), &device)?
                    .transpose(1, 2)?
                    .contiguous()?,
                k: Tensor::from_vec(k, (b, hkv, n, d), &device)?,
                keep: stream.alloc_zeros::<i32>(b * n)?,
                count: stream.alloc_zeros::<i32>(b)?,
            });
        }
        Ok(Box::new(Prepared {
            case,
            triu: Tensor::triu2(n, DType::F32, &device)?,
            lengths: DeviceLengths::new(&stream, &case.lengths())?,
            stream,
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: q `[B, Hq, T, D]` and k `[B, Hkv, N, D]` (bf16, on
/// candle's device), foveal's outputs.
struct Set {
    q: Tensor,
    k: Tensor,
    keep: CudaSlice<i32>,
    count: CudaSlice<i32>,
}

/// The input sets of a case, on candle's stream.
struct Prepared<'a> {
    case: &'a tg::Case,
    stream: Arc<CudaStream>,
    triu: Tensor,
    lengths: DeviceLengths,
    data: Vec<Set>,
    ws: Workspace,
}

impl Prepared<'_> {
    fn fused(&mut self, set: usize) -> Res<()> {
        let (case, set) = (self.case, &mut self.data[set]);
        let (b, t, n) = (case.batch, case.text, case.visual);
        let (hq, hkv, d) = (case.dims.q_heads, case.dims.kv_heads, case.dims.head_dim);
        let (q_buf, k_buf) = (candle_slice(&set.q)?, candle_slice(&set.k)?);
        // q is [B, Hq, T, D] in memory: the logical [B, T, Hq, D] by strides.
        let q = DevView::of(
            &q_buf,
            Layout::strided([b, t, hq, d], [hq * t * d, d, t * d, 1])?,
        )?;
        let k = DevView::of(&k_buf, Layout::bhsd(b, n, hkv, d))?;
        let mut keep = DevViewMut::of(&mut set.keep, Layout::contiguous([b, n]))?;
        let mut count = DevViewMut::of(&mut set.count, Layout::contiguous([b]))?;
        cuda::text_guided_select(
            &self.stream,
            &q,
            &k,
            &self.lengths,
            case.gamma,
            &mut keep,
            &mut count,
            None,
            &mut self.ws,
        )?;
        Ok(())
    }

    fn unfused(&self, set: usize) -> Res<()> {
        let s = &self.data[set];
        unfused(self.case, &s.q, &s.k, &self.triu)?;
        Ok(())
    }
}

/// The unfused form (module docs): kept indices `[B, N]` (the kept ones
/// first, ascending; u32) and counts `[B]`.
fn unfused(
    case: &tg::Case,
    q: &Tensor,
    k: &Tensor,
    triu: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, t, n) = (case.batch, case.text, case.visual);
    let (hq, hkv, d) = (case.dims.q_heads, case.dims.kv_heads, case.dims.head_dim);
    let g = hq / hkv;
    // GQA: the G query heads of a KV head are G*T rows of one product.
    let logits = q
        .reshape((b, hkv, g * t, d))?
        .matmul(&k.t()?)?
        .to_dtype(DType::F32)?;
    let logits = (logits * (d as f64).powf(-0.5))?;
    let m = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&m)?.exp()?;
    let a = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let s = a.reshape((b, hq, t, n))?.max(1)?.mean(1)?; // [B, N]
    let order = s.arg_sort_last_dim(false)?;
    let sorted = s.gather(&order, 1)?;
    let cum = sorted.matmul(triu)?;
    let threshold = (s.sum_keepdim(1)? * f64::from(case.gamma))?;
    let kept = (cum - &sorted)?
        .broadcast_lt(&threshold)?
        .to_dtype(DType::F32)?; // in sorted order
    let count = kept.sum(1)?;
    let key = (order.to_dtype(DType::F32)? + ((1.0 - kept)? * n as f64)?)?;
    let first = key.arg_sort_last_dim(true)?;
    Ok((order.gather(&first, 1)?, count))
}

/// |A ∩ B| / |A ∪ B| of two index sets.
fn overlap(a: &[u32], b: &[u32]) -> f64 {
    let sa: BTreeSet<_> = a.iter().collect();
    let sb: BTreeSet<_> = b.iter().collect();
    let union = sa.union(&sb).count();
    if union == 0 {
        1.0
    } else {
        sa.intersection(&sb).count() as f64 / union as f64
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.data.len()
    }

    /// The kept sets of both on set 0.
    fn check(&mut self, _: &mut Env) -> Res<Check> {
        let (b, n) = (self.case.batch, self.case.visual);
        let stream = self.stream.clone();
        stream.memcpy_htod(&vec![i32::MIN; b * n], &mut self.data[0].keep)?;
        stream.memcpy_htod(&vec![i32::MIN; b], &mut self.data[0].count)?;
        self.fused(0)?;
        let (f_keep, f_count) = (
            stream.clone_dtoh(&self.data[0].keep)?,
            stream.clone_dtoh(&self.data[0].count)?,
        );
        let (u_keep, u_count) = unfused(self.case, &self.data[0].q, &self.data[0].k, &self.triu)?;
        let (u_keep, u_count) = (u_keep.to_vec2::<u32>()?, u_count.to_vec1::<f32>()?);
        let (mut counts_by, mut worst_overlap) = (0usize, 1f64);
        for row in 0..b {
            let (fc, uc) = (
                f_count[row].clamp(0, n as i32) as usize,
                u_count[row] as usize,
            );
            let fk: Vec<u32> = f_keep[row * n..][..fc].iter().map(|&i| i as u32).collect();
            counts_by = counts_by.max(fc.abs_diff(uc));
            worst_overlap = worst_overlap.min(overlap(&fk, &u_keep[row][..uc]));
        }
        let kept: usize = f_count.iter().map(|&c| c.max(0) as usize).sum();
        Ok(Check::when(
            counts_by * 50 <= n && worst_overlap >= 0.95,
            format!(
                "kept {:.0}%; unfused: counts within {counts_by}, overlap >= {:.1}%",
                100.0 * kept as f64 / (b * n) as f64,
                100.0 * worst_overlap
            ),
            format!(
                "unfused kept sets differ: counts by {counts_by}, overlap {:.1}%",
                100.0 * worst_overlap
            ),
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let sets = self.sets();
        let mut timer = env.timer.on(&self.stream)?;
        let op = timer.gpu(sets, |set| self.fused(set))?;
        let base = timer.gpu(sets, |set| self.unfused(set))?;
        let op_eager = timer.eager(sets, |set| self.fused(set))?;
        let base_eager = timer.eager(sets, |set| self.unfused(set))?;
        Ok(vec![Row::new(op, self.case.floor_bytes(2)).with_baseline(
            Baseline {
                name: "unfused candle ops".to_string(),
                gpu_us: Some(base.median_us),
                op_eager_us: op_eager.median_us,
                eager_us: base_eager.median_us,
            },
        )])
    }
}
