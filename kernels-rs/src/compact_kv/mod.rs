//! compact_kv: one-shot compaction of the KV caches of every layer before the
//! pruning layer, and the same gather for hidden states and position ids
//! (SPEC "GlimpsePrune / compact_kv").
//!
//! A [`KeepPositions`] lists, per row, the ascending sequence positions to keep
//! (all text, the kept visual tokens; the glimpse token dropped). Compaction
//! moves entry `positions[b][j]` of every source plane to slot `j` of the
//! destination (right padding) or to slot `S_dst - len[b] + j` (left padding),
//! and zeroes every other slot. Kept tokens keep their original RoPE
//! positions: the keys in the cache are already rotated, and the position ids
//! are gathered by the same op, not recomputed.
//!
//! The positions are checked when they are built (on the host from lists, or
//! by [`cpu::keep_positions`] / its CUDA twin from a [`RowLayout`] and a
//! [`KeepSet`](crate::KeepSet)), so the gather never reads out of its source.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};
use crate::rows::RowLayout;

pub(crate) const OP: &str = "compact_kv";

/// Which side of a compacted row the unused slots go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// Kept entries first, zeros after (the default).
    #[default]
    Right,
    /// Zeros first, kept entries last (GlimpsePrune's batched code).
    Left,
}

/// Per row, the ascending source positions to keep: `positions [B, width]`
/// padded with -1, `lengths [B]`. Every position is below `src_seq`; every
/// length is at most `max_len`, the bound a destination capacity is checked
/// against (exact on the host; on the device `width` until the caller reads
/// the lengths back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepPositions {
    pub(crate) src_seq: usize,
    pub(crate) width: usize,
    pub(crate) max_len: usize,
    pub(crate) positions: Vec<i32>,
    pub(crate) lengths: Vec<i32>,
}

impl KeepPositions {
    /// From explicit lists; each must be strictly ascending and below `src_seq`
    /// (at most `i32::MAX`: positions are 32-bit, as in a [`RowLayout`]).
    pub fn from_rows(src_seq: usize, rows: &[Vec<usize>]) -> Result<Self> {
        const WHAT: &str = "KeepPositions::from_rows";
        ensure(!rows.is_empty(), || {
            Error::shape(WHAT, "rows", "the batch is empty")
        })?;
        ensure(src_seq <= i32::MAX as usize, || {
            Error::value(WHAT, "src_seq", format!("{src_seq} exceeds i32::MAX"))
        })?;
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut kp = KeepPositions {
            src_seq,
            width,
            max_len: width,
            positions: vec![-1; rows.len() * width],
            lengths: Vec::new(),
        };
        for (b, row) in rows.iter().enumerate() {
            for (j, &p) in row.iter().enumerate() {
                ensure(p < src_seq, || {
                    Error::index(
                        WHAT,
                        "rows",
                        format!("row {b}: position {p} is not below {src_seq}"),
                    )
                })?;
                ensure(j == 0 || row[j - 1] < p, || {
                    Error::value(
                        WHAT,
                        "rows",
                        format!("row {b}: positions must be strictly ascending (index {j})"),
                    )
                })?;
                kp.positions[b * width + j] = p as i32;
            }
            kp.lengths.push(row.len() as i32);
        }
        Ok(kp)
    }

    /// An empty list sized for compacting `rows` (see [`cpu::keep_positions`]):
    /// `width` is the longest row, less the dropped glimpse token.
    pub fn for_rows(rows: &RowLayout, drop_last: bool) -> Self {
        let width = rows.max_len() - usize::from(drop_last);
        KeepPositions {
            src_seq: rows.seq(),
            width,
            max_len: 0,
            positions: vec![-1; rows.batch() * width],
            lengths: vec![0; rows.batch()],
        }
    }

    /// Rows, `B`.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// The padded width of the positions array: no row can be longer.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The longest row: the destination capacity compaction needs.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The source capacity the positions index.
    pub fn src_seq(&self) -> usize {
        self.src_seq
    }

    /// The kept positions of row `b`. Panics when `b >= batch()`.
    pub fn row(&self, b: usize) -> &[i32] {
        &self.positions[b * self.width..b * self.width + self.lengths[b] as usize]
    }

    /// Padded positions `[B, width]` and lengths `[B]`.
    pub fn packed(&self) -> (&[i32], &[i32]) {
        (&self.positions, &self.lengths)
    }
}

