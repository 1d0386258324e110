//! gpu_bench section `text_guided_select`: FocusLLaVA's text-guided sampler
//! (`foveal_bench::text_guided_select`: Llama-3-8B heads, 64 text tokens,
//! 576 and 2,880 visual tokens, batch 1 and 4, both key orders; and 256 text
//! tokens), on the generator's structured inputs (attention concentrates as
//! in a real model). Checked once against the CPU reference (outputs
//! poisoned first): S within 1e-4 relative error, the kept set exactly the
//! rule (`select_from_scores`) on the GPU's own S, and the same set again
//! without the scores output (the timed form).
//!
//! Then against the same computation in unfused ops ([`unfused`]): candle's,
//! timed here, and PyTorch's (`--list-cases`), at Qwen2.5-VL-7B heads.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut, Workspace};
use foveal::text_guided_select::cuda::DeviceLengths;
use foveal::text_guided_select::{cpu, cuda, select_from_scores};
use foveal::{Layout, View, ViewMut};
use foveal_bench::text_guided_select as tg;
use foveal_bench::{rng, KvLayout};
use half::bf16;

use crate::env::Env;
use crate::table::Row;
use crate::{boxed, rel_err, Bench, Case, Check, Mode, Res, Section};

mod unfused;

pub const SECTION: Section = Section {
    name: "text_guided_select",
    cases,
};

/// The op's cases, then its comparisons with the unfused ops.
fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    let fused = if mode == Mode::Quick {
        vec![
            tg::Case::new(1, 2880, KvLayout::Bshd),
            tg::Case::new(4, 2880, KvLayout::Bhsd),
        ]
    } else {
        let mut cases = Vec::new();
        for nv in tg::VISUAL {
            for batch in [1, 4] {
                for layout in KvLayout::ALL {
                    cases.push(tg::Case::new(batch, nv, layout));
                }
            }
        }
        cases.push(tg::Case::new(1, 2880, KvLayout::Bshd).with_text(256));
        cases
    };
    let mut cases = boxed(fused);
    cases.extend(unfused::cases(mode));
    cases
}

impl Case for tg::Case {
    fn label(&self) -> String {
        tg::Case::label(self)
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let (b, n) = (self.batch, self.visual);
        let (q_len, k_len) = (self.q_layout().span(), self.k_layout().span());
        let sets = env.n_sets(((q_len + k_len) * 2 + b * n * 4) as u64)?;
        // The generator's structured inputs, one seed per set.
        let mut data = Vec::with_capacity(sets);
        for s in 0..sets {
            let (q, k) = tg::attention_inputs::<bf16>(&mut rng(self.seed + s as u64), self);
            data.push(SelectSet {
                q: env.stream.clone_htod(&q)?,
                k: env.stream.clone_htod(&k)?,
                keep: env.stream.alloc_zeros((b * n).max(1))?,
                count: env.stream.alloc_zeros(b)?,
            });
        }
        Ok(Box::new(Prepared {
            case: self,
            lengths: DeviceLengths::new(&env.stream, &self.lengths())?,
            data,
            ws: Workspace::new(),
        }))
    }
}

/// One input set: q, k and the outputs.
struct SelectSet {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    keep: CudaSlice<i32>,
    count: CudaSlice<i32>,
}

/// The input sets of a case.
struct Prepared<'a> {
    case: &'a tg::Case,
    lengths: DeviceLengths,
    data: Vec<SelectSet>,
    ws: Workspace,
}

impl Prepared<'_> {
    fn launch(
        &mut self,
        stream: &Arc<CudaStream>,
        set: usize,
        scores: Option<&mut CudaSlice<f32>>,
    ) -> Res<()> {
        let (case, set) = (self.case, &mut self.data[set]);
        let (b, n) = (case.batch, case.visual);
        let q = DevView::of(&set.q, case.q_layout())?;
        let k = DevView::of(&set.k, case.k_layout())?;
        let mut keep = DevViewMut::of(&mut set.keep, Layout::contiguous([b, n]))?;
        let mut count = DevViewMut::of(&mut set.count, Layout::contiguous([b]))?;
        let mut scores = scores
            .map(|s| DevViewMut::of(s, Layout::contiguous([b, n])))
            .transpose()?;
        cuda::text_guided_select(
            stream,
            &q,
            &k,
            &self.lengths,
            case.gamma,
            &mut keep,
            &mut count,
            scores.as_mut(),
            &mut self.ws,
        )?;
        Ok(())
    }

    /// Set 0's kept indices and counts, written after poisoning.
    fn run_poisoned(
        &mut self,
        env: &Env,
        scores: Option<&mut CudaSlice<f32>>,
    ) -> Res<(Vec<i32>, Vec<i32>)> {
        env.poison(&mut self.data[0].keep, i32::MIN)?;
        env.poison(&mut self.data[0].count, i32::MIN)?;
        self.launch(&env.stream, 0, scores)?;
        Ok((
            env.stream.clone_dtoh(&self.data[0].keep)?,
            env.stream.clone_dtoh(&self.data[0].count)?,
        ))
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.data.len()
    }

    /// With the scores output: S against the CPU reference's, the kept set
    /// exactly the rule on the GPU's own S; then without it (the timed
    /// form): the same kept set.
    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let case = self.case;
        let (b, n) = (case.batch, case.visual);
        let mut scores = env.stream.clone_htod(&vec![f32::NAN; b * n])?;
        let (got_k, got_c) = self.run_poisoned(env, Some(&mut scores))?;
        let got_s = env.stream.clone_dtoh(&scores)?;
        let (own_k, own_c) = self.run_poisoned(env, None)?;

        let (q, k) = (
            env.stream.clone_dtoh(&self.data[0].q)?,
            env.stream.clone_dtoh(&self.data[0].k)?,
        );
        let (mut want_k, mut want_c, mut want_s) =
            (vec![0i32; b * n], vec![0i32; b], vec![0f32; b * n]);
        cpu::text_guided_select(
            View::new(&q, case.q_layout())?,
            View::new(&k, case.k_layout())?,
            &case.lengths(),
            case.gamma,
            &mut ViewMut::contiguous(&mut want_k, [b, n])?,
            &mut ViewMut::contiguous(&mut want_c, [b])?,
            Some(&mut ViewMut::contiguous(&mut want_s, [b, n])?),
        )?;
        let err = rel_err(&got_s, &want_s);
        let (mut rule_k, mut rule_c) = (vec![-1i32; b * n], vec![0i32; b]);
        for row in 0..b {
            let kept = select_from_scores(&got_s[row * n..][..n], case.gamma);
            rule_c[row] = kept.len() as i32;
            for (slot, &i) in rule_k[row * n..].iter_mut().zip(&kept) {
                *slot = i as i32;
            }
        }
        let kept: i64 = got_c.iter().map(|&c| c as i64).sum();
        let share = 100.0 * kept as f64 / (b * n) as f64;
        Ok(if err > 1e-4 {
            Check::Fail(format!("S rel err {err:.1e}"))
        } else if got_k != rule_k || got_c != rule_c {
            Check::Fail("the kept set is not the rule on the GPU's S".into())
        } else {
            Check::when(
                own_k == got_k && own_c == got_c,
                format!("S rel err {err:.0e}, kept {share:.0}%"),
                "without the scores output the kept set differs",
            )
        })
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set, None))?;
        Ok(vec![Row::new(stats, self.case.floor_bytes(2))])
    }
}
