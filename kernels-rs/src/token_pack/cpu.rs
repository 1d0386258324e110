//! CPU reference of token_pack: each packed token's four resized pixels.

use super::{check, source_index};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Resizes each `h x w` grid and packs 2 x 2 blocks (module docs):
/// `out [B, H'/2, W'/2, 4C]` from `x [B, h, w, C]`.
pub fn token_pack<T: Element>(
    x: View<'_, T, 4>,
    rho: f64,
    out: &mut ViewMut<'_, T, 4>,
) -> Result<()> {
    let d = check(x.shape(), rho, out.shape())?;
    let c = d.channels;
    if c == 0 {
        return Ok(());
    }
    let cols: Vec<_> = (0..d.out_width)
        .map(|xo| source_index(xo, d.width, d.out_width))
        .collect();
    for b in 0..d.batch {
        for yo in 0..d.out_height {
            let (y0, y1, ly) = source_index(yo, d.height, d.out_height);
            let hy = 1.0 - ly;
            for (xo, &(x0, x1, lx)) in cols.iter().enumerate() {
                let hx = 1.0 - lx;
                let (r00, r01) = (x.row([b, y0, x0, 0]), x.row([b, y0, x1, 0]));
                let (r10, r11) = (x.row([b, y1, x0, 0]), x.row([b, y1, x1, 0]));
                let q = 2 * (yo % 2) + xo % 2;
                let o = &mut out.row_mut([b, yo / 2, xo / 2, 0])[q * c..(q + 1) * c];
                for ch in 0..c {
                    let top = hx * r00[ch].to_f32() + lx * r01[ch].to_f32();
                    let bottom = hx * r10[ch].to_f32() + lx * r11[ch].to_f32();
                    o[ch] = T::from_f32(hy * top + ly * bottom);
                }
            }
        }
    }
    Ok(())
}
