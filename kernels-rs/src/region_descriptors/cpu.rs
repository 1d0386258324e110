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
    let mut acc = vec![0f32; d.head_dim];
    for b in 0..d.batch {
        for r in d.regions.start..d.regions.end.min(layout.regions(b)) {
            let tokens = layout.region(b, r);
            for h in 0..d.kv_heads {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for &p in tokens {
                    for (a, x) in acc.iter_mut().zip(k.row([b, p as usize, h, 0])) {
                        *a += x.to_f32();
                    }
                }
                let inv = 1.0 / tokens.len() as f32;
                for (o, a) in desc.row_mut([b, h, r, 0]).iter_mut().zip(&acc) {
                    *o = a * inv;
                }
            }
        }
    }
    Ok(())
}
