//! Inputs and baseline of the multiscale_gather benchmarks.
//!
//! A case is FocusLLaVA's vision-guided sampler after its selector: the
//! feature map `x [B, Hx, Wx, C]` of [`crate::window_mean`] (LLaVA-NeXT-style
//! grids, CLIP-L or projected channels, random values in [-1, 1)), the
//! selector logits `z [B, M, S]` f32 (`N(0, 2^2)`: every scale chosen about
//! equally often) and the 3- or 7-branch scale set.

use foveal::multiscale_gather::{max_tokens, ScaleSet};
use foveal::window_mean::{num_windows, DEFAULT_WINDOW};
use foveal::{Element, View};

use crate::{normal, random_elems, rng};

/// The scale set of a case (a `Copy` name for a [`ScaleSet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branches {
    /// (4, 4), (2, 2), (1, 1): the paper's default.
    Three,
    /// The default plus (4, 2), (2, 4), (2, 1), (1, 2).
    Seven,
}

impl Branches {
    pub const ALL: [Branches; 2] = [Branches::Three, Branches::Seven];

    pub fn set(self) -> ScaleSet {
        match self {
            Branches::Three => ScaleSet::three(),
            Branches::Seven => ScaleSet::seven(),
        }
    }

    pub fn num_scales(self) -> usize {
        match self {
            Branches::Three => 3,
            Branches::Seven => 7,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Branches::Three => "S3",
            Branches::Seven => "S7",
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub window: usize,
    pub branches: Branches,
    /// Eq. 2's training form (tokens times the chosen scale's probability).
    pub scale_by_prob: bool,
    pub seed: u64,
}

impl Case {
    /// A square `grid x grid` map of `channels`, the default window (4), inference form (no probability scaling).
    pub fn new(batch: usize, grid: usize, channels: usize, branches: Branches) -> Self {
        Case {
            batch,
            height: grid,
            width: grid,
            channels,
            window: DEFAULT_WINDOW,
            branches,
            scale_by_prob: false,
            seed: 0x5c_a1_e5,
        }
    }

    pub fn with_prob(mut self, scale_by_prob: bool) -> Self {
        self.scale_by_prob = scale_by_prob;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `B1 48x48 C4096 w4 S7` (`+prob` with probability scaling).
    pub fn label(&self) -> String {
        let prob = if self.scale_by_prob { " +prob" } else { "" };
        format!(
            "B{} {}x{} C{} w{} {}{prob}",
            self.batch,
            self.height,
            self.width,
            self.channels,
            self.window,
            self.branches.name()
        )
    }

    /// Windows per row, `M`.
    pub fn windows(&self) -> usize {
        num_windows(self.height, self.width, self.window)
    }

    /// `N_out_max`: the capacity of the outputs.
    pub fn n_out(&self) -> usize {
        max_tokens(self.height, self.width, self.window, &self.branches.set())
    }

    /// `[B, Hx, Wx, C]`.
    pub fn x_shape(&self) -> [usize; 4] {
        [self.batch, self.height, self.width, self.channels]
    }

    /// `[B, M, S]`.
    pub fn z_shape(&self) -> [usize; 3] {
        [self.batch, self.windows(), self.branches.num_scales()]
    }

    /// `[B, N_out_max, C]`.
    pub fn tokens_shape(&self) -> [usize; 3] {
        [self.batch, self.n_out(), self.channels]
    }

    pub fn x_len(&self) -> usize {
        self.x_shape().iter().product()
    }

    pub fn z_len(&self) -> usize {
        self.z_shape().iter().product()
    }

    pub fn tokens_len(&self) -> usize {
        self.tokens_shape().iter().product()
    }

    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        floor_bytes(self, elem_bytes)
    }
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    /// `[B, Hx, Wx, C]`, contiguous.
    pub x: Vec<T>,
    /// `[B, M, S]`, contiguous.
    pub z: Vec<f32>,
}

impl<T: Element> Input<T> {
    pub fn x_view(&self) -> View<'_, T, 4> {
        View::contiguous(&self.x, self.case.x_shape()).expect("generated to fit")
    }

    pub fn z_view(&self) -> View<'_, f32, 3> {
        View::contiguous(&self.z, self.case.z_shape()).expect("generated to fit")
    }
}

