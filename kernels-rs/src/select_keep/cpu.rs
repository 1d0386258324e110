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
        // Rank by logit descending, ties to the lower index; NaN below every
        // number, and -0.0 equal to +0.0 (the kernel's key does the same).
        let mut order: Vec<usize> = (0..nv).collect();
        order.sort_by(|&i, &j| rank_desc(x[i], x[j]).then(i.cmp(&j)));
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

/// Descending order of logits: NaN last, -0.0 == +0.0.
fn rank_desc(a: f32, b: f32) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
        (false, false) => (b + 0.0).total_cmp(&(a + 0.0)),
    }
}
