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
    if out.layout().numel() == 0 {
        // No visual token (or no row): nothing to score, and no scratch for
        // query heads that only an empty output has.
        return Ok(());
    }
    let (g, d) = (dims.group(), dims.head_dim);
    let to_f32 = |row: &[T], dst: &mut Vec<f32>| {
        dst.clear();
        dst.extend(row.iter().map(|x| x.to_f32()));
    };
    let (mut qf, mut kf) = (Vec::with_capacity(dims.q_heads * d), Vec::with_capacity(d));
    let mut logits = Vec::new(); // [Hq, row length]
    for b in 0..dims.batch {
        let (start, end) = (rows.start(b), rows.end(b));
        let n = end - start;
        qf.clear();
        for h in 0..dims.q_heads {
            qf.extend(q.row([b, h, 0]).iter().map(|x| x.to_f32()));
        }
        logits.clear();
        logits.resize(dims.q_heads * n, 0.0);
        // Each key is widened once and used by every query head of its group.
        for kvh in 0..dims.kv_heads {
            for p in start..end {
                to_f32(k.row([b, p, kvh, 0]), &mut kf);
                for h in kvh * g..(kvh + 1) * g {
                    let dot: f32 = qf[h * d..(h + 1) * d]
                        .iter()
                        .zip(&kf)
                        .map(|(a, c)| a * c)
                        .sum();
                    logits[h * n + p - start] = dims.scale * dot;
                }
            }
        }
        for h in 0..dims.q_heads {
            let s_h = &logits[h * n..(h + 1) * n];
            let m = s_h.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // log-softmax as (s - m) - ln sum: s - (m + ln sum) would round
            // m + ln sum at the size of the logits (0.0625 at 1e6)
            let ln_sum = s_h.iter().map(|&s| (s - m).exp()).sum::<f32>().ln();
            for i in 0..dims.nv_max {
                let v = match rows.visual(b).get(i) {
                    None => 0.0,
                    Some(&p) => {
                        let s = s_h[p as usize - start];
                        match mode {
                            ScoreMode::Logits => s,
                            ScoreMode::LogSoftmax => (s - m) - ln_sum,
                            ScoreMode::Softmax => ((s - m) - ln_sum).exp(),
                        }
                    }
                };
                out.set([b, i, h], v);
            }
        }
    }
    Ok(())
}
