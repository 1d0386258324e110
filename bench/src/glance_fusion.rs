//! Inputs, floor and baseline of the glance_fusion benchmarks.
//!
//! A case is Glance2Gaze's Glance Fusion on LLaVA-1.5-7B (seeds/000 A.3.1):
//! S = 4 ViT layers (CLIP-L's 7, 13, 19, 23), N = 576 visual tokens per image
//! (24 x 24 patches at 336px), dt = 4,096 (Vicuna-7B's width), an instruction
//! of M tokens (16 to 256), bf16. LLaVA-NeXT fuses each of up to 5
//! sub-images under the same instruction: 5 x 576 tokens of one row (the
//! fusion is per token, so sub-images side by side in one row are the same
//! computation as one row each). Every row full.

use foveal::glance_fusion::Lengths;
use foveal::{Element, View};

use crate::{random_elems, rng};

/// ViT layers fused (the paper's L = {7, 13, 19, 23}).
pub const LAYERS: usize = 4;
/// Visual tokens of one 336px image (24 x 24).
pub const TOKENS_PER_IMAGE: usize = 576;
/// The decoder width dt of a 7B model.
pub const DIM: usize = 4096;
/// Instruction lengths the benchmarks sweep.
pub const INSTR: [usize; 3] = [16, 64, 256];

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub batch: usize,
    /// Images (sub-images) per row, side by side: 1 (LLaVA-1.5) or 5 (LLaVA-NeXT).
    pub images: usize,
    pub instr: usize,
    pub layers: usize,
    pub dim: usize,
    pub seed: u64,
}

impl Case {
    /// LLaVA-1.5-7B shapes: 4 layers, dt 4,096, 576 tokens per image.
    pub fn new(batch: usize, images: usize, instr: usize) -> Self {
        Case {
            batch,
            images,
            instr,
            layers: LAYERS,
            dim: DIM,
            seed: 0x0091_a7ce,
        }
    }

    pub fn with_dim(mut self, dim: usize) -> Self {
        self.dim = dim;
        self
    }

    /// `B8 x5 S4 N2880 M64 dt4096`.
    pub fn label(&self) -> String {
        format!(
            "B{} x{} S{} N{} M{} dt{}",
            self.batch,
            self.images,
            self.layers,
            self.tokens(),
            self.instr,
            self.dim
        )
    }

    /// Visual tokens per row, `N`.
    pub fn tokens(&self) -> usize {
        self.images * TOKENS_PER_IMAGE
    }

    /// `[S, B, N, dt]`.
    pub fn vq_shape(&self) -> [usize; 4] {
        [self.layers, self.batch, self.tokens(), self.dim]
    }

    /// `[S, B, M, dt]`.
    pub fn e_shape(&self) -> [usize; 4] {
        [self.layers, self.batch, self.instr, self.dim]
    }

    /// `[B, N, dt]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.batch, self.tokens(), self.dim]
    }

    /// `[B, N, S]`.
    pub fn weights_shape(&self) -> [usize; 3] {
        [self.batch, self.tokens(), self.layers]
    }

    pub fn floor_bytes(&self, elem_bytes: usize, weights: bool) -> u64 {
        floor_bytes(self, elem_bytes, weights)
    }
}

/// Host tensors of a case (contiguous).
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub vq: Vec<T>,
    pub e: Vec<T>,
    pub lengths: Lengths,
}

impl<T: Element> Input<T> {
    pub fn vq_view(&self) -> View<'_, T, 4> {
        View::contiguous(&self.vq, self.case.vq_shape()).expect("generated to fit")
    }

    pub fn e_view(&self) -> View<'_, T, 4> {
        View::contiguous(&self.e, self.case.e_shape()).expect("generated to fit")
    }
}

/// The tensors of `case`: uniform in [-1, 1), every row full.
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let mut r = rng(case.seed);
    let n = |s: [usize; 4]| s.iter().product::<usize>();
    Input {
        case: *case,
        vq: random_elems(&mut r, n(case.vq_shape()), -1.0, 1.0),
        e: random_elems(&mut r, n(case.e_shape()), -1.0, 1.0),
        lengths: Lengths::full(case.batch, case.tokens(), case.instr),
    }
}

