//! gpu_bench section `multiscale_gather`: FocusLLaVA's multi-scale token
//! selection (`foveal_bench::multiscale_gather`: 24 x 24 and 48 x 48 maps of
//! 1024 and 4096 channels, the 3- and 7-branch scale sets, random selector
//! logits, batch 1 and 4; and a case scaled by the selector's probability).
//! Checked once against the CPU reference (outputs poisoned first):
//! positions and counts exact, tokens bit-identical (with the probability,
//! within 1e-3: the kernel's expf against the host's exp).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::multiscale_gather::{cpu, cuda};
use foveal::{Layout, ScaleSet, View, ViewMut};
use foveal_bench::multiscale_gather::{self as mg, Branches};
use foveal_bench::rng;
use foveal_bench::window_mean::{CHANNELS, GRIDS};
use half::bf16;

use crate::env::Env;
use crate::table::Row;
use crate::{bit_equal, boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "multiscale_gather",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    if mode == Mode::Quick {
        return boxed(vec![
            mg::Case::new(1, 24, 1024, Branches::Three),
            mg::Case::new(4, 48, 4096, Branches::Seven),
        ]);
    }
    let mut cases = Vec::new();
    for grid in GRIDS {
        for channels in CHANNELS {
            for branches in Branches::ALL {
                for batch in [1, 4] {
                    cases.push(mg::Case::new(batch, grid, channels, branches));
                }
            }
        }
    }
    cases.push(mg::Case::new(4, 48, 4096, Branches::Three).with_prob(true));
    boxed(cases)
}

impl Case for mg::Case {
    fn label(&self) -> String {
        mg::Case::label(self)
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let (b, n_out) = (self.batch, self.n_out());
        let (x_len, z_len, t_len) = (self.x_len(), self.z_len(), self.tokens_len());
        let sets = env.n_sets(((x_len + t_len) * 2 + z_len * 4 + b * n_out * 4) as u64)?;
        let mut data = Vec::with_capacity(sets);
        for s in 0..sets {
            let z = mg::selector_logits(&mut rng(self.seed + s as u64), z_len);
            data.push(GatherSet {
                x: env.pool.filled(&env.stream, x_len)?,
                z: env.stream.clone_htod(&z)?,
                tokens: env.stream.alloc_zeros(t_len.max(1))?,
                positions: env.stream.alloc_zeros((b * n_out).max(1))?,
                count: env.stream.alloc_zeros(b)?,
            });
        }
        Ok(Box::new(Prepared {
            case: self,
            scales: self.branches.set(),
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: the map and logits, the outputs.
struct GatherSet {
    x: CudaSlice<bf16>,
    z: CudaSlice<f32>,
    tokens: CudaSlice<bf16>,
    positions: CudaSlice<i32>,
    count: CudaSlice<i32>,
}

/// The input sets of a case.
struct Prepared<'a> {
    case: &'a mg::Case,
    scales: ScaleSet,
    data: Vec<GatherSet>,
    ws: Workspace,
}

impl Prepared<'_> {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let (case, set) = (self.case, &mut self.data[set]);
        let (b, n_out) = (case.batch, case.n_out());
        let x = DevView::of(&set.x, Layout::contiguous(case.x_shape()))?;
        let z = DevView::of(&set.z, Layout::contiguous(case.z_shape()))?;
        let mut t = DevViewMut::of(&mut set.tokens, Layout::contiguous(case.tokens_shape()))?;
        let mut p = DevViewMut::of(&mut set.positions, Layout::contiguous([b, n_out]))?;
        let mut c = DevViewMut::of(&mut set.count, Layout::contiguous([b]))?;
        cuda::multiscale_gather(
            stream,
            &x,
            &z,
            case.window,
            &self.scales,
            case.scale_by_prob,
            &mut t,
            &mut p,
            &mut c,
            &mut self.ws,
        )?;
        Ok(())
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.data.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let (stream, case) = (&env.stream, self.case);
        let (b, n_out) = (case.batch, case.n_out());
        let set = &mut self.data[0];
        env.poison(&mut set.tokens, bf16::NAN)?;
        env.poison(&mut set.positions, i32::MIN)?;
        env.poison(&mut set.count, i32::MIN)?;
        self.launch(stream, 0)?;
        let set = &self.data[0];
        let got_t = stream.clone_dtoh(&set.tokens)?;
        let (got_p, got_c) = (
            stream.clone_dtoh(&set.positions)?,
            stream.clone_dtoh(&set.count)?,
        );
        let (x, z) = (stream.clone_dtoh(&set.x)?, stream.clone_dtoh(&set.z)?);
        let mut want_t = vec![bf16::ZERO; case.tokens_len()];
        let (mut want_p, mut want_c) = (vec![0i32; b * n_out], vec![0i32; b]);
        cpu::multiscale_gather(
            View::contiguous(&x, case.x_shape())?,
            View::contiguous(&z, case.z_shape())?,
            case.window,
            &self.scales,
            case.scale_by_prob,
            &mut ViewMut::contiguous(&mut want_t, case.tokens_shape())?,
            &mut ViewMut::contiguous(&mut want_p, [b, n_out])?,
            &mut ViewMut::contiguous(&mut want_c, [b])?,
        )?;
        let kept: i64 = want_c.iter().map(|&c| c as i64).sum();
        // Without the probability the tokens are maxima of the inputs: exact.
        // With it, expf against the host's exp can move a bf16 rounding.
        let (tokens_ok, how) = if case.scale_by_prob {
            let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let err = rel_err(&f(&got_t), &f(&want_t));
            (err <= 1e-3, format!("rel err {err:.0e}"))
        } else {
            (
                bit_equal(&got_t, &want_t, bf16::to_bits),
                "exact".to_string(),
            )
        };
        Ok(if got_p != want_p || got_c != want_c {
            Check::Fail("positions or counts differ from the CPU reference".into())
        } else {
            Check::when(
                tokens_ok,
                format!("{how}, {kept} tokens"),
                format!("tokens differ from the CPU reference: {how}"),
            )
        })
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        Ok(vec![Row::new(stats, self.case.floor_bytes(2))])
    }
}
