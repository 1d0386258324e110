//! CPU reference of glimpse_scores: plain loops, f32 accumulation.

use super::{check, ScoreMode};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};
use crate::rows::RowLayout;

/// Writes the glimpse token's scores to the visual tokens into `out`
/// `[B, Nv_max, Hq]` (see the module docs).
pub fn glimpse_scores<T: Element>(
    q: View<'_, T, 3>,
    k: View<'_, T, 4>,
    rows: &RowLayout,
    scale: Option<f32>,
    mode: ScoreMode,
    out: &mut ViewMut<'_, f32, 3>,
) -> Result<()> {
    let dims = check(q.shape(), k.shape(), out.shape(), rows, scale)?;
    let g = dims.group();
    let mut logits = Vec::new();
    for b in 0..dims.batch {
        let (start, end) = (rows.start(b), rows.end(b));
        for h in 0..dims.q_heads {
            let qrow = q.row([b, h, 0]);
            logits.clear();
            logits.extend((start..end).map(|p| {
                let krow = k.row([b, p, h / g, 0]);
                let dot: f32 = qrow.iter().zip(krow).map(|(a, c)| a.to_f32() * c.to_f32()).sum();
                dims.scale * dot
            }));
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + logits.iter().map(|&s| (s - m).exp()).sum::<f32>().ln();
            for i in 0..dims.nv_max {
                let v = match rows.visual(b).get(i) {
                    None => 0.0,
                    Some(&p) => {
                        let s = logits[p as usize - start];
                        match mode {
                            ScoreMode::Logits => s,
                            ScoreMode::LogSoftmax => s - lse,
                            ScoreMode::Softmax => (s - lse).exp(),
                        }
                    }
                };
                out.set([b, i, h], v);
            }
        }
    }
    Ok(())
}
