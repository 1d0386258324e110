//! CPU reference of pos_conv1d: per row the valid tokens widened to f32 once,
//! then per token the taps in order, each over all channels.

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
    if out.layout().numel() == 0 {
        // Nothing to write (no channel, token or row), however many tokens.
        return Ok(());
    }
    let c = d.channels;
    // weight transposed to [7, C], so that a tap runs over contiguous channels
    let w: Vec<f32> = (0..KERNEL_SIZE)
        .flat_map(|t| (0..c).map(move |ch| (ch, t)))
        .map(|(ch, t)| weight.at([ch, t]).to_f32())
        .collect();
    let bias: Vec<f32> = (0..c).map(|ch| bias.at([ch]).to_f32()).collect();
    let mut xf: Vec<f32> = Vec::new();
    let mut acc = vec![0f32; c];
    for (b, &len) in lens.iter().enumerate() {
        xf.clear();
        for i in 0..len {
            xf.extend(x.row([b, i, 0]).iter().map(|v| v.to_f32()));
        }
        for i in 0..d.tokens {
            let o = out.row_mut([b, i, 0]);
            if i >= len {
                o.iter_mut().for_each(|v| *v = T::from_f32(0.0));
                continue;
            }
            // Per channel: the bias, then the taps j = i + t - 3 inside the
            // row in order of t, each product and sum rounded (no fma).
            acc.copy_from_slice(&bias);
            for t in PADDING.saturating_sub(i)..KERNEL_SIZE.min(len + PADDING - i) {
                let j = i + t - PADDING;
                let (wt, xj) = (&w[t * c..(t + 1) * c], &xf[j * c..(j + 1) * c]);
                for ((a, &wv), &xv) in acc.iter_mut().zip(wt).zip(xj) {
                    *a += wv * xv;
                }
            }
            for ((v, &a), &centre) in o.iter_mut().zip(&acc).zip(&xf[i * c..(i + 1) * c]) {
                *v = T::from_f32(centre + a);
            }
        }
    }
    Ok(())
}
