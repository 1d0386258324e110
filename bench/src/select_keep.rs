//! Inputs and baseline of the select_keep benchmarks.
//!
//! A case is the Visual Importance Predictor's output for a ragged batch:
//! logits `[B, Nv_max]` that look like an importance map (a few salient
//! blobs on the image grid over a low background, plus noise), so that a
//! realistic share of the tokens (about 10 to 30%) passes the default
//! threshold. Slots past a row's visual count hold NaN: no op may read them.

use foveal::{KeepRule, RowLayout, View};
use rand::rngs::StdRng;
use rand::Rng;

use crate::rows::{total_visual, vlm_rows, RowsConfig};
use crate::{normal, rng};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub rows: RowsConfig,
    pub rule: KeepRule,
    pub seed: u64,
}

impl Case {
    /// The default rule (threshold 0.5, no ratio cap, min_keep 1).
    pub fn new(batch: usize, nv: usize) -> Self {
        Case {
            rows: RowsConfig::new(batch, nv),
            rule: KeepRule::default(),
            seed: 0x5e_1e_c7,
        }
    }

    pub fn with_rule(mut self, rule: KeepRule) -> Self {
        self.rule = rule;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `B8 Nv4096 t0.5` or `B8 Nv4096 t0.5 r0.25`.
    pub fn label(&self) -> String {
        let mut s = format!(
            "B{} Nv{} t{}",
            self.rows.batch, self.rows.nv, self.rule.threshold
        );
        if let Some(r) = self.rule.max_ratio {
            s += &format!(" r{r}");
        }
        s
    }
}

/// Host inputs of a case.
#[derive(Debug, Clone)]
pub struct Input {
    pub rows: RowLayout,
    pub rule: KeepRule,
    /// `[B, Nv_max]`, contiguous; NaN past each row's count.
    pub logits: Vec<f32>,
}

impl Input {
    pub fn logits_view(&self) -> View<'_, f32, 2> {
        View::contiguous(&self.logits, [self.rows.batch(), self.rows.nv_max()])
            .expect("generated to fit")
    }

    pub fn floor_bytes(&self) -> u64 {
        floor_bytes(&self.rows)
    }
}

/// The rows and predictor logits of `case`.
pub fn generate(case: &Case) -> Input {
    let mut r = rng(case.seed);
    let rows = vlm_rows(&mut r, &case.rows);
    let logits = predictor_logits(&mut r, &rows);
    Input {
        rows,
        rule: case.rule,
        logits,
    }
}

/// Importance-map-like logits `[B, Nv_max]` for `rows`: per row, the visual
/// tokens on a square grid, 1 to 3 Gaussian blobs (the objects the question
/// is about) lifting a background of -3 by up to +7, plus N(0, 1) noise.
pub fn predictor_logits(rng: &mut StdRng, rows: &RowLayout) -> Vec<f32> {
    let nv_max = rows.nv_max();
    let mut logits = vec![f32::NAN; rows.batch() * nv_max];
    for b in 0..rows.batch() {
        let nv = rows.nv(b);
        let w = (nv as f64).sqrt().ceil().max(1.0) as usize;
        let blobs: Vec<(f64, f64, f64)> = (0..rng.random_range(1..=3))
            .map(|_| {
                let r = w as f64 * rng.random_range(0.08..0.25);
                (
                    rng.random_range(0.0..w as f64),
                    rng.random_range(0.0..w as f64),
                    r,
                )
            })
            .collect();
        for (i, x) in logits[b * nv_max..][..nv].iter_mut().enumerate() {
            let (gy, gx) = ((i / w) as f64, (i % w) as f64);
            let lift = blobs
                .iter()
                .map(|&(cy, cx, r)| {
                    (-((gy - cy).powi(2) + (gx - cx).powi(2)) / (2.0 * r * r)).exp()
                })
                .fold(0.0, f64::max);
            *x = (-3.0 + 7.0 * lift + normal(rng)) as f32;
        }
    }
    logits
}

/// Bytes select_keep must move: each row's valid logits and nv read, the
/// padded index array `[B, Nv_max]` i32 and the counts `[B]` written.
pub fn floor_bytes(rows: &RowLayout) -> u64 {
    let b = rows.batch();
    (total_visual(rows) * 4 + b * 4 + b * rows.nv_max() * 4 + b * 4) as u64
}

/// The unfused framework computation (GlimpsePrune's PyTorch code): per row
/// `p = sigmoid(logits)` materialised, `count(p > t)`, a full stable sort of
/// the row by `p` descending (argsort), the first `n` indices, and a sort of
/// those ascending. Returns the padded indices `[B, Nv_max]` (-1 past the
/// count) and the counts, like a [`foveal::KeepSet`].
pub fn baseline(
    logits: View<'_, f32, 2>,
    rows: &RowLayout,
    rule: &KeepRule,
) -> (Vec<i32>, Vec<i32>) {
    let nv_max = rows.nv_max();
    let mut idx = vec![-1i32; rows.batch() * nv_max];
    let mut count = vec![0i32; rows.batch()];
    for b in 0..rows.batch() {
        let nv = rows.nv(b);
        let p: Vec<f32> = (0..nv)
            .map(|i| {
                let x = logits.at([b, i]);
                if x.is_nan() {
                    0.0
                } else {
                    1.0 / (1.0 + (-x).exp())
                }
            })
            .collect();
        let above = p.iter().filter(|&&v| v > rule.threshold).count();
        let mut n = above;
        if let Some(r) = rule.max_ratio {
            n = n.min((r * nv as f64).floor() as usize);
        }
        n = n.max(rule.min_keep.min(nv));
        let mut order: Vec<usize> = (0..nv).collect();
        order.sort_by(|&i, &j| p[j].total_cmp(&p[i])); // stable: ties keep the lower index first
        let mut kept = order[..n].to_vec();
        kept.sort_unstable();
        for (slot, &i) in idx[b * nv_max..].iter_mut().zip(&kept) {
            *slot = i as i32;
        }
        count[b] = n as i32;
    }
    (idx, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::select_keep::cpu;
    use foveal::KeepSet;

    #[test]
    fn baseline_matches_foveal() {
        let rules = [
            KeepRule::default(),
            KeepRule {
                threshold: 0.5,
                max_ratio: Some(0.1),
                min_keep: 1,
            },
            KeepRule {
                threshold: 0.99,
                max_ratio: None,
                min_keep: 64,
            },
        ];
        for (seed, rule) in rules.into_iter().enumerate() {
            let input = generate(&Case::new(4, 700).with_rule(rule).with_seed(seed as u64));
            let mut keep = KeepSet::new(&input.rows);
            cpu::select_keep(input.logits_view(), &input.rows, &rule, &mut keep).unwrap();
            let (idx, count) = baseline(input.logits_view(), &input.rows, &rule);
            assert_eq!(keep.packed(), (&idx[..], &count[..]), "rule {rule:?}");
        }
    }

    #[test]
    fn a_realistic_share_passes_the_threshold() {
        let input = generate(&Case::new(4, 4096));
        let (_, count) = baseline(input.logits_view(), &input.rows, &input.rule);
        for (b, &n) in count.iter().enumerate() {
            let share = n as f64 / input.rows.nv(b) as f64;
            assert!((0.02..0.6).contains(&share), "row {b} keeps {share}");
        }
    }
}
