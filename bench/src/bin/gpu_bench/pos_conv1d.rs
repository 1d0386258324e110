//! gpu_bench section `pos_conv1d`: VISOR's conditional position embedding on
//! the visual tokens entering the decoder (`foveal_bench::pos_conv1d`: 729,
//! 2,916 and 7,290 tokens, 1 to 10 LLaVA-OneVision crops, at Qwen2-0.5B's
//! and Qwen2-7B's widths 896 and 3,584, B 1 and 8, bf16, kernel 7). GB/s of
//! the floor (x read, out written, the weights once) against the copy
//! bandwidth. Checked once (output poisoned first): the first and last rows
//! bit for bit against the CPU reference. The PyTorch baseline: `x +
//! conv1d(x^T, groups=C)^T` (`conv1d_depthwise`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, DeviceLens};
use foveal::pos_conv1d::{cpu, cuda, KERNEL_SIZE};
use foveal::{Layout, View, ViewMut};
use foveal_bench::pos_conv1d::{self as pc, TOKENS, WIDTHS};
use half::bf16;
use serde_json::json;

use crate::env::Env;
use crate::table::Row;
use crate::torch::TorchCase;
use crate::{bit_equal, boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "pos_conv1d",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![
            pc::Case::new(1, 7290, 3584),
            pc::Case::new(8, 2916, 896),
        ]);
    }
    let mut cases = Vec::new();
    for channels in WIDTHS {
        for tokens in TOKENS {
            for batch in [1, 8] {
                cases.push(pc::Case::new(batch, tokens, channels));
            }
        }
    }
    boxed(cases)
}

impl Case for pc::Case {
    fn label(&self) -> String {
        pc::Case::label(self)
    }

    fn torch(&self) -> Option<TorchCase> {
        Some(TorchCase::new(
            "conv1d_depthwise",
            json!({ "batch": self.batch, "tokens": self.tokens, "channels": self.channels }),
        ))
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let len = self.shape().iter().product::<usize>();
        let sets = env.n_sets((2 * 2 * len) as u64)?;
        Ok(Box::new(Prepared {
            case: self,
            lens: DeviceLens::new(&env.stream, &vec![self.tokens; self.batch])?,
            // One layer's weights, shared by every set.
            weight: env.pool.filled(&env.stream, self.channels * KERNEL_SIZE)?,
            bias: env.pool.filled(&env.stream, self.channels)?,
            x: env.filled(sets, len)?,
            out: env.zeroed(sets, len)?,
        }))
    }
}

struct Prepared<'a> {
    case: &'a pc::Case,
    lens: DeviceLens,
    weight: CudaSlice<bf16>,
    bias: CudaSlice<bf16>,
    x: Vec<CudaSlice<bf16>>,
    out: Vec<CudaSlice<bf16>>,
}

impl Prepared<'_> {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let case = self.case;
        let x = DevView::of(&self.x[set], Layout::contiguous(case.shape()))?;
        let w = DevView::of(
            &self.weight,
            Layout::contiguous([case.channels, KERNEL_SIZE]),
        )?;
        let b = DevView::of(&self.bias, Layout::contiguous([case.channels]))?;
        let mut out = DevViewMut::of(&mut self.out[set], Layout::contiguous(case.shape()))?;
        cuda::pos_conv1d(stream, &x, &self.lens, &w, &b, &mut out)?;
        Ok(())
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.x.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let (stream, case) = (env.stream.clone(), self.case);
        env.poison(&mut self.out[0], bf16::NAN)?;
        self.launch(&stream, 0)?;
        let (n, c) = (case.tokens, case.channels);
        let weight = stream.clone_dtoh(&self.weight)?;
        let bias = stream.clone_dtoh(&self.bias)?;
        // Rows are independent: the first and the last.
        let rows = if case.batch > 1 {
            vec![0, case.batch - 1]
        } else {
            vec![0]
        };
        for &b in &rows {
            let span = b * n * c..(b + 1) * n * c;
            let x = stream.clone_dtoh(&self.x[0].slice(span.clone()))?;
            let got = stream.clone_dtoh(&self.out[0].slice(span))?;
            let mut want = vec![bf16::ZERO; n * c];
            cpu::pos_conv1d(
                View::contiguous(&x, [1, n, c])?,
                &[n],
                View::contiguous(&weight, [c, KERNEL_SIZE])?,
                View::contiguous(&bias, [c])?,
                &mut ViewMut::contiguous(&mut want, [1, n, c])?,
            )?;
            if !bit_equal(&got, &want, bf16::to_bits) {
                return Ok(Check::Fail(format!(
                    "row {b} differs from the CPU reference"
                )));
            }
        }
        Ok(Check::Pass(format!("rows {rows:?} exact")))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        Ok(vec![Row::new(stats, self.case.floor_bytes(2))])
    }
}
