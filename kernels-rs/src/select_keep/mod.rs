//! select_keep: from the Visual Importance Predictor's logits to the kept
//! visual tokens (SPEC "GlimpsePrune / select_keep").
//!
//! Per row, with `p = sigmoid(logit)` over the row's `nv` visual tokens:
//! keep `p > t`; if a max ratio `r` is given and more than `floor(r * nv)`
//! pass, keep exactly the `floor(r * nv)` largest (the floor of the f64
//! product of `r` as the caller gave it, with no tolerance: `0.111 * 9009 =
//! 999.999` caps at 999, `0.7 * 10` at 7); if fewer than `min_keep` are
//! kept, add the largest until `min(min_keep, nv)` are.
//!
//! Every kept set above is the top-`n` of the row for the `n` the rules give
//! (the tokens over the threshold are exactly the largest ones), so the op
//! counts `n` and selects the top `n`. Ranking and thresholding are done on
//! the logits, not on `p`: sigmoid is strictly increasing, so the order is the
//! same, but in f32 it saturates (every logit above ~17 gives `p = 1.0`) and
//! would turn distinct logits into ties. Ties go to the lower index (-0.0 ties
//! with +0.0); a NaN logit ranks below every number, -inf included, and never
//! passes the threshold.
//!
//! Out: the kept indices ascending, padded with -1, and the count per row.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};
use crate::rows::RowLayout;

pub(crate) const OP: &str = "select_keep";

/// The keep rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeepRule {
    /// Keep `sigmoid(logit) > threshold` (strict). In `[0, 1]`; default 0.5.
    pub threshold: f32,
    /// Keep at most `floor(max_ratio * nv)` tokens (then exactly that many),
    /// the floor of the f64 product. In `[0, 1]`.
    pub max_ratio: Option<f64>,
    /// Keep at least `min(min_keep, nv)` tokens. Default 1.
    pub min_keep: usize,
}

impl Default for KeepRule {
    fn default() -> Self {
        KeepRule {
            threshold: 0.5,
            max_ratio: None,
            min_keep: 1,
        }
    }
}

impl KeepRule {
    /// A rule that keeps every visual token (for checking a pruned model
    /// against the dense one).
    pub fn keep_all() -> Self {
        KeepRule {
            threshold: 0.0,
            max_ratio: None,
            min_keep: usize::MAX,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        ensure((0.0..=1.0).contains(&self.threshold), || {
            Error::value(
                OP,
                "threshold",
                format!("{} is outside [0, 1]", self.threshold),
            )
        })?;
        if let Some(r) = self.max_ratio {
            ensure((0.0..=1.0).contains(&r), || {
                Error::value(OP, "max_ratio", format!("{r} is outside [0, 1]"))
            })?;
        }
        Ok(())
    }

    /// The threshold as a logit: `sigmoid(x) > t  <=>  x > ln(t / (1 - t))`,
    /// computed in f64 (t = 0 gives -inf, t = 1 gives +inf).
    pub(crate) fn threshold_logit(&self) -> f64 {
        let t = self.threshold as f64;
        (t / (1.0 - t)).ln()
    }

    /// How many tokens a row with `nv` visual tokens, `above` of them over the
    /// threshold, keeps.
    pub(crate) fn count(&self, nv: usize, above: usize) -> usize {
        let mut n = above;
        if let Some(r) = self.max_ratio {
            n = n.min(ratio_cap(r, nv));
        }
        n.max(self.min_keep.min(nv))
    }
}

/// `floor(r * nv)`: the floor of the f64 product, with no tolerance (as the
/// authors' code computes `int(r * nv)` in Python floats). `r` is carried as
/// the caller's f64, so `0.7 * 10` is exactly 7 while `0.111 * 9009 =
/// 999.999` floors to 999. The kernel computes the same f64 expression.
pub(crate) fn ratio_cap(r: f64, nv: usize) -> usize {
    (r * nv as f64).floor() as usize
}

/// The kept visual indices of a batch on the host: `idx [B, nv_max]`
/// ascending and padded with -1, `count [B]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepSet {
    pub(crate) layout_id: u64,
    pub(crate) nv_max: usize,
    pub(crate) idx: Vec<i32>,
    pub(crate) count: Vec<i32>,
}

impl KeepSet {
    /// An empty keep set sized for `rows`, to be filled by select_keep.
    pub fn new(rows: &RowLayout) -> Self {
        KeepSet {
            layout_id: 0,
            nv_max: rows.nv_max(),
            idx: vec![-1; rows.batch() * rows.nv_max()],
            count: vec![0; rows.batch()],
        }
    }

    /// A keep set given directly (a selection made elsewhere): per row the
    /// kept visual indices, strictly ascending and below the row's count.
    pub fn from_rows(rows: &RowLayout, kept: &[Vec<usize>]) -> Result<Self> {
        const WHAT: &str = "KeepSet::from_rows";
        ensure(kept.len() == rows.batch(), || {
            Error::shape(
                WHAT,
                "kept",
                format!("{} rows for a batch of {}", kept.len(), rows.batch()),
            )
        })?;
        let mut set = KeepSet::new(rows);
        for (b, row) in kept.iter().enumerate() {
            for (j, &i) in row.iter().enumerate() {
                ensure(i < rows.nv(b), || {
                    Error::index(
                        WHAT,
                        "kept",
                        format!(
                            "row {b}: index {i} is not below its {} visual tokens",
                            rows.nv(b)
                        ),
                    )
                })?;
                ensure(j == 0 || row[j - 1] < i, || {
                    Error::value(
                        WHAT,
                        "kept",
                        format!("row {b}: indices must be strictly ascending (index {j})"),
                    )
                })?;
                set.idx[b * set.nv_max + j] = i as i32;
            }
            set.count[b] = row.len() as i32;
        }
        set.layout_id = rows.id();
        Ok(set)
    }

    /// Rows, `B`.
    pub fn batch(&self) -> usize {
        self.count.len()
    }

    /// The kept visual indices of row `b`, ascending. Panics when `b >= batch()`.
    pub fn kept(&self, b: usize) -> &[i32] {
        &self.idx[b * self.nv_max..b * self.nv_max + self.count[b] as usize]
    }

    /// Padded index array `[B, nv_max]` and counts `[B]`.
    pub fn packed(&self) -> (&[i32], &[i32]) {
        (&self.idx, &self.count)
    }

    /// Checks that this set was filled by select_keep from `rows`.
    pub(crate) fn check_from(&self, op: &'static str, rows: &RowLayout) -> Result<()> {
        ensure(self.layout_id == rows.id(), || {
            Error::value(
                op,
                "keep",
                "this keep set was not computed by select_keep from the same row layout",
            )
        })
    }
}

/// Checks the logits shape `[B, nv_max]` and the output's size against `rows`.
pub(crate) fn check(
    logits: [usize; 2],
    rows: &RowLayout,
    rule: &KeepRule,
    keep_nv_max: usize,
    keep_batch: usize,
) -> Result<()> {
    rule.check()?;
    ensure(logits == [rows.batch(), rows.nv_max()], || {
        Error::shape(
            OP,
            "logits",
            format!(
                "shape {logits:?}, expected {:?}",
                [rows.batch(), rows.nv_max()]
            ),
        )
    })?;
    ensure(
        keep_nv_max == rows.nv_max() && keep_batch == rows.batch(),
        || Error::shape(OP, "keep", "the keep set was sized for another row layout"),
    )
}
