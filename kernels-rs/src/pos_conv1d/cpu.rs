//! CPU reference of pos_conv1d: per token and channel, the taps in order.

use super::{check, KERNEL_SIZE, PADDING};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};

/// Adds the depthwise convolution of each row's valid tokens to them (module
/// docs): `out [B, N, C]` from `x [B, N, C]`, `weight [C, 7]`, `bias [C]`.
pub fn pos_conv1d<T: Element>(
    x: View<'_, T, 3>,
    lens: &[usize],
    weight: View<'_, T, 2>,
    bias: View<'_, T, 1>,
    out: &mut ViewMut<'_, T, 3>,
) -> Result<()> {
    let d = check(x.shape(), lens, weight.shape(), bias.shape(), out.shape())?;
    let w: Vec<[f32; KERNEL_SIZE]> = (0..d.channels)
        .map(|c| std::array::from_fn(|t| weight.at([c, t]).to_f32()))
        .collect();
    let bias: Vec<f32> = (0..d.channels).map(|c| bias.at([c]).to_f32()).collect();
    for (b, &len) in lens.iter().enumerate() {
        for i in 0..d.tokens {
            if i >= len {
                out.row_mut([b, i, 0])
                    .iter_mut()
                    .for_each(|o| *o = T::from_f32(0.0));
                continue;
            }
            // Taps j = i + t - 3 inside the row.
            let t0 = PADDING.saturating_sub(i);
            let t1 = KERNEL_SIZE.min(len + PADDING - i);
            let mut rows: [&[T]; KERNEL_SIZE] = [&[]; KERNEL_SIZE];
            for (t, row) in rows.iter_mut().enumerate().take(t1).skip(t0) {
                *row = x.row([b, i + t - PADDING, 0]);
            }
            let centre = x.row([b, i, 0]);
            let o = out.row_mut([b, i, 0]);
            for c in 0..d.channels {
                let mut acc = bias[c];
                for (t, row) in rows.iter().enumerate().take(t1).skip(t0) {
                    acc += w[c][t] * row[c].to_f32();
                }
                o[c] = T::from_f32(centre[c].to_f32() + acc);
            }
        }
    }
    Ok(())
}
