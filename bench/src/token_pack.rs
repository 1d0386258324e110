//! Inputs, floor and baseline of the token_pack benchmarks.
//!
//! A case is VISOR-TR's token packing between the vision tower and the
//! projector: SigLIP-so400m features (`C` = 1,152) on LLaVA-OneVision's
//! 27 x 27 grid per crop, `B` crops, reduction ratio `rho` (2: the paper's
//! 2x, 4: the identity resize's ratio on even grids, 3: a non-power of two);
//! values uniform in [-1, 1).

use foveal::token_pack::resized_grid;
use foveal::{Element, View};

use crate::{random_elems, rng};

/// SigLIP-so400m's width.
pub const SIGLIP_WIDTH: usize = 1152;

/// Ratios the benchmarks sweep.
pub const RATIOS: [f64; 3] = [2.0, 3.0, 4.0];

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    /// Crops (rows of the batch).
    pub batch: usize,
    /// Grid side per crop.
    pub side: usize,
    pub channels: usize,
    pub rho: f64,
    pub seed: u64,
}

impl Case {
    /// `batch` 27 x 27 SigLIP crops at ratio `rho`.
    pub fn new(batch: usize, rho: f64) -> Self {
        Case {
            batch,
            side: 27,
            channels: SIGLIP_WIDTH,
            rho,
            seed: 0x70_ac,
        }
    }

    /// `B10 27x27 C1152 rho2`.
    pub fn label(&self) -> String {
        format!(
            "B{} {}x{} C{} rho{}",
            self.batch, self.side, self.side, self.channels, self.rho
        )
    }

    /// `[B, h, w, C]`.
    pub fn x_shape(&self) -> [usize; 4] {
        [self.batch, self.side, self.side, self.channels]
    }

    /// `[H', W']`.
    pub fn resized(&self) -> [usize; 2] {
        resized_grid(self.side, self.side, self.rho).expect("a valid ratio")
    }

    /// `[B, H'/2, W'/2, 4C]`.
    pub fn out_shape(&self) -> [usize; 4] {
        let [oh, ow] = self.resized();
        [self.batch, oh / 2, ow / 2, 4 * self.channels]
    }

    /// x read once, out written once.
    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        let x: usize = self.x_shape().iter().product();
        let out: usize = self.out_shape().iter().product();
        ((x + out) * elem_bytes) as u64
    }
}

/// Host tensors of a case (contiguous).
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub x: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn x_view(&self) -> View<'_, T, 4> {
        View::contiguous(&self.x, self.case.x_shape()).expect("generated to fit")
    }
}

pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let n = case.x_shape().iter().product();
    Input {
        case: *case,
        x: random_elems(&mut rng(case.seed), n, -1.0, 1.0),
    }
}

/// The framework computation: `interpolate` into a materialised resized map
/// `[B, H', W', C]` (f32, each source pixel's index and weights recomputed
/// per channel, as a generic kernel does), then the space-to-depth permute
/// copied into `out [B, H'/2, W'/2, 4C]` contiguous.
pub fn baseline<T: Element>(input: &Input<T>, out: &mut [T]) {
    let case = &input.case;
    let [b, h, w, c] = case.x_shape();
    let [oh, ow] = case.resized();
    assert_eq!(out.len(), b * oh * ow * c, "out is [B, H'/2, W'/2, 4C]");
    let src = |dst: usize, inp: usize, outp: usize| {
        let scale = inp as f32 / outp as f32;
        let s = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (s as usize).min(inp - 1);
        (i0, (i0 + 1).min(inp - 1), s - i0 as f32)
    };
    let mut y = vec![0f32; b * oh * ow * c];
    for bi in 0..b {
        for yo in 0..oh {
            for xo in 0..ow {
                for ch in 0..c {
                    let (y0, y1, ly) = src(yo, h, oh);
                    let (x0, x1, lx) = src(xo, w, ow);
                    let at =
                        |yy: usize, xx: usize| input.x[((bi * h + yy) * w + xx) * c + ch].to_f32();
                    y[((bi * oh + yo) * ow + xo) * c + ch] = (1.0 - ly)
                        * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1))
                        + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1));
                }
            }
        }
    }
    let (ph, pw) = (oh / 2, ow / 2);
    for bi in 0..b {
        for i in 0..ph {
            for j in 0..pw {
                for q in 0..4 {
                    let (yo, xo) = (2 * i + q / 2, 2 * j + q % 2);
                    let from = ((bi * oh + yo) * ow + xo) * c;
                    let to = ((bi * ph + i) * pw + j) * 4 * c + q * c;
                    for ch in 0..c {
                        out[to + ch] = T::from_f32(y[from + ch]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::token_pack::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        for rho in RATIOS {
            let mut case = Case::new(2, rho);
            case.channels = 8;
            let input = generate::<bf16>(&case);
            let n = case.out_shape().iter().product();
            let mut want = vec![bf16::ZERO; n];
            cpu::token_pack(
                input.x_view(),
                rho,
                &mut ViewMut::contiguous(&mut want, case.out_shape()).unwrap(),
            )
            .unwrap();
            let mut got = vec![bf16::ZERO; n];
            baseline(&input, &mut got);
            let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "rho {rho}");
        }
    }

    #[test]
    fn sizes_follow_the_ratio() {
        assert_eq!(Case::new(1, 2.0).out_shape(), [1, 19, 19, 4 * 1152]);
        assert_eq!(Case::new(1, 4.0).out_shape(), [1, 14, 14, 4 * 1152]);
    }
}
