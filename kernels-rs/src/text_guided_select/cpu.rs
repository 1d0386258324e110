//! CPU reference of text_guided_select: plain loops; f32 dot products, f64
//! sums of exponentials (thousands of terms per log-sum-exp and per score).

use super::{check, select_from_scores, Lengths};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Selects each row's visual tokens (see the module docs): kept indices
/// ascending into `keep [B, N]` (padded with -1), counts into `count [B]`,
/// and `S` into `scores [B, N]` when given.
#[allow(clippy::too_many_arguments)]
pub fn text_guided_select<T: Element>(
    q_text: View<'_, T, 4>,
    k_vis: View<'_, T, 4>,
    lengths: &Lengths,
    gamma: f32,
    keep: &mut ViewMut<'_, i32, 2>,
    count: &mut ViewMut<'_, i32, 1>,
    mut scores: Option<&mut ViewMut<'_, f32, 2>>,
) -> Result<()> {
    let d = check(
        q_text.shape(),
        k_vis.shape(),
        lengths,
        gamma,
        keep.shape(),
        count.shape(),
        scores.as_ref().map(|s| s.shape()),
    )?;
    let (g, hd) = (d.q_heads / d.kv_heads, d.head_dim);
    let mut kf = Vec::new(); // [n, Hkv, D]
    let mut qf = vec![0f32; hd];
    let (mut logits, mut best) = (Vec::new(), Vec::new());
    for b in 0..d.batch {
        let (t, n) = (lengths.t_len()[b], lengths.n_len()[b]);
        let mut s = vec![0f64; n];
        if t > 0 && n > 0 {
            kf.clear();
            for i in 0..n {
                for kvh in 0..d.kv_heads {
                    kf.extend(k_vis.row([b, i, kvh, 0]).iter().map(|x| x.to_f32()));
                }
            }
            for j in 0..t {
                best.clear();
                best.resize(n, f32::NEG_INFINITY);
                for h in 0..d.q_heads {
                    for (dst, x) in qf.iter_mut().zip(q_text.row([b, j, h, 0])) {
                        *dst = x.to_f32();
                    }
                    let kvh = h / g;
                    logits.clear();
                    logits.extend((0..n).map(|i| {
                        let key = &kf[(i * d.kv_heads + kvh) * hd..][..hd];
                        d.scale * qf.iter().zip(key).map(|(a, c)| a * c).sum::<f32>()
                    }));
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let ln_sum = logits
                        .iter()
                        .map(|&l| f64::from(l - m).exp())
                        .sum::<f64>()
                        .ln() as f32;
                    // log A = (l - m) - ln sum: never l - (m + ln sum), which
                    // rounds m + ln sum at the size of the logits
                    for (bi, &l) in best.iter_mut().zip(&logits) {
                        *bi = bi.max((l - m) - ln_sum);
                    }
                }
                for (si, &bi) in s.iter_mut().zip(&best) {
                    *si += f64::from(bi).exp();
                }
            }
        }
        let s: Vec<f32> = s.iter().map(|&x| (x / t.max(1) as f64) as f32).collect();
        let kept = select_from_scores(&s, gamma);
        count.set([b], kept.len() as i32);
        if d.visual == 0 {
            continue;
        }
        let row = keep.row_mut([b, 0]);
        row.fill(-1);
        for (slot, &i) in row.iter_mut().zip(&kept) {
            *slot = i as i32;
        }
        if let Some(out) = scores.as_deref_mut() {
            let row = out.row_mut([b, 0]);
            row.fill(0.0);
            row[..n].copy_from_slice(&s);
        }
    }
    Ok(())
}
