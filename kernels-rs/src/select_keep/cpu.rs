//! CPU reference of select_keep.

use std::cmp::Reverse;

use super::{check, KeepRule, KeepSet};
use crate::error::Result;
use crate::layout::View;
use crate::rows::RowLayout;

/// Fills `keep` with the kept visual tokens of every row (see the module docs).
pub fn select_keep(
    logits: View<'_, f32, 2>,
    rows: &RowLayout,
    rule: &KeepRule,
    keep: &mut KeepSet,
) -> Result<()> {
    check(logits.shape(), rows, rule, keep.nv_max, keep.batch())?;
    let t = rule.threshold_logit();
    for b in 0..rows.batch() {
        let nv = rows.nv(b);
        let x: Vec<f32> = (0..nv).map(|i| logits.at([b, i])).collect();
        let above = x.iter().filter(|&&v| v as f64 > t).count();
        let n = rule.count(nv, above);
        // The n largest by (key descending, index ascending).
        let keys: Vec<u32> = x.iter().map(|&v| rank_key(v)).collect();
        let mut order: Vec<usize> = (0..nv).collect();
        if n < nv {
            order.select_nth_unstable_by_key(n, |&i| (Reverse(keys[i]), i));
        }
        let mut kept = order[..n].to_vec();
        kept.sort_unstable();
        let row = &mut keep.idx[b * keep.nv_max..(b + 1) * keep.nv_max];
        row.fill(-1);
        for (slot, &i) in row.iter_mut().zip(&kept) {
            *slot = i as i32;
        }
        keep.count[b] = n as i32;
    }
    keep.layout_id = rows.id();
    Ok(())
}

/// Order-preserving key of a logit: a larger logit has a larger key; -0.0
/// ties with +0.0 and NaN takes 0, below every number (-inf's key is
/// 0x007f_ffff). The kernel uses the same key.
pub(crate) fn rank_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let bits = (x + 0.0).to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}