/// The map (uniform in [-1, 1)) and selector logits of `case`.
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let mut r = rng(case.seed);
    let x = random_elems(&mut r, case.x_len(), -1.0, 1.0);
    let z = selector_logits(&mut r, case.z_len());
    Input { case: *case, x, z }
}

/// `n` selector logits, `N(0, 2^2)`.
pub fn selector_logits(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (2.0 * normal(rng)) as f32).collect()
}

/// Bytes multiscale_gather must move: the map read once (every pixel lies in
/// a pooled cell, whatever the scale), the logits read once, and the whole
/// outputs written once (the contract zeroes the token slots past each row's
/// count and sets their positions to -1): tokens `[B, N_out_max, C]`,
/// positions `[B, N_out_max]` i32, counts `[B]` i32.
pub fn floor_bytes(case: &Case, elem_bytes: usize) -> u64 {
    let b = case.batch;
    ((case.x_len() + case.tokens_len()) * elem_bytes
        + case.z_len() * 4
        + b * case.n_out() * 4
        + b * 4) as u64
}

/// The framework computation: max-pool every window at every scale (one
/// materialised pooled tensor per scale, as a loop of `max_pool2d` calls
/// over the windows would give), the softmax of the logits `[B, M, S]`, the
/// argmax per window, then a copy of each window's tokens from the chosen
/// scale's tensor to its offset (the exclusive prefix sum of the chosen
/// token counts), and the padding. Returns `(tokens, positions, count)`, as
/// foveal's multiscale_gather writes them.
pub fn baseline<T: Element>(
    x: View<'_, T, 4>,
    z: View<'_, f32, 3>,
    window: usize,
    scales: &ScaleSet,
    scale_by_prob: bool,
) -> (Vec<T>, Vec<i32>, Vec<i32>) {
    let [b, h, w, c] = x.shape();
    let [_, m, s] = z.shape();
    let n_out = max_tokens(h, w, window, scales);
    let wins_x = w.div_ceil(window);
    let extent = |mi: usize| {
        let (y0, x0) = ((mi / wins_x) * window, (mi % wins_x) * window);
        (y0, x0, (y0 + window).min(h), (x0 + window).min(w))
    };
    let tokens_of = |mi: usize, (kh, kw): (usize, usize)| {
        let (y0, x0, y1, x1) = extent(mi);
        (y1 - y0).div_ceil(kh) * (x1 - x0).div_ceil(kw)
    };

    // Every scale pooled: per scale, [B, sum_m tokens, C] with each window's first token.
    let mut pooled: Vec<(Vec<T>, Vec<usize>)> = Vec::with_capacity(s);
    for &(kh, kw) in scales.scales() {
        let mut first = Vec::with_capacity(b * m);
        let mut data = Vec::new();
        let mut acc = vec![0f32; c];
        for bi in 0..b {
            for mi in 0..m {
                first.push(data.len() / c.max(1));
                let (wy0, wx0, wy1, wx1) = extent(mi);
                let cells_x = (wx1 - wx0).div_ceil(kw);
                for t in 0..tokens_of(mi, (kh, kw)) {
                    let (y0, x0) = (wy0 + (t / cells_x) * kh, wx0 + (t % cells_x) * kw);
                    acc.fill(f32::NEG_INFINITY);
                    for y in y0..(y0 + kh).min(wy1) {
                        for xx in x0..(x0 + kw).min(wx1) {
                            for (a, v) in acc.iter_mut().zip(x.row([bi, y, xx, 0])) {
                                *a = a.max(v.to_f32());
                            }
                        }
                    }
                    data.extend(acc.iter().map(|&a| T::from_f32(a)));
                }
            }
        }
        pooled.push((data, first));
    }

    // softmax(z) and argmax (ties to the first scale, NaN lowest).
    let mut prob = vec![0f32; b * m * s];
    let mut choice = vec![0usize; b * m];
    for bi in 0..b {
        for mi in 0..m {
            let zr = z.row([bi, mi, 0]);
            let mut best = 0;
            for si in 1..s {
                if !zr[si].is_nan() && (zr[best].is_nan() || zr[si] > zr[best]) {
                    best = si;
                }
            }
            choice[bi * m + mi] = best;
            let sum = zr.iter().fold(0f32, |acc, &v| acc + (v - zr[best]).exp());
            for (p, &v) in prob[(bi * m + mi) * s..][..s].iter_mut().zip(zr) {
                *p = (v - zr[best]).exp() / sum;
            }
        }
    }

    // Gather the chosen scale's tokens at the prefix-sum offsets, then pad.
    let mut tokens = vec![T::from_f32(0.0); b * n_out * c];
    let mut positions = vec![-1i32; b * n_out];
    let mut count = vec![0i32; b];
    for bi in 0..b {
        let mut slot = 0;
        for mi in 0..m {
            let ci = choice[bi * m + mi];
            let (kh, kw) = scales.scales()[ci];
            let (data, first) = &pooled[ci];
            let (wy0, wx0, _, wx1) = extent(mi);
            let cells_x = (wx1 - wx0).div_ceil(kw);
            let p = prob[(bi * m + mi) * s + ci];
            for t in 0..tokens_of(mi, (kh, kw)) {
                let src = &data[(first[bi * m + mi] + t) * c..][..c];
                let dst = &mut tokens[(bi * n_out + slot) * c..][..c];
                if scale_by_prob {
                    for (o, &v) in dst.iter_mut().zip(src) {
                        *o = T::from_f32(v.to_f32() * p);
                    }
                } else {
                    dst.copy_from_slice(src);
                }
                let (y0, x0) = (wy0 + (t / cells_x) * kh, wx0 + (t % cells_x) * kw);
                positions[bi * n_out + slot] = (y0 * w + x0) as i32;
                slot += 1;
            }
        }
        count[bi] = slot as i32;
    }
    (tokens, positions, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::multiscale_gather::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        let cases = [
            Case::new(2, 8, 16, Branches::Three),
            Case::new(1, 12, 8, Branches::Seven).with_prob(true),
            Case {
                width: 11,
                height: 6,
                ..Case::new(2, 0, 8, Branches::Seven)
            }, // border windows
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let case = case.with_seed(i as u64);
            let input = generate::<bf16>(&case);
            let n_out = case.n_out();
            let mut tokens = vec![bf16::NAN; case.tokens_len()];
            let mut positions = vec![i32::MIN; case.batch * n_out];
            let mut count = vec![i32::MIN; case.batch];
            cpu::multiscale_gather(
                input.x_view(),
                input.z_view(),
                case.window,
                &case.branches.set(),
                case.scale_by_prob,
                &mut ViewMut::contiguous(&mut tokens, case.tokens_shape()).unwrap(),
                &mut ViewMut::contiguous(&mut positions, [case.batch, n_out]).unwrap(),
                &mut ViewMut::contiguous(&mut count, [case.batch]).unwrap(),
            )
            .unwrap();
            let (bt, bp, bc) = baseline(
                input.x_view(),
                input.z_view(),
                case.window,
                &case.branches.set(),
                case.scale_by_prob,
            );
            let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bc, count, "{case:?}");
            assert_eq!(bp, positions, "{case:?}");
            assert_eq!(bits(&bt), bits(&tokens), "{case:?}");
        }
    }

    #[test]
    fn every_scale_is_chosen() {
        let case = Case::new(1, 48, 1, Branches::Seven);
        let input = generate::<bf16>(&case);
        let (_, _, count) = baseline(
            input.x_view(),
            input.z_view(),
            case.window,
            &case.branches.set(),
            false,
        );
        // 144 windows at 1 to 16 tokens each: the count lies well inside.
        assert!(
            (144 * 3..144 * 12).contains(&(count[0] as usize)),
            "{count:?}"
        );
        assert_eq!(case.n_out(), 48 * 48);
    }
}