/// Bytes glance_fusion must move: `vq` and `e` read once, `out` written
/// once, and the weights `[B, N, S]` f32 when asked for. (The mean
/// instruction vectors, `S x B x dt` f32, stay in the L2 cache.)
pub fn floor_bytes(case: &Case, elem_bytes: usize, weights: bool) -> u64 {
    let n = |s: &[usize]| s.iter().product::<usize>();
    let elems = n(&case.vq_shape()) + n(&case.e_shape()) + n(&case.out_shape());
    let w = if weights {
        n(&case.weights_shape()) * 4
    } else {
        0
    };
    (elems * elem_bytes + w) as u64
}

/// The literal formula, unfused (the SPEC's definition, as a framework would
/// run it): per row the S x N x M dot products `vq[s, n] . e[s, m]` into
/// logits `[S, N, M]` f32, their mean over `m`, `1 / sqrt(dt)`, a softmax
/// over the layers (`[S, N]`), then `sum_s w[s, n] vq[s, n]`, f32
/// accumulation, into `out [B, N, dt]` (contiguous).
pub fn baseline<T: Element>(
    vq: View<'_, T, 4>,
    e: View<'_, T, 4>,
    lengths: &Lengths,
    out: &mut [T],
) {
    let [layers, batch, tokens, dim] = vq.shape();
    assert_eq!(out.len(), batch * tokens * dim, "out is [B, N, dt]");
    let scale = 1.0 / (dim as f32).sqrt();
    for b in 0..batch {
        let (n_len, m_len) = (lengths.n_len()[b], lengths.m_len()[b]);
        let mut logits = vec![0f32; layers * n_len * m_len];
        for s in 0..layers {
            for n in 0..n_len {
                let v = vq.row([s, b, n, 0]);
                for m in 0..m_len {
                    logits[(s * n_len + n) * m_len + m] = v
                        .iter()
                        .zip(e.row([s, b, m, 0]))
                        .map(|(x, y)| x.to_f32() * y.to_f32())
                        .sum();
                }
            }
        }
        let g: Vec<f32> = logits
            .chunks_exact(m_len.max(1))
            .map(|row| row.iter().sum::<f32>() / m_len as f32 * scale)
            .collect();
        for n in 0..tokens {
            let o = &mut out[(b * tokens + n) * dim..(b * tokens + n + 1) * dim];
            if n >= n_len {
                o.fill(T::from_f32(0.0));
                continue;
            }
            let max = (0..layers)
                .map(|s| g[s * n_len + n])
                .fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = (0..layers)
                .map(|s| (g[s * n_len + n] - max).exp())
                .collect();
            let sum: f32 = ex.iter().sum();
            for (c, o) in o.iter_mut().enumerate() {
                let acc: f32 = (0..layers)
                    .map(|s| ex[s] / sum * vq.at([s, b, n, c]).to_f32())
                    .sum();
                *o = T::from_f32(acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::glance_fusion::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        for case in [
            Case::new(1, 1, 5).with_dim(64),
            Case::new(2, 1, 16).with_dim(40),
        ] {
            let input = generate::<bf16>(&case);
            let mut want = vec![bf16::NAN; case.out_shape().iter().product()];
            cpu::glance_fusion(
                input.vq_view(),
                input.e_view(),
                &input.lengths,
                &mut ViewMut::contiguous(&mut want, case.out_shape()).unwrap(),
                None,
            )
            .unwrap();
            let mut got = vec![bf16::NAN; want.len()];
            baseline(input.vq_view(), input.e_view(), &input.lengths, &mut got);
            // other summation orders: within a bf16 rounding (plus f32 noise)
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let (g, w) = (g.to_f32(), w.to_f32());
                assert!(
                    (g - w).abs() <= 1e-2 * w.abs() + 1e-3,
                    "{case:?} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn floor_is_vq_e_and_out() {
        let case = Case::new(1, 1, 16);
        assert_eq!(case.tokens(), 576);
        let bytes = (4 * 576 + 4 * 16 + 576) * 4096 * 2;
        assert_eq!(case.floor_bytes(2, false), bytes as u64);
        assert_eq!(case.floor_bytes(2, true), (bytes + 576 * 4 * 4) as u64);
        assert_eq!(Case::new(8, 5, 256).tokens(), 2880);
    }
}
