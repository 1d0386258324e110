//! gpu_bench section `token_pack`: VISOR-TR's token packing between the
//! vision tower and the projector (`foveal_bench::token_pack`: 1, 4 and 10
//! LLaVA-OneVision crops of 27 x 27 SigLIP-so400m tokens, C 1,152, bf16),
//! at reduction ratios 2 and 4 (the paper's VISOR-TR [2x] and [4x]: 27 x 27
//! resized to 38 x 38 and 28 x 28) and 3 (a ratio that is no power of two,
//! 32 x 32). GB/s of
//! the floor (x read, out written) against the copy bandwidth. Checked once
//! (output poisoned first): bit for bit against the CPU reference. The
//! PyTorch baseline: `interpolate` (bilinear, align_corners=False) to the
//! resized grid, then the space-to-depth reshape (`interpolate_pack`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut};
use foveal::token_pack::{cpu, cuda};
use foveal::{Layout, View, ViewMut};
use foveal_bench::token_pack::{self as tp, RATIOS};
use half::bf16;
use serde_json::json;

use crate::env::Env;
use crate::table::Row;
use crate::torch::TorchCase;
use crate::{bit_equal, boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "token_pack",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![tp::Case::new(10, 2.0)]);
    }
    let mut cases = Vec::new();
    for rho in RATIOS {
        for batch in [1, 4, 10] {
            cases.push(tp::Case::new(batch, rho));
        }
    }
    boxed(cases)
}

impl Case for tp::Case {
    fn label(&self) -> String {
        tp::Case::label(self)
    }

    fn torch(&self) -> Option<TorchCase> {
        let [resized, resized_w] = self.resized();
        // The script takes square grids (LLaVA-OneVision's crops are).
        (resized == resized_w).then(|| {
            TorchCase::new(
                "interpolate_pack",
                json!({
                    "batch": self.batch, "side": self.side, "channels": self.channels,
                    "rho": self.rho, "resized": resized,
                }),
            )
        })
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let x_len = self.x_shape().iter().product::<usize>();
        let out_len = self.out_shape().iter().product::<usize>();
        let sets = env.n_sets(((x_len + out_len) * 2) as u64)?;
        Ok(Box::new(Prepared {
            case: self,
            x: env.filled(sets, x_len)?,
            out: env.zeroed(sets, out_len)?,
        }))
    }
}

struct Prepared<'a> {
    case: &'a tp::Case,
    x: Vec<CudaSlice<bf16>>,
    out: Vec<CudaSlice<bf16>>,
}

impl Prepared<'_> {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let case = self.case;
        let x = DevView::of(&self.x[set], Layout::contiguous(case.x_shape()))?;
        let mut out = DevViewMut::of(&mut self.out[set], Layout::contiguous(case.out_shape()))?;
        cuda::token_pack(stream, &x, case.rho, &mut out)?;
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
        let (got, x) = (
            stream.clone_dtoh(&self.out[0])?,
            stream.clone_dtoh(&self.x[0])?,
        );
        let mut want = vec![bf16::ZERO; got.len()];
        cpu::token_pack(
            View::contiguous(&x, case.x_shape())?,
            case.rho,
            &mut ViewMut::contiguous(&mut want, case.out_shape())?,
        )?;
        Ok(Check::when(
            bit_equal(&got, &want, bf16::to_bits),
            "exact",
            "differs from the CPU reference",
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        Ok(vec![Row::new(stats, self.case.floor_bytes(2))])
    }
}
