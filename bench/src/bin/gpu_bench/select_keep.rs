//! gpu_bench section `select_keep`: the keep rule over predictor logits of
//! ragged rows (`foveal_bench::select_keep`: 1K, 4K and 16K visual tokens,
//! batch 1, 4 and 8, threshold 0.5 with and without a 25% cap). Checked once
//! against the CPU reference: the kept sets exactly equal.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DeviceKeepSet, DeviceRowLayout};
use foveal::select_keep::{cpu, cuda};
use foveal::{KeepRule, KeepSet, Layout};
use foveal_bench::select_keep as sk;
use foveal_bench::{rng, VISUAL_TOKENS};

use crate::env::Env;
use crate::table::Row;
use crate::{boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "select_keep",
    cases,
};

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    let capped = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    if mode == Mode::Quick {
        return boxed(vec![
            sk::Case::new(1, 1024),
            sk::Case::new(8, 16384).with_rule(capped),
        ]);
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4, 8] {
            cases.push(sk::Case::new(batch, nv));
            cases.push(sk::Case::new(batch, nv).with_rule(capped));
        }
    }
    boxed(cases)
}

impl Case for sk::Case {
    fn label(&self) -> String {
        sk::Case::label(self)
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let input = sk::generate(self);
        let (b, nv_max) = (input.rows.batch(), input.rows.nv_max());
        let sets = env.n_sets((b * nv_max * 8) as u64)?;
        // Set 0 is the generated input (the check's); the others other seeds.
        let mut logits = vec![env.stream.clone_htod(&input.logits)?];
        for s in 1..sets {
            let host = sk::predictor_logits(&mut rng(self.seed + s as u64), &input.rows);
            logits.push(env.stream.clone_htod(&host)?);
        }
        let rows = DeviceRowLayout::new(&env.stream, &input.rows)?;
        let keep = (0..sets)
            .map(|_| DeviceKeepSet::new(&env.stream, &rows))
            .collect::<Result<_, _>>()?;
        Ok(Box::new(Prepared {
            layout: Layout::contiguous([b, nv_max]),
            input,
            logits,
            rows,
            keep,
        }))
    }
}

/// The input sets of a case.
struct Prepared {
    input: sk::Input,
    layout: Layout<2>,
    logits: Vec<CudaSlice<f32>>,
    rows: DeviceRowLayout,
    keep: Vec<DeviceKeepSet>,
}

impl Prepared {
    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let logits = DevView::of(&self.logits[set], self.layout)?;
        cuda::select_keep(
            stream,
            &logits,
            &self.rows,
            &self.input.rule,
            &mut self.keep[set],
        )?;
        Ok(())
    }
}

impl Bench for Prepared {
    fn sets(&self) -> usize {
        self.logits.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        self.launch(&env.stream, 0)?;
        let got = self.keep[0].to_host(&env.stream)?;
        let input = &self.input;
        let mut want = KeepSet::new(&input.rows);
        cpu::select_keep(input.logits_view(), &input.rows, &input.rule, &mut want)?;
        let kept: usize = (0..input.rows.batch()).map(|r| want.kept(r).len()).sum();
        Ok(Check::when(
            got == want,
            format!("exact, {kept} kept"),
            "differs from the CPU reference",
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        Ok(vec![Row::new(stats, self.input.floor_bytes())])
    }
}
