//! Realistic ragged batches of VLM prompts, as the GlimpsePrune ops see them.
//!
//! Each row follows Qwen2.5-VL's chat template:
//!
//! ```text
//! <|im_start|>system ... <|im_end|> <|im_start|>user        (prefix, 14..22 tokens)
//! [<|vision_start|> visual tokens <|vision_end|>] x images   ("Picture k:" text between images)
//! question (8..96 tokens) <|im_end|> <|im_start|>assistant   (suffix)
//! glimpse token                                              (the last valid position)
//! ```
//!
//! Row 0 has exactly `nv` visual tokens; with `ragged`, the others have up to
//! 1/8 fewer (images of other sizes), so `nv_max == nv` while lengths differ.
//! The cache capacity is the longest row; shorter rows are padded on the
//! side `padding` names (left, as batched generation and GlimpsePrune's
//! batched code do, or right).

use foveal::{Padding, RowLayout, RowSpec};
use rand::rngs::StdRng;
use rand::Rng;

/// What batch of prompts to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowsConfig {
    pub batch: usize,
    /// Visual tokens of row 0 (the largest row).
    pub nv: usize,
    /// Images per row; their visual tokens are split evenly with text between.
    pub images: usize,
    /// Shorter visual-token counts on rows past the first.
    pub ragged: bool,
    /// Where a shorter row's unused cache slots lie.
    pub padding: Padding,
}

impl RowsConfig {
    /// One image per row, ragged rows, left padding.
    pub fn new(batch: usize, nv: usize) -> Self {
        RowsConfig {
            batch,
            nv,
            images: 1,
            ragged: true,
            padding: Padding::Left,
        }
    }
}

/// Tokens of the chat template before the first image.
const PREFIX: std::ops::RangeInclusive<usize> = 14..=22;
/// Question tokens.
const QUESTION: std::ops::RangeInclusive<usize> = 8..=96;
/// `<|im_end|>\n<|im_start|>assistant\n`.
const ASSISTANT_HEADER: usize = 5;
/// Text between two images ("Picture 2:" and the vision markers).
const BETWEEN_IMAGES: usize = 4;

/// The visual-token count of each row of `cfg`.
fn visual_counts(rng: &mut StdRng, cfg: &RowsConfig) -> Vec<usize> {
    (0..cfg.batch)
        .map(|b| {
            if b == 0 || !cfg.ragged {
                cfg.nv
            } else {
                cfg.nv - rng.random_range(0..=cfg.nv / 8)
            }
        })
        .collect()
}

/// A ragged batch of prompts (see the module docs); validated by foveal.
pub fn vlm_rows(rng: &mut StdRng, cfg: &RowsConfig) -> RowLayout {
    assert!(
        cfg.batch > 0 && cfg.images > 0,
        "a batch needs rows and images"
    );
    let counts = visual_counts(rng, cfg);
    // Relative rows first (start 0), then shifted into a cache of the longest length.
    let mut rel: Vec<RowSpec> = Vec::with_capacity(cfg.batch);
    for &nv in &counts {
        let mut p = rng.random_range(PREFIX);
        let mut visual = Vec::with_capacity(nv);
        for img in 0..cfg.images {
            if img > 0 {
                p += BETWEEN_IMAGES;
            }
            p += 1; // <|vision_start|>
            let n = nv / cfg.images + usize::from(img < nv % cfg.images);
            visual.extend(p..p + n);
            p += n + 1; // visual tokens, <|vision_end|>
        }
        p += rng.random_range(QUESTION) + ASSISTANT_HEADER;
        let end = p + 1; // the glimpse token at `p`
        rel.push(RowSpec {
            start: 0,
            end,
            visual,
        });
    }
    let seq = rel.iter().map(|r| r.end).max().expect("batch > 0");
    let rows: Vec<RowSpec> = rel
        .into_iter()
        .map(|r| {
            let shift = match cfg.padding {
                Padding::Right => 0,
                Padding::Left => seq - r.end,
            };
            RowSpec {
                start: shift,
                end: r.end + shift,
                visual: r.visual.iter().map(|p| p + shift).collect(),
            }
        })
        .collect();
    RowLayout::new(seq, &rows).expect("generated rows are valid")
}

/// The valid positions of all rows together (the keys a whole-row pass reads).
pub fn total_valid(rows: &RowLayout) -> usize {
    (0..rows.batch()).map(|b| rows.len(b)).sum()
}

/// The visual tokens of all rows together.
pub fn total_visual(rows: &RowLayout) -> usize {
    (0..rows.batch()).map(|b| rows.nv(b)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_realistic() {
        for padding in [Padding::Left, Padding::Right] {
            let cfg = RowsConfig {
                batch: 4,
                nv: 1024,
                images: 3,
                ragged: true,
                padding,
            };
            let rows = vlm_rows(&mut crate::rng(7), &cfg);
            assert_eq!(rows.batch(), 4);
            assert_eq!(rows.nv(0), 1024);
            assert_eq!(rows.nv_max(), 1024);
            for b in 0..4 {
                let vis = rows.visual(b);
                assert!(rows.nv(b) >= 1024 - 128);
                // Text before the first and after the last visual token; glimpse last.
                assert!(vis[0] as usize > rows.start(b) + 10);
                assert!((*vis.last().unwrap() as usize) < rows.end(b) - 10);
                match padding {
                    Padding::Left => assert_eq!(rows.end(b), rows.seq()),
                    Padding::Right => assert_eq!(rows.start(b), 0),
                }
            }
            // Same seed, same rows (the layouts differ only by their id).
            let again = vlm_rows(&mut crate::rng(7), &cfg);
            assert_eq!((again.seq(), again.packed()), (rows.seq(), rows.packed()));
        }
    }
}
