//! Gaze Attention's prompts: rows of text, images and videos, each visual
//! unit (an image, or one frame of a video) followed by its learnable
//! context tokens; the prefill mask in which a context token sees only its
//! own unit; and the foveal [`GazeLayout`] of the rows (regions of the
//! visual units, everything else always visible).

use std::ops::Range;

use candle_core::{Result, Tensor};
use foveal::{GazeLayout, GazeRow, RegionShape};

use crate::decoder::{attention_mask, Decoder, MASK_MIN};
use crate::prompt::{Prompt, Segment};

/// A piece of a Gaze Attention prompt row.
#[derive(Debug, Clone)]
pub enum GazeSegment {
    /// Text token ids.
    Text(Vec<u32>),
    /// An image: visual embeddings `[height * width, Dm]`, raster order.
    Image {
        embeds: Tensor,
        height: usize,
        width: usize,
    },
    /// A video: frames `[F, height * width, Dm]`, each frame a visual unit;
    /// regions span [`RegionShape::frames`] consecutive frames.
    Video {
        frames: Tensor,
        height: usize,
        width: usize,
    },
}

/// One visual unit of a laid-out row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GazeUnit {
    /// Sequence index of the unit's first visual token (its tokens are
    /// `start..start + height * width`, raster order).
    pub start: usize,
    pub height: usize,
    pub width: usize,
    /// Sequence indices of its context tokens (right after its visual tokens).
    pub context: Range<usize>,
}

impl GazeUnit {
    pub fn visual(&self) -> Range<usize> {
        self.start..self.start + self.height * self.width
    }
}

/// A left-padded batch of Gaze Attention prompts.
#[derive(Debug, Clone)]
pub struct GazePrompt {
    /// Embeddings, position ids, starts and visual positions of the rows.
    pub prompt: Prompt,
    /// Per row, its visual units in sequence order.
    pub units: Vec<Vec<GazeUnit>>,
    /// Per row, the regions of its units and its always-visible ranges
    /// (every valid position that is not a visual token).
    pub rows: Vec<GazeRow>,
}

impl GazePrompt {
    /// Lays out `rows`, `context` `[c, Dm]` after every visual unit, regions
    /// of `shape`.
    pub fn build(
        decoder: &Decoder,
        rows: &[Vec<GazeSegment>],
        context: &Tensor,
        shape: RegionShape,
    ) -> Result<GazePrompt> {
        let c = context.dim(0)?;
        let mut segments = Vec::with_capacity(rows.len());
        for (b, row) in rows.iter().enumerate() {
            let mut segs = Vec::new();
            for seg in row {
                match seg {
                    GazeSegment::Text(ids) => segs.push(Segment::Text(ids.clone())),
                    GazeSegment::Image {
                        embeds,
                        height,
                        width,
                    } => {
                        check_grid(b, embeds.dim(0)?, *height, *width)?;
                        segs.push(Segment::Image(embeds.clone()));
                        segs.push(Segment::Embeds(context.clone()));
                    }
                    GazeSegment::Video {
                        frames,
                        height,
                        width,
                    } => {
                        let (f, n, _) = frames.dims3()?;
                        if f == 0 {
                            candle_core::bail!("GazePrompt: row {b}: a video without frames");
                        }
                        check_grid(b, n, *height, *width)?;
                        for i in 0..f {
                            segs.push(Segment::Image(frames.get(i)?));
                            segs.push(Segment::Embeds(context.clone()));
                        }
                    }
                }
            }
            segments.push(segs);
        }
        let prompt = Prompt::build(decoder, &segments)?;

        // Walk the rows again at their padded offsets: units, regions, visible ranges.
        let (mut units, mut gaze_rows) = (Vec::new(), Vec::new());
        for (b, row) in rows.iter().enumerate() {
            let (mut pos, mut row_units, mut gr) = (prompt.starts[b], Vec::new(), GazeRow::new());
            let mut unit = |pos: &mut usize, gr: &mut GazeRow, h: usize, w: usize| {
                let u = GazeUnit {
                    start: *pos,
                    height: h,
                    width: w,
                    context: *pos + h * w..*pos + h * w + c,
                };
                gr.push_visible(u.context.clone());
                *pos = u.context.end;
                row_units.push(u.clone());
                u.start
            };
            for seg in row {
                match seg {
                    GazeSegment::Text(ids) => {
                        gr.push_visible(pos..pos + ids.len());
                        pos += ids.len();
                    }
                    GazeSegment::Image { height, width, .. } => {
                        let first = unit(&mut pos, &mut gr, *height, *width);
                        gr.push_units(&[first], *height, *width, shape)
                            .map_err(candle_core::Error::wrap)?;
                    }
                    GazeSegment::Video {
                        frames,
                        height,
                        width,
                    } => {
                        let firsts: Vec<usize> = (0..frames.dim(0)?)
                            .map(|_| unit(&mut pos, &mut gr, *height, *width))
                            .collect();
                        gr.push_units(&firsts, *height, *width, shape)
                            .map_err(candle_core::Error::wrap)?;
                    }
                }
            }
            debug_assert_eq!(pos, prompt.seq(), "row {b} laid out to its end");
            units.push(row_units);
            gaze_rows.push(gr);
        }
        Ok(GazePrompt {
            prompt,
            units,
            rows: gaze_rows,
        })
    }

    /// The prefill's additive mask `[B, 1, S, S]` (f32): causal with left
    /// padding, except that a context token sees only its own unit's visual
    /// tokens, its unit's earlier context tokens and itself.
    pub fn mask(&self) -> Result<Tensor> {
        let p = &self.prompt;
        let s = p.seq();
        let mask = attention_mask(&p.starts, s, s, p.embeds.device())?;
        let mut m = mask.flatten_all()?.to_vec1::<f32>()?;
        for (b, units) in self.units.iter().enumerate() {
            for u in units {
                for q in u.context.clone() {
                    let row = &mut m[(b * s + q) * s..][..s];
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if (u.start..=q).contains(&j) {
                            0.0
                        } else {
                            MASK_MIN
                        };
                    }
                }
            }
        }
        Tensor::from_vec(m, (p.batch(), 1, s, s), p.embeds.device())
    }

    /// foveal's checked layout of the rows over the prompt's cache.
    pub fn layout(&self) -> foveal::Result<GazeLayout> {
        GazeLayout::new(self.prompt.seq(), &self.rows)
    }

    /// Per row, the sequence indices of its context tokens.
    pub fn context_positions(&self) -> Vec<Vec<usize>> {
        self.units
            .iter()
            .map(|us| us.iter().flat_map(|u| u.context.clone()).collect())
            .collect()
    }
}

fn check_grid(b: usize, n: usize, height: usize, width: usize) -> Result<()> {
    if n == 0 || n != height * width {
        candle_core::bail!("GazePrompt: row {b}: {n} visual tokens for a {height} x {width} grid");
    }
    Ok(())
}
