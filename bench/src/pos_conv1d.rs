//! Inputs, floor and baseline of the pos_conv1d benchmarks.
//!
//! A case is VISOR's conditional position embedding on the visual tokens
//! entering the decoder: `x [B, N, C]` with `N` = 1 to 10 LLaVA-OneVision
//! crops of 729 tokens and `C` the decoder's width (896 for Qwen2-0.5B, 3,584
//! for Qwen2-7B), every row full, values uniform in [-1, 1); `weight [C, 7]`,
//! `bias [C]`.

use foveal::pos_conv1d::KERNEL_SIZE;
use foveal::{Element, View};

use crate::{random_elems, rng};

/// Decoder widths: Qwen2-0.5B (LLaVA-OneVision-0.5B) and Qwen2-7B.
pub const WIDTHS: [usize; 2] = [896, 3584];

/// Visual tokens: 1, 4 and 10 crops of 27 x 27.
pub const TOKENS: [usize; 3] = [729, 2916, 7290];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub batch: usize,
    pub tokens: usize,
    pub channels: usize,
    pub seed: u64,
}

impl Case {
    pub fn new(batch: usize, tokens: usize, channels: usize) -> Self {
        Case {
            batch,
            tokens,
            channels,
            seed: 0x9c07,
        }
    }

    /// `B1 N729 C896`.
    pub fn label(&self) -> String {
        format!("B{} N{} C{}", self.batch, self.tokens, self.channels)
    }

    /// `[B, N, C]` (x and out).
    pub fn shape(&self) -> [usize; 3] {
        [self.batch, self.tokens, self.channels]
    }

    /// x read once, out written once, the weights and bias read once.
    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        let x = self.batch * self.tokens * self.channels;
        ((2 * x + (KERNEL_SIZE + 1) * self.channels) * elem_bytes) as u64
    }
}

/// Host tensors of a case (contiguous).
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub lens: Vec<usize>,
    pub x: Vec<T>,
    pub weight: Vec<T>,
    pub bias: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn x_view(&self) -> View<'_, T, 3> {
        View::contiguous(&self.x, self.case.shape()).expect("generated to fit")
    }

    pub fn weight_view(&self) -> View<'_, T, 2> {
        View::contiguous(&self.weight, [self.case.channels, KERNEL_SIZE]).expect("generated to fit")
    }

    pub fn bias_view(&self) -> View<'_, T, 1> {
        View::contiguous(&self.bias, [self.case.channels]).expect("generated to fit")
    }
}

pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let mut r = rng(case.seed);
    let c = case.channels;
    Input {
        case: *case,
        lens: vec![case.tokens; case.batch],
        x: random_elems(&mut r, case.batch * case.tokens * c, -1.0, 1.0),
        weight: random_elems(&mut r, c * KERNEL_SIZE, -0.5, 0.5),
        bias: random_elems(&mut r, c, -0.5, 0.5),
    }
}

/// The framework computation, as PyTorch runs `x + conv(x.transpose(1, 2))
/// .transpose(1, 2)`: x transposed to channels-first `[C, N]` per row, a
/// zero-padded depthwise convolution per channel, transposed back, the
/// residual added; f32, into `out [B, N, C]` contiguous. (Every row full: the
/// framework has no per-row lengths.)
pub fn baseline<T: Element>(input: &Input<T>, out: &mut [T]) {
    let Case {
        batch,
        tokens: n,
        channels: c,
        ..
    } = input.case;
    assert_eq!(out.len(), batch * n * c, "out is [B, N, C]");
    let mut chw = vec![0f32; c * (n + 6)];
    for b in 0..batch {
        let x = &input.x[b * n * c..(b + 1) * n * c];
        // transpose into [C, N + 6] with 3 zeros on each side
        chw.iter_mut().for_each(|v| *v = 0.0);
        for i in 0..n {
            for ch in 0..c {
                chw[ch * (n + 6) + 3 + i] = x[i * c + ch].to_f32();
            }
        }
        for ch in 0..c {
            let w: Vec<f32> = (0..KERNEL_SIZE)
                .map(|t| input.weight[ch * KERNEL_SIZE + t].to_f32())
                .collect();
            let bias = input.bias[ch].to_f32();
            let row = &chw[ch * (n + 6)..(ch + 1) * (n + 6)];
            for i in 0..n {
                let conv: f32 = bias + (0..KERNEL_SIZE).map(|t| w[t] * row[i + t]).sum::<f32>();
                out[(b * n + i) * c + ch] = T::from_f32(row[i + 3] + conv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::pos_conv1d::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        for case in [Case::new(2, 10, 24), Case::new(1, 3, 8)] {
            let input = generate::<bf16>(&case);
            let n = case.shape().iter().product();
            let mut want = vec![bf16::ZERO; n];
            cpu::pos_conv1d(
                input.x_view(),
                &input.lens,
                input.weight_view(),
                input.bias_view(),
                &mut ViewMut::contiguous(&mut want, case.shape()).unwrap(),
            )
            .unwrap();
            let mut got = vec![bf16::ZERO; n];
            baseline(&input, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!((g.to_f32() - w.to_f32()).abs() <= 1e-2 * w.to_f32().abs().max(0.05));
            }
        }
    }

    #[test]
    fn floor_is_x_twice() {
        assert_eq!(
            Case::new(1, 729, 896).floor_bytes(2),
            ((2 * 729 * 896 + 8 * 896) * 2) as u64
        );
    }
}
