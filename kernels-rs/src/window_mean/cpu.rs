//! CPU reference of window_mean: plain loops, f32 accumulation in raster order.

use super::{check, Pool};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Writes the mean (or max) of every window of `x [B, Hx, Wx, C]` into `out
/// [B, M, C]` (see the module docs).
pub fn window_mean<T: Element>(
    x: View<'_, T, 4>,
    window: usize,
    pool: Pool,
    out: &mut ViewMut<'_, T, 3>,
) -> Result<()> {
    let d = check(x.shape(), out.shape(), window)?;
    if d.channels == 0 || d.windows == 0 {
        return Ok(());
    }
    let wins_x = d.width.div_ceil(window);
    let mut acc = vec![0f32; d.channels];
    for b in 0..d.batch {
        for m in 0..d.windows {
            let (y0, x0) = ((m / wins_x) * window, (m % wins_x) * window);
            let (y1, x1) = ((y0 + window).min(d.height), (x0 + window).min(d.width));
            acc.fill(if pool == Pool::Max {
                f32::NEG_INFINITY
            } else {
                0.0
            });
            for y in y0..y1 {
                for xx in x0..x1 {
                    for (a, v) in acc.iter_mut().zip(x.row([b, y, xx, 0])) {
                        *a = if pool == Pool::Max {
                            a.max(v.to_f32())
                        } else {
                            *a + v.to_f32()
                        };
                    }
                }
            }
            let cells = ((y1 - y0) * (x1 - x0)) as f32;
            for (o, &a) in out.row_mut([b, m, 0]).iter_mut().zip(&acc) {
                *o = T::from_f32(if pool == Pool::Max { a } else { a / cells });
            }
        }
    }
    Ok(())
}
