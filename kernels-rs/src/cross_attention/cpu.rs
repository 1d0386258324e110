//! CPU reference of cross_attention: per (row, KV head) the valid keys and
//! values widened to f32 once, then for each query head of the group and each
//! valid query f32 dot products and an f64 softmax.

use super::{check, SeqLens};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Attends every valid query of each row to the row's valid keys (module
/// docs), into `o [B, Nq, Hq, D]` and, when given, `lse [B, Hq, Nq]`.
#[allow(clippy::too_many_arguments)]
pub fn cross_attention<T: Element>(
    q: View<'_, T, 4>,
    k: View<'_, T, 4>,
    v: View<'_, T, 4>,
    lens: &SeqLens,
    scale: Option<f32>,
    o: &mut ViewMut<'_, T, 4>,
    mut lse: Option<&mut ViewMut<'_, f32, 3>>,
) -> Result<()> {
    let d = check(
        q.shape(),
        k.shape(),
        v.shape(),
        lens,
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    if o.layout().numel() == 0 {
        // Nothing to write (lse is empty too), and no scratch for a head
        // dimension that only an empty tensor has.
        return Ok(());
    }
    let (g, hd) = (d.group(), d.head_dim);
    let mut keys: Vec<f32> = Vec::new();
    let mut values: Vec<f32> = Vec::new();
    let mut qf = vec![0f32; hd];
    let mut logits: Vec<f32> = Vec::new();
    let mut acc = vec![0f64; hd];
    for b in 0..d.batch {
        let (nq, nk) = (lens.q()[b], lens.kv()[b]);
        for kvh in 0..d.kv_heads {
            keys.clear();
            values.clear();
            for j in 0..nk {
                keys.extend(k.row([b, j, kvh, 0]).iter().map(|x| x.to_f32()));
                values.extend(v.row([b, j, kvh, 0]).iter().map(|x| x.to_f32()));
            }
            for h in kvh * g..(kvh + 1) * g {
                for i in 0..d.queries {
                    logits.clear();
                    if i < nq {
                        for (a, x) in qf.iter_mut().zip(q.row([b, i, h, 0])) {
                            *a = x.to_f32();
                        }
                        logits.extend(keys.chunks_exact(hd).map(|kr| {
                            d.scale * qf.iter().zip(kr).map(|(a, c)| a * c).sum::<f32>()
                        }));
                    }
                    // The max ignores NaN scores; a -inf score weighs 0 even
                    // when the max is -inf (the kernels' guard), a NaN one
                    // makes the sum NaN.
                    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    let mut sum = 0f64;
                    for (vr, &l) in values.chunks_exact(hd).zip(&logits) {
                        let w = if l == f32::NEG_INFINITY {
                            0.0
                        } else {
                            f64::from(l - m).exp()
                        };
                        sum += w;
                        for (a, &x) in acc.iter_mut().zip(vr) {
                            *a += w * f64::from(x);
                        }
                    }
                    let out = o.row_mut([b, i, h, 0]);
                    // Nothing attended (a slot past q_len, no key, every
                    // score -inf): o = 0, lse = -inf.
                    let empty = sum == 0.0;
                    for (x, a) in out.iter_mut().zip(&acc) {
                        *x = T::from_f32(if empty { 0.0 } else { (a / sum) as f32 });
                    }
                    if let Some(l) = lse.as_deref_mut() {
                        let v = if empty {
                            f32::NEG_INFINITY
                        } else {
                            m + sum.ln() as f32
                        };
                        l.set([b, h, i], v);
                    }
                }
            }
        }
    }
    Ok(())
}
