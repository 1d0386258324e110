//! CPU reference of region_descriptors: plain loops, f32 sums.

use std::ops::Range;

use super::check;
use crate::dtype::Element;
use crate::error::Result;
use crate::gaze_layout::GazeLayout;
use crate::layout::{View, ViewMut};

/// Writes the mean key of regions `regions` of each row into `desc
/// [B, Hkv, R, D]` (module docs); other regions are left as they are.
pub fn region_descriptors<T: Element>(
    k: View<'_, T, 4>,
    layout: &GazeLayout,
    regions: Range<usize>,
    desc: &mut ViewMut<'_, f32, 4>,
) -> Result<()> {
    let d = check(k.shape(), layout, &regions, desc.shape())?;
    // One pass over each region's tokens for every KV head at once: a token's
    // heads are adjacent in the [B, S, Hkv, D] order and the row reads stay
    // sequential in the [B, Hkv, S, D] one.
    if desc.layout().numel() == 0 {
        // Nothing to write (a head dimension of 0 included), and no scratch
        // for sizes that only empty tensors have.
        return Ok(());
    }
    let (hkv, hd) = (d.kv_heads, d.head_dim);
    let mut acc = vec![0f32; hkv * hd];
    for b in 0..d.batch {
        for r in d.regions.start..d.regions.end.min(layout.regions(b)) {
            let tokens = layout.region(b, r);
            acc.iter_mut().for_each(|a| *a = 0.0);
            for &p in tokens {
                for (h, acc_h) in acc.chunks_exact_mut(hd).enumerate() {
                    for (a, x) in acc_h.iter_mut().zip(k.row([b, p as usize, h, 0])) {
                        *a += x.to_f32();
                    }
                }
            }
            let inv = 1.0 / tokens.len() as f32;
            for (h, acc_h) in acc.chunks_exact(hd).enumerate() {
                for (o, a) in desc.row_mut([b, h, r, 0]).iter_mut().zip(acc_h) {
                    *o = a * inv;
                }
            }
        }
    }
    Ok(())
}
