//! CPU reference of multiscale_gather: plain loops, f32.

use super::{check, choose, tokens_of, window_extent, ScaleSet};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Gathers every window's tokens at its chosen scale (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn multiscale_gather<T: Element>(
    x: View<'_, T, 4>,
    z: View<'_, f32, 3>,
    window: usize,
    scales: &ScaleSet,
    scale_by_prob: bool,
    tokens: &mut ViewMut<'_, T, 3>,
    positions: &mut ViewMut<'_, i32, 2>,
    count: &mut ViewMut<'_, i32, 1>,
) -> Result<()> {
    let (d, n_out) = check(
        x.shape(),
        z.shape(),
        window,
        scales,
        tokens.shape(),
        positions.shape(),
        count.shape(),
    )?;
    let mut acc = vec![0f32; d.channels];
    for b in 0..d.batch {
        let mut slot = 0;
        for m in 0..d.windows {
            let zr = z.row([b, m, 0]);
            let c = choose(zr);
            let prob = if scale_by_prob {
                1.0 / zr.iter().fold(0f32, |s, &v| s + (v - zr[c]).exp())
            } else {
                1.0
            };
            let (kh, kw) = scales.scales()[c];
            let (wy0, wx0, wy1, wx1) = window_extent(&d, m);
            let cells_x = (wx1 - wx0).div_ceil(kw);
            for t in 0..tokens_of(wy1 - wy0, wx1 - wx0, (kh, kw)) {
                let (y0, x0) = (wy0 + (t / cells_x) * kh, wx0 + (t % cells_x) * kw);
                acc.fill(f32::NEG_INFINITY);
                for y in (y0..(y0 + kh).min(wy1)).filter(|_| d.channels > 0) {
                    for xx in x0..(x0 + kw).min(wx1) {
                        for (a, v) in acc.iter_mut().zip(x.row([b, y, xx, 0])) {
                            *a = a.max(v.to_f32());
                        }
                    }
                }
                if d.channels > 0 {
                    for (o, &a) in tokens.row_mut([b, slot, 0]).iter_mut().zip(&acc) {
                        *o = T::from_f32(if scale_by_prob { a * prob } else { a });
                    }
                }
                positions.set([b, slot], (y0 * d.width + x0) as i32);
                slot += 1;
            }
        }
        for s in slot..n_out {
            if d.channels > 0 {
                tokens.row_mut([b, s, 0]).fill(T::from_f32(0.0));
            }
            positions.set([b, s], -1);
        }
        count.set([b], slot as i32);
    }
    Ok(())
}
