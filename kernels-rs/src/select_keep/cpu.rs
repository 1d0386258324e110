//! CPU reference of select_keep.

use super::{check, KeepRule, KeepSet};
use crate::error::Result;
use crate::layout::View;
use crate::rows::RowLayout;

/// Fills `keep` with the kept visual tokens of every row (see the module docs).
pub fn select_keep(logits: View<'_, f32, 2>, rows: &RowLayout, rule: &KeepRule, keep: &mut KeepSet) -> Result<()> {
    check(logits.shape(), rows, rule, keep.nv_max, keep.batch())?;
    let t = rule.threshold_logit();
    for b in 0..rows.batch() {
        let nv = rows.nv(b);
        let x: Vec<f32> = (0..nv).map(|i| logits.at([b, i])).collect();
        let above = x.iter().filter(|&&v| v as f64 > t).count();
        let n = rule.count(nv, above);
        // Rank by logit descending, ties to the lower index. NaN ranks as -inf
        // and -0.0 as +0.0, so that equal numbers tie (the kernel does the same).
        let key = |i: usize| if x[i].is_nan() { f32::NEG_INFINITY } else { x[i] + 0.0 };
        let mut order: Vec<usize> = (0..nv).collect();
        order.sort_by(|&i, &j| key(j).total_cmp(&key(i)).then(i.cmp(&j)));
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
