//! Inputs and baseline of the window_mean benchmarks.
//!
//! A case is FocusLLaVA's vision-guided sampler input on a LLaVA-NeXT-style
//! model: a channels-last feature map `x [B, Hx, Wx, C]` (a 24 x 24 grid per
//! 336px CLIP-L crop, 48 x 48 for the 2 x 2 anyres grid; `C` = 1024 for
//! CLIP-L features, 4096 after the projector), cut into `w x w` windows
//! (default 4), random values in [-1, 1).

use foveal::window_mean::{num_windows, DEFAULT_WINDOW};
use foveal::{Element, Pool, View};

use crate::{random_elems, rng};

/// The grid sides the benchmarks sweep: one 336px crop (24 x 24) and the 2 x 2 anyres grid (48 x 48).
pub const GRIDS: [usize; 2] = [24, 48];

/// The channel counts the benchmarks sweep: CLIP-L features (1024) and the projected width (4096).
pub const CHANNELS: [usize; 2] = [1024, 4096];

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub window: usize,
    pub pool: Pool,
    pub seed: u64,
}

impl Case {
    /// A square `grid x grid` map of `channels`, the default window (4) and pool (mean).
    pub fn new(batch: usize, grid: usize, channels: usize) -> Self {
        Case {
            batch,
            height: grid,
            width: grid,
            channels,
            window: DEFAULT_WINDOW,
            pool: Pool::Mean,
            seed: 0x3a_11_d0,
        }
    }

    pub fn with_pool(mut self, pool: Pool) -> Self {
        self.pool = pool;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `B1 48x48 C4096 w4 mean`.
    pub fn label(&self) -> String {
        let pool = match self.pool {
            Pool::Mean => "mean",
            Pool::Max => "max",
        };
        format!(
            "B{} {}x{} C{} w{} {pool}",
            self.batch, self.height, self.width, self.channels, self.window
        )
    }

    /// Windows per row, `M`.
    pub fn windows(&self) -> usize {
        num_windows(self.height, self.width, self.window)
    }

    /// `[B, Hx, Wx, C]`.
    pub fn x_shape(&self) -> [usize; 4] {
        [self.batch, self.height, self.width, self.channels]
    }

    /// `[B, M, C]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.batch, self.windows(), self.channels]
    }

    pub fn x_len(&self) -> usize {
        self.x_shape().iter().product()
    }

    pub fn out_len(&self) -> usize {
        self.out_shape().iter().product()
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
}

impl<T: Element> Input<T> {
    pub fn x_view(&self) -> View<'_, T, 4> {
        View::contiguous(&self.x, self.case.x_shape()).expect("generated to fit")
    }
}

/// The feature map of `case`: uniform in [-1, 1).
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let x = random_elems(&mut rng(case.seed), case.x_len(), -1.0, 1.0);
    Input { case: *case, x }
}

/// Bytes window_mean must move: the map read once, `P [B, M, C]` written once.
pub fn floor_bytes(case: &Case, elem_bytes: usize) -> u64 {
    ((case.x_len() + case.out_len()) * elem_bytes) as u64
}

/// The naive framework computation: a contiguous copy of the map
/// (`x.contiguous()`), then a loop per window and per channel over the
/// window's cells (strided reads, one channel at a time), summed in f32 in
/// raster order (max for [`Pool::Max`], NaN skipped), into `out [B, M, C]`.
pub fn baseline<T: Element>(x: View<'_, T, 4>, window: usize, pool: Pool, out: &mut [T]) {
    let [b, h, w, c] = x.shape();
    let m = num_windows(h, w, window);
    assert_eq!(out.len(), b * m * c, "out is [B, M, C]");
    // x.contiguous()
    let mut xc = Vec::with_capacity(b * h * w * c);
    for bi in 0..b {
        for y in 0..h {
            for xx in 0..w {
                xc.extend_from_slice(x.row([bi, y, xx, 0]));
            }
        }
    }
    let wins_x = w.div_ceil(window);
    for bi in 0..b {
        for mi in 0..m {
            let (y0, x0) = ((mi / wins_x) * window, (mi % wins_x) * window);
            let (y1, x1) = ((y0 + window).min(h), (x0 + window).min(w));
            let cells = ((y1 - y0) * (x1 - x0)) as f32;
            for ch in 0..c {
                let mut acc = if pool == Pool::Max {
                    f32::NEG_INFINITY
                } else {
                    0.0
                };
                for y in y0..y1 {
                    for xx in x0..x1 {
                        let v = xc[((bi * h + y) * w + xx) * c + ch].to_f32();
                        acc = if pool == Pool::Max {
                            acc.max(v)
                        } else {
                            acc + v
                        };
                    }
                }
                out[(bi * m + mi) * c + ch] =
                    T::from_f32(if pool == Pool::Max { acc } else { acc / cells });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::window_mean::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        for (case, pool) in [
            (Case::new(2, 10, 24), Pool::Mean),
            (Case::new(1, 24, 64), Pool::Mean),
            (Case::new(1, 7, 8), Pool::Max),
        ] {
            let mut case = case.with_pool(pool);
            case.width += 3; // border windows on the right
            let input = generate::<bf16>(&case);
            let mut want = vec![bf16::NAN; case.out_len()];
            cpu::window_mean(
                input.x_view(),
                case.window,
                pool,
                &mut ViewMut::contiguous(&mut want, case.out_shape()).unwrap(),
            )
            .unwrap();
            let mut got = vec![bf16::NAN; case.out_len()];
            baseline(input.x_view(), case.window, pool, &mut got);
            let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{case:?}");
        }
    }

    #[test]
    fn floor_is_the_map_and_the_windows() {
        let case = Case::new(1, 24, 1024);
        assert_eq!(case.windows(), 36);
        assert_eq!(case.floor_bytes(2), ((24 * 24 + 36) * 1024 * 2) as u64);
    }
}
