//! CPU reference of gaze_decode: plain loops over the attended positions,
//! f32 dot products, f64 softmax sums.

use super::check;
use crate::dtype::Element;
use crate::error::Result;
use crate::gaze_layout::{GazeLayout, Routes};
use crate::layout::{View, ViewMut};

/// Attends each query head to its row's visible keys and routed regions
/// (module docs), into `o [B, Hq, D]` and, when given, `lse [B, Hq]`.
#[allow(clippy::too_many_arguments)]
pub fn gaze_decode<T: Element>(
    q: View<'_, T, 3>,
    k: View<'_, T, 4>,
    v: View<'_, T, 4>,
    layout: &GazeLayout,
    routes: &Routes,
    scale: Option<f32>,
    o: &mut ViewMut<'_, T, 3>,
    mut lse: Option<&mut ViewMut<'_, f32, 2>>,
) -> Result<()> {
    let d = check(
        q.shape(),
        k.shape(),
        v.shape(),
        layout,
        routes.shape(),
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    routes.check_from(super::OP, layout)?;
    let g = d.q_heads / d.kv_heads;
    let mut positions = Vec::new();
    let mut logits = Vec::new();
    let mut acc = vec![0f64; d.head_dim];
    for b in 0..d.batch {
        for h in 0..d.q_heads {
            positions.clear();
            for r in layout.visible(b) {
                positions.extend(r);
            }
            for &r in routes.get(b, 0, h) {
                positions.extend(layout.region(b, r as usize).iter().map(|&p| p as usize));
            }
            let qh: Vec<f32> = q.row([b, h, 0]).iter().map(|x| x.to_f32()).collect();
            let kvh = h / g;
            logits.clear();
            logits.extend(positions.iter().map(|&p| {
                d.scale
                    * qh.iter()
                        .zip(k.row([b, p, kvh, 0]))
                        .map(|(a, c)| a * c.to_f32())
                        .sum::<f32>()
            }));
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut sum = 0f64;
            for (&p, &l) in positions.iter().zip(&logits) {
                let w = f64::from(l - m).exp();
                sum += w;
                for (a, x) in acc.iter_mut().zip(v.row([b, p, kvh, 0])) {
                    *a += w * f64::from(x.to_f32());
                }
            }
            let out = o.row_mut([b, h, 0]);
            if positions.is_empty() {
                out.iter_mut().for_each(|x| *x = T::from_f32(0.0));
            } else {
                for (x, a) in out.iter_mut().zip(&acc) {
                    *x = T::from_f32((a / sum) as f32);
                }
            }
            if let Some(l) = lse.as_deref_mut() {
                l.set(
                    [b, h],
                    if positions.is_empty() {
                        f32::NEG_INFINITY
                    } else {
                        m + sum.ln() as f32
                    },
                );
            }
        }
    }
    Ok(())
}
