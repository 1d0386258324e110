//! The ragged row layout of a batch: each row's valid key range and the
//! sequence positions of its visual tokens.
//!
//! Rows are ragged (SPEC "Conventions"): row `b` holds valid entries at
//! positions `start[b]..end[b]` of a cache of capacity `seq` (`start > 0` for a
//! left-padded row). Its visual tokens sit at `visual[b]`, strictly ascending,
//! and may be interleaved with text (several images). A `RowLayout` is checked
//! once when it is built; the ops then trust it, so the kernels never see an
//! out-of-range position.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{ensure, Error, Result};

/// One row of a batch, as the caller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSpec {
    /// First valid position.
    pub start: usize,
    /// One past the last valid position.
    pub end: usize,
    /// Sequence positions of the visual tokens, strictly ascending, in `start..end`.
    pub visual: Vec<usize>,
}

/// A validated batch layout. Padded arrays use -1 past each row's count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    id: u64,
    seq: usize,
    start: Vec<i32>,
    end: Vec<i32>,
    nv: Vec<i32>,
    nv_max: usize,
    vis_pos: Vec<i32>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl RowLayout {
    /// Checks and packs `rows` for a cache of capacity `seq` positions.
    /// Every row must be non-empty.
    pub fn new(seq: usize, rows: &[RowSpec]) -> Result<Self> {
        const OP: &str = "RowLayout::new";
        ensure(!rows.is_empty(), || {
            Error::shape(OP, "rows", "the batch is empty")
        })?;
        ensure(seq <= i32::MAX as usize, || {
            Error::value(OP, "seq", format!("{seq} exceeds i32::MAX"))
        })?;
        let nv_max = rows.iter().map(|r| r.visual.len()).max().unwrap_or(0);
        let mut layout = RowLayout {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            seq,
            start: Vec::with_capacity(rows.len()),
            end: Vec::with_capacity(rows.len()),
            nv: Vec::with_capacity(rows.len()),
            nv_max,
            vis_pos: vec![-1; rows.len() * nv_max],
        };
        for (b, r) in rows.iter().enumerate() {
            ensure(r.start < r.end && r.end <= seq, || {
                Error::index(
                    OP,
                    "rows",
                    format!(
                        "row {b}: valid range {}..{} is empty or outside 0..{seq}",
                        r.start, r.end
                    ),
                )
            })?;
            for (i, &p) in r.visual.iter().enumerate() {
                ensure(p >= r.start && p < r.end, || {
                    Error::index(
                        OP,
                        "visual",
                        format!(
                            "row {b}: visual token {i} at position {p} is outside {}..{}",
                            r.start, r.end
                        ),
                    )
                })?;
                ensure(i == 0 || r.visual[i - 1] < p, || {
                    Error::value(
                        OP,
                        "visual",
                        format!("row {b}: visual positions must be strictly ascending (index {i})"),
                    )
                })?;
                layout.vis_pos[b * nv_max + i] = p as i32;
            }
            layout.start.push(r.start as i32);
            layout.end.push(r.end as i32);
            layout.nv.push(r.visual.len() as i32);
        }
        Ok(layout)
    }

    /// Identity of this layout, recorded by results derived from it so that
    /// they cannot be combined with another layout.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Rows in the batch, `B`.
    pub fn batch(&self) -> usize {
        self.start.len()
    }

    /// Capacity of the cache the positions index.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// The largest visual-token count of any row: the padded width of
    /// per-visual-token tensors.
    pub fn nv_max(&self) -> usize {
        self.nv_max
    }

    /// First valid position of row `b`. Panics when `b >= batch()`.
    pub fn start(&self, b: usize) -> usize {
        self.start[b] as usize
    }

    /// One past the last valid position of row `b`. Panics when `b >= batch()`.
    pub fn end(&self, b: usize) -> usize {
        self.end[b] as usize
    }

    /// Valid positions of row `b`, `end - start`. Panics when `b >= batch()`.
    pub fn len(&self, b: usize) -> usize {
        self.end(b) - self.start(b)
    }

    /// Visual tokens of row `b`. Panics when `b >= batch()`.
    pub fn nv(&self, b: usize) -> usize {
        self.nv[b] as usize
    }

    /// The visual positions of row `b`. Panics when `b >= batch()`.
    pub fn visual(&self, b: usize) -> &[i32] {
        &self.vis_pos[b * self.nv_max..b * self.nv_max + self.nv(b)]
    }

    /// Packed arrays as the kernels take them: start `[B]`, end `[B]`,
    /// nv `[B]`, visual positions `[B, nv_max]` (padded with -1).
    pub fn packed(&self) -> (&[i32], &[i32], &[i32], &[i32]) {
        (&self.start, &self.end, &self.nv, &self.vis_pos)
    }

    /// The largest row length: an upper bound on any row after compaction.
    pub fn max_len(&self) -> usize {
        (0..self.batch()).map(|b| self.len(b)).max().unwrap_or(0)
    }
}
