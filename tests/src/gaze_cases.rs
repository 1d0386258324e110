//! Random Gaze Attention layouts for the tests of its ops (region_descriptors,
//! route_topk): ragged batches of rows laid out as a chat prompt with images
//! and video frames.

use std::ops::Range;

use foveal::{GazeRow, RegionShape};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// Options of [`random_gaze_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GazeOpts {
    /// Most visual units (images or frame groups) per row.
    pub max_units: usize,
    /// Largest side of a unit's grid.
    pub max_side: usize,
}

impl Default for GazeOpts {
    fn default() -> Self {
        GazeOpts {
            max_units: 3,
            max_side: 13,
        }
    }
}

/// A random ragged batch and the cache capacity it fits: each row is text,
/// then units (an image, or 1 to 3 video frames with 0 to 2 context tokens
/// after each frame), each split by [`GazeRow::push_units`] with a random
/// region shape (1 to 7 a side, 1 to 3 frames), text between units; about
/// one row in six has no unit, and about one unit in five is replaced by
/// hand-made regions of random, scattered positions (listed in random
/// order). Rows differ in length and region count; the capacity has spare
/// slots past the longest row.
pub fn random_gaze_rows(rng: &mut StdRng, batch: usize, opts: GazeOpts) -> (usize, Vec<GazeRow>) {
    let mut rows = Vec::with_capacity(batch);
    let mut seq = 1;
    for _ in 0..batch {
        let mut row = GazeRow::new();
        let mut at = 0;
        let text = |row: &mut GazeRow, at: &mut usize, rng: &mut StdRng| {
            let n = rng.random_range(0..5);
            row.push_visible(*at..*at + n);
            *at += n;
        };
        text(&mut row, &mut at, rng);
        let units = if rng.random_bool(1.0 / 6.0) {
            0
        } else {
            rng.random_range(1..=opts.max_units)
        };
        for _ in 0..units {
            let (h, w) = (
                rng.random_range(1..=opts.max_side),
                rng.random_range(1..=opts.max_side),
            );
            if rng.random_bool(0.2) {
                push_scattered(rng, &mut row, at..at + h * w);
                at += h * w;
            } else {
                let frames = rng.random_range(1..=3);
                let context = rng.random_range(0..3);
                let mut starts = Vec::with_capacity(frames);
                for _ in 0..frames {
                    starts.push(at);
                    at += h * w;
                    row.push_visible(at..at + context);
                    at += context;
                }
                let shape = RegionShape {
                    frames: rng.random_range(1..=3),
                    height: rng.random_range(1..=7),
                    width: rng.random_range(1..=7),
                };
                row.push_units(&starts, h, w, shape)
                    .expect("a valid grid and shape");
            }
            text(&mut row, &mut at, rng);
        }
        seq = seq.max(at);
        rows.push(row);
    }
    (seq + rng.random_range(0..4), rows)
}

/// Splits the positions of `span`, shuffled, into regions of 1 to 9 tokens.
fn push_scattered(rng: &mut StdRng, row: &mut GazeRow, span: Range<usize>) {
    let mut pos: Vec<usize> = span.collect();
    pos.shuffle(rng);
    while !pos.is_empty() {
        let n = rng.random_range(1..=9).min(pos.len());
        row.regions.push(pos.split_off(pos.len() - n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use foveal::GazeLayout;

    #[test]
    fn random_gaze_rows_are_valid_and_ragged() {
        let mut r = rng(5);
        let (mut empty, mut ragged, mut multi) = (0, 0, 0);
        for _ in 0..100 {
            let (seq, rows) = random_gaze_rows(&mut r, 3, GazeOpts::default());
            let layout = GazeLayout::new(seq, &rows).expect("valid rows");
            let counts: Vec<usize> = (0..3).map(|b| layout.regions(b)).collect();
            empty += counts.iter().filter(|&&c| c == 0).count();
            ragged += usize::from(counts.iter().any(|&c| c != counts[0]));
            multi += usize::from(layout.max_region_len() > 1);
        }
        assert!(
            empty > 10 && ragged > 50 && multi > 90,
            "{empty} {ragged} {multi}"
        );
    }
}