/// Checks a keep_positions call: `out` (its width, source capacity and
/// batch) must be what [`KeepPositions::for_rows`] gives for `rows` and
/// `drop_last`, and a dropped last position must not be a visual token.
pub(crate) fn check_keep_positions(
    rows: &RowLayout,
    drop_last: bool,
    out: (usize, usize, usize),
) -> Result<()> {
    const WHAT: &str = "keep_positions";
    let want = KeepPositions::for_rows(rows, drop_last);
    ensure(out == (want.width, want.src_seq, want.batch()), || {
        Error::shape(
            WHAT,
            "out",
            "sized for another row layout or drop_last (use for_rows)",
        )
    })?;
    for b in 0..rows.batch() {
        let last = rows.end(b) as i32 - 1;
        ensure(!drop_last || rows.visual(b).last() != Some(&last), || {
            Error::value(
                WHAT,
                "drop_last",
                format!("row {b}: the dropped last position {last} is a visual token"),
            )
        })?;
    }
    Ok(())
}

/// compact_kv's four cache lists: as many V as K layers, and one destination
/// per source.
pub(crate) fn check_layer_counts(
    k_src: usize,
    v_src: usize,
    k_dst: usize,
    v_dst: usize,
) -> Result<()> {
    ensure(k_src == v_src, || {
        Error::shape(
            OP,
            "v_src",
            format!("{v_src} V layers for {k_src} K layers"),
        )
    })?;
    ensure(k_dst == k_src, || {
        Error::shape(
            OP,
            "k_dst",
            format!("{k_dst} destinations for {k_src} K layers"),
        )
    })?;
    ensure(v_dst == v_src, || {
        Error::shape(
            OP,
            "v_dst",
            format!("{v_dst} destinations for {v_src} V layers"),
        )
    })
}

/// The shared shape of a set of planes `[B, S, H, W]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlaneDims {
    pub batch: usize,
    pub src_seq: usize,
    pub dst_seq: usize,
    pub heads: usize,
    pub width: usize,
}

/// Checks source and destination planes `[B, S, H, W]` against the keep
/// positions' `(batch, src_seq, max_len)`: all sources share one shape and
/// strides, all destinations likewise, and the destination holds the longest
/// compacted row.
pub(crate) fn check_planes<L: PartialEq + std::fmt::Debug>(
    op: &'static str,
    src: &[([usize; 4], L)],
    dst: &[([usize; 4], L)],
    (keep_batch, keep_src_seq, keep_max_len): (usize, usize, usize),
) -> Result<PlaneDims> {
    ensure(!src.is_empty(), || {
        Error::shape(op, "src", "no planes to compact")
    })?;
    ensure(src.len() == dst.len(), || {
        Error::shape(
            op,
            "dst",
            format!("{} destination planes for {} sources", dst.len(), src.len()),
        )
    })?;
    ensure(src.iter().all(|s| *s == src[0]), || {
        Error::shape(
            op,
            "src",
            "every source plane must share one shape and strides",
        )
    })?;
    ensure(dst.iter().all(|d| *d == dst[0]), || {
        Error::shape(
            op,
            "dst",
            "every destination plane must share one shape and strides",
        )
    })?;
    let [b, s, h, w] = src[0].0;
    let [db, ds, dh, dw] = dst[0].0;
    ensure(b == keep_batch, || {
        Error::shape(
            op,
            "src",
            format!("batch {b}, the keep positions have {}", keep_batch),
        )
    })?;
    ensure(s >= keep_src_seq, || {
        Error::shape(
            op,
            "src",
            format!(
                "sequence capacity {s}, the keep positions index up to {}",
                keep_src_seq
            ),
        )
    })?;
    ensure([db, dh, dw] == [b, h, w], || {
        Error::shape(
            op,
            "dst",
            format!(
                "shape {:?} does not match the source {:?}",
                dst[0].0, src[0].0
            ),
        )
    })?;
    ensure(ds >= keep_max_len, || {
        Error::shape(op, "dst", format!("sequence capacity {ds} cannot hold a compacted row of up to {keep_max_len} entries"))
    })?;
    Ok(PlaneDims {
        batch: b,
        src_seq: s,
        dst_seq: ds,
        heads: h,
        width: w,
    })
}

/// Source slot read by destination slot `j` of a row of length `len` in a
/// destination of capacity `dst_seq`; `None` for a padded slot.
#[inline]
pub(crate) fn source_slot(j: usize, len: usize, dst_seq: usize, padding: Padding) -> Option<usize> {
    match padding {
        Padding::Right => (j < len).then_some(j),
        Padding::Left => (j >= dst_seq - len).then(|| j - (dst_seq - len)),
    }
}
