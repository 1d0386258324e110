//! Inputs and baseline of the region_descriptors benchmarks.
//!
//! A case is Gaze Attention on Qwen2.5-VL-7B ([`QWEN25_VL_7B`]: 4 KV heads,
//! head dim 128, bf16): each row is a prompt of 32 text tokens, then `visual /
//! 1024` frames of a 32 x 32 token grid (one image at 1,024 tokens, a
//! 16-frame video at 16,384), each frame followed by its 4 context tokens,
//! then a 32-token question ([`rows`]). Regions are 6 x 6 tiles of each frame
//! (36 per frame, the border ones 6 x 2, 2 x 6 and 2 x 2), so 576 regions at
//! 16K tokens. Every row is alike.

use foveal::{Element, GazeLayout, GazeRow, Layout, RegionShape, View};

use crate::{random_elems, rng, KvLayout, ModelDims, QWEN25_VL_7B};

/// Side of a frame's token grid.
pub const SIDE: usize = 32;
/// Context tokens after each frame (the paper's default).
pub const CONTEXT: usize = 4;
/// Text tokens before the frames, and of the question after them.
pub const TEXT: usize = 32;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub dims: ModelDims,
    pub batch: usize,
    /// Visual tokens per row: a multiple of `SIDE * SIDE`.
    pub visual: usize,
    pub kv_layout: KvLayout,
    pub shape: RegionShape,
    pub seed: u64,
}

impl Case {
    /// Qwen2.5-VL-7B, 6 x 6 regions of one frame.
    pub fn new(batch: usize, visual: usize, kv_layout: KvLayout) -> Self {
        assert!(
            visual > 0 && visual.checked_rem(SIDE * SIDE) == Some(0),
            "whole {SIDE} x {SIDE} frames"
        );
        Case {
            dims: QWEN25_VL_7B,
            batch,
            visual,
            kv_layout,
            shape: RegionShape::default(),
            seed: 0x6a2e,
        }
    }

    /// `B1 N16384 bshd 1x6x6`.
    pub fn label(&self) -> String {
        let s = self.shape;
        format!(
            "B{} N{} {} {}x{}x{}",
            self.batch,
            self.visual,
            self.kv_layout.name(),
            s.frames,
            s.height,
            s.width
        )
    }

    /// Positions per row.
    pub fn seq(&self) -> usize {
        let frames = self.visual / (SIDE * SIDE);
        2 * TEXT + frames * (SIDE * SIDE + CONTEXT)
    }

    /// The rows' layout (module docs).
    pub fn layout(&self) -> GazeLayout {
        GazeLayout::new(self.seq(), &rows(self)).expect("a valid layout")
    }

    /// `[B, S, Hkv, D]` in the case's memory order.
    pub fn k_layout(&self) -> Layout<4> {
        self.kv_layout.layout(
            self.batch,
            self.seq(),
            self.dims.kv_heads,
            self.dims.head_dim,
        )
    }

    /// desc `[B, Hkv, R, D]` for a layout of `regions` regions per row.
    pub fn desc_shape(&self, regions: usize) -> [usize; 4] {
        [self.batch, self.dims.kv_heads, regions, self.dims.head_dim]
    }
}

/// The rows of `case`: text, frames with their context tokens, question.
pub fn rows(case: &Case) -> Vec<GazeRow> {
    let frames = case.visual / (SIDE * SIDE);
    let mut row = GazeRow::new();
    row.push_visible(0..TEXT);
    let mut starts = Vec::with_capacity(frames);
    let mut at = TEXT;
    for _ in 0..frames {
        starts.push(at);
        at += SIDE * SIDE;
        row.push_visible(at..at + CONTEXT);
        at += CONTEXT;
    }
    row.push_visible(at..at + TEXT);
    row.push_units(&starts, SIDE, SIDE, case.shape)
        .expect("a valid grid");
    vec![row; case.batch]
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub layout: GazeLayout,
    pub k: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn k_view(&self) -> View<'_, T, 4> {
        View::new(&self.k, self.case.k_layout()).expect("generated to fit")
    }

    pub fn desc_shape(&self) -> [usize; 4] {
        self.case.desc_shape(self.layout.max_regions())
    }
}

