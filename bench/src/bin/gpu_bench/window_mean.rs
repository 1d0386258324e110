//! gpu_bench section `window_mean`: FocusLLaVA's window pooling of a feature
//! map (`foveal_bench::window_mean`: 24 x 24 and 48 x 48 maps of 1024 and
//! 4096 channels, window 4, batch 1 and 4; and a max-pooled case). Checked
//! once against the CPU reference (output poisoned first; bit-identical).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut};
use foveal::window_mean::{cpu, cuda};
use foveal::{Layout, Pool, View, ViewMut};
use foveal_bench::window_mean as wm;
use half::bf16;

use crate::env::Env;
use crate::table::Row;
use crate::{bit_equal, boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "window_mean",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![wm::Case::new(1, 24, 1024), wm::Case::new(4, 48, 4096)]);
    }
    let mut cases = Vec::new();
    for grid in wm::GRIDS {
        for channels in wm::CHANNELS {
            for batch in [1, 4] {
                cases.push(wm::Case::new(batch, grid, channels));
            }
        }
    }
    cases.push(wm::Case::new(4, 48, 4096).with_pool(Pool::Max));
    boxed(cases)
}

impl Case for wm::Case {
    fn label(&self) -> String {
        wm::Case::label(self)
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let (x_len, out_len) = (self.x_len(), self.out_len());
        let sets = env.n_sets(((x_len + out_len) * 2) as u64)?;
        Ok(Box::new(Prepared {
            case: self,
            x: env.filled(sets, x_len)?,
            out: env.zeroed(sets, out_len)?,
        }))
    }
}

/// The input sets of a case.
struct Prepared<'a> {
    case: &'a wm::Case,
    x: Vec<CudaSlice<bf16>>,
    out: Vec<CudaSlice<bf16>>,
}

impl Prepared<'_> {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let case = self.case;
        let x = DevView::of(&self.x[set], Layout::contiguous(case.x_shape()))?;
        let mut out = DevViewMut::of(&mut self.out[set], Layout::contiguous(case.out_shape()))?;
        cuda::window_mean(stream, &x, case.window, case.pool, &mut out)?;
        Ok(())
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.x.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let (stream, case) = (&env.stream, self.case);
        env.poison(&mut self.out[0], bf16::NAN)?;
        self.launch(stream, 0)?;
        let (got, x) = (
            stream.clone_dtoh(&self.out[0])?,
            stream.clone_dtoh(&self.x[0])?,
        );
        let mut want = vec![bf16::ZERO; case.out_len()];
        cpu::window_mean(
            View::contiguous(&x, case.x_shape())?,
            case.window,
            case.pool,
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