/// Keys uniform in [-1, 1) (every slot, text included).
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let k = random_elems(&mut rng(case.seed), case.k_layout().span(), -1.0, 1.0);
    Input {
        case: *case,
        layout: case.layout(),
        k,
    }
}

/// Bytes the op must move: every region token's keys read once, its position
/// and each region's length read, the descriptors `[B, Hkv, R, D]` f32 written.
pub fn floor_bytes(case: &Case, regions: usize, elem_bytes: usize) -> u64 {
    let ModelDims {
        kv_heads, head_dim, ..
    } = case.dims;
    let b = case.batch;
    let keys = b * case.visual * kv_heads * head_dim * elem_bytes;
    let index = b * case.visual * 4 + b * regions * 4;
    let desc = b * kv_heads * regions * head_dim * 4;
    (keys + index + desc) as u64
}

/// The framework way: per row and region, gather the region's keys into a
/// new f32 tensor `[P, Hkv, D]` (`k[b, pos].float()`), then its mean over
/// the tokens. Returns desc `[B, Hkv, R, D]` contiguous.
pub fn baseline<T: Element>(k: View<'_, T, 4>, layout: &GazeLayout) -> Vec<f32> {
    let [b, _, hkv, d] = k.shape();
    let r_max = layout.max_regions();
    let mut desc = vec![0f32; b * hkv * r_max * d];
    let mut gathered = Vec::new();
    for bi in 0..b {
        for r in 0..layout.regions(bi) {
            let pos = layout.region(bi, r);
            gathered.clear();
            for &p in pos {
                for h in 0..hkv {
                    gathered.extend(k.row([bi, p as usize, h, 0]).iter().map(|x| x.to_f32()));
                }
            }
            for h in 0..hkv {
                let out = &mut desc[((bi * hkv + h) * r_max + r) * d..][..d];
                for (t, _) in pos.iter().enumerate() {
                    for (o, x) in out.iter_mut().zip(&gathered[(t * hkv + h) * d..][..d]) {
                        *o += x;
                    }
                }
                out.iter_mut().for_each(|o| *o /= pos.len() as f32);
            }
        }
    }
    desc
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::region_descriptors::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn layout_has_36_regions_a_frame() {
        let case = Case::new(2, 4096, KvLayout::Bhsd);
        let layout = case.layout();
        assert_eq!(
            (
                layout.batch(),
                layout.max_regions(),
                layout.max_region_len()
            ),
            (2, 4 * 36, 36)
        );
        assert_eq!(layout.visible_len(0), 2 * TEXT + 4 * CONTEXT);
        assert_eq!(layout.end(0), case.seq());
        let border: Vec<i32> = (0..6)
            .flat_map(|y| [30, 31].map(|x| (TEXT + SIDE * y + x) as i32))
            .collect();
        assert_eq!(layout.region(0, 5), &border[..], "the 6 x 2 border region");
    }

    #[test]
    fn baseline_matches_foveal() {
        for layout in KvLayout::ALL {
            let input = generate::<bf16>(&Case::new(1, 1024, layout));
            let shape = input.desc_shape();
            let mut want = vec![f32::NAN; shape.iter().product()];
            cpu::region_descriptors(
                input.k_view(),
                &input.layout,
                0..shape[2],
                &mut ViewMut::contiguous(&mut want, shape).unwrap(),
            )
            .unwrap();
            let got = baseline(input.k_view(), &input.layout);
            // the same sums in the same order; x / n against x * (1 / n)
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| (g - w).abs() <= 1e-6 * w.abs().max(1e-2)),
                "{layout:?}"
            );
        }
    }
}
