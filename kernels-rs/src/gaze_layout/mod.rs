//! The layout Gaze Attention's ops share (SPEC "Gaze Attention"): per batch
//! row, the always-visible key ranges and the regions of its visual units, and
//! the routes (selected regions) derived from it.
//!
//! A visual unit (an image or a video frame) is an `h x w` grid of tokens at a
//! known place in the sequence. Regions are `rh x rw` tiles of that grid,
//! optionally spanning `rt` consecutive frames, in raster order (frame group,
//! then tile row, then tile column); border regions are smaller. A region
//! lists the sequence positions of its tokens (frame, then row, then column),
//! so units need not be contiguous with each other (context tokens sit between
//! frames). Everything a decode query always sees (system prompt, question,
//! generated text, context tokens) is a list of visible ranges.
//!
//! [`GazeLayout::new`] checks every position once (inside the cache, and no
//! position both visible and in a region, or in two regions: the decode
//! softmax would count it twice); the ops then trust it, so the kernels never
//! see an out-of-range position. Region ids only grow: appending a frame
//! ([`GazeRow::push_units`]) adds regions after the existing ones, and
//! decoding extends the visible tail ([`GazeLayout::extend_visible`]).

#[cfg(feature = "cuda")]
pub mod cuda;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{ensure, Error, Result};

/// Region size in frames x rows x columns of the unit grid (default 1 x 6 x 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionShape {
    /// Consecutive frames a region spans (1 for images).
    pub frames: usize,
    /// Rows of the unit's token grid per region.
    pub height: usize,
    /// Columns of the unit's token grid per region.
    pub width: usize,
}

impl Default for RegionShape {
    fn default() -> Self {
        RegionShape {
            frames: 1,
            height: 6,
            width: 6,
        }
    }
}

/// One batch row as the caller describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GazeRow {
    /// Always-visible key ranges.
    pub visible: Vec<Range<usize>>,
    /// Each region's token positions.
    pub regions: Vec<Vec<usize>>,
}

impl GazeRow {
    /// A row with nothing visible and no region.
    pub fn new() -> Self {
        GazeRow::default()
    }

    /// Adds an always-visible range, merged with the last one when adjacent.
    pub fn push_visible(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        match self.visible.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => self.visible.push(range),
        }
    }

    /// Adds the regions of consecutive frames of one `height x width` grid:
    /// frame `f`'s token `(y, x)` sits at `frames[f] + y * width + x` (one
    /// image is one frame). Frames are grouped `shape.frames` at a time, the
    /// last group possibly shorter. Returns the new regions' ids.
    pub fn push_units(
        &mut self,
        frames: &[usize],
        height: usize,
        width: usize,
        shape: RegionShape,
    ) -> Result<Range<usize>> {
        const WHAT: &str = "GazeRow::push_units";
        ensure(
            shape.frames > 0 && shape.height > 0 && shape.width > 0,
            || Error::value(WHAT, "shape", format!("{shape:?} has an empty side")),
        )?;
        ensure(height > 0 && width > 0, || {
            Error::value(WHAT, "grid", format!("{height} x {width} grid is empty"))
        })?;
        // Every position must fit the layout's 32-bit positions (checked here,
        // before any sum can overflow).
        let cells = height.checked_mul(width);
        for &base in frames {
            ensure(
                cells
                    .and_then(|c| base.checked_add(c))
                    .is_some_and(|e| e <= i32::MAX as usize),
                || Error::Unsupported {
                    op: WHAT,
                    msg: format!(
                        "a {height} x {width} grid at position {base} passes 32-bit positions"
                    ),
                },
            )?;
        }
        let first = self.regions.len();
        for group in frames.chunks(shape.frames) {
            for y0 in (0..height).step_by(shape.height) {
                for x0 in (0..width).step_by(shape.width) {
                    let mut region = Vec::new();
                    for &base in group {
                        for y in y0..(y0 + shape.height).min(height) {
                            region.extend(
                                (x0..(x0 + shape.width).min(width)).map(|x| base + y * width + x),
                            );
                        }
                    }
                    self.regions.push(region);
                }
            }
        }
        Ok(first..self.regions.len())
    }
}

/// A validated batch of [`GazeRow`]s over a cache of capacity `seq`. Padded
/// arrays use -1 (positions) and 0 (lengths) past each row's counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GazeLayout {
    id: u64,
    seq: usize,
    /// One past the largest position of each row.
    end: Vec<usize>,
    region_count: Vec<i32>,
    max_regions: usize,
    max_region_len: usize,
    region_len: Vec<i32>,
    region_pos: Vec<i32>,
    visible_count: Vec<i32>,
    max_visible: usize,
    visible: Vec<i32>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl GazeLayout {
    /// Checks and packs `rows` for a cache of capacity `seq` positions.
    pub fn new(seq: usize, rows: &[GazeRow]) -> Result<Self> {
        const OP: &str = "GazeLayout::new";
        ensure(!rows.is_empty(), || {
            Error::shape(OP, "rows", "the batch is empty")
        })?;
        ensure(seq <= i32::MAX as usize, || {
            Error::value(OP, "seq", format!("{seq} exceeds i32::MAX"))
        })?;
        let max_regions = rows.iter().map(|r| r.regions.len()).max().unwrap_or(0);
        let max_region_len = rows
            .iter()
            .flat_map(|r| r.regions.iter().map(Vec::len))
            .max()
            .unwrap_or(0);
        let max_visible = rows.iter().map(|r| r.visible.len()).max().unwrap_or(0);
        let batch = rows.len();
        let mut layout = GazeLayout {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            seq,
            end: vec![0; batch],
            region_count: vec![0; batch],
            max_regions,
            max_region_len,
            region_len: vec![0; batch * max_regions],
            region_pos: vec![-1; batch * max_regions * max_region_len],
            visible_count: vec![0; batch],
            max_visible,
            visible: vec![0; batch * max_visible * 2],
        };
        let mut seen = vec![false; seq];
        for (b, row) in rows.iter().enumerate() {
            seen.iter_mut().for_each(|s| *s = false);
            let mut claim = |p: usize, what: &dyn Fn() -> String| -> Result<()> {
                ensure(p < seq, || {
                    Error::index(
                        OP,
                        "rows",
                        format!(
                            "row {b}: {} at position {p} is outside the cache of {seq}",
                            what()
                        ),
                    )
                })?;
                ensure(!seen[p], || {
                    Error::value(
                        OP,
                        "rows",
                        format!("row {b}: position {p} ({}) is listed twice", what()),
                    )
                })?;
                seen[p] = true;
                Ok(())
            };
            for (i, r) in row.visible.iter().enumerate() {
                ensure(!r.is_empty(), || {
                    Error::value(
                        OP,
                        "visible",
                        format!("row {b}: range {i} ({r:?}) is empty"),
                    )
                })?;
                for p in r.clone() {
                    claim(p, &|| format!("visible range {i}"))?;
                }
                layout.visible[(b * max_visible + i) * 2] = r.start as i32;
                layout.visible[(b * max_visible + i) * 2 + 1] = r.end as i32;
            }
            for (j, region) in row.regions.iter().enumerate() {
                ensure(!region.is_empty(), || {
                    Error::value(OP, "regions", format!("row {b}: region {j} is empty"))
                })?;
                for (t, &p) in region.iter().enumerate() {
                    claim(p, &|| format!("region {j}"))?;
                    layout.region_pos[(b * max_regions + j) * max_region_len + t] = p as i32;
                }
                layout.region_len[b * max_regions + j] = region.len() as i32;
            }
            layout.end[b] = seen.iter().rposition(|&s| s).map_or(0, |p| p + 1);
            layout.region_count[b] = row.regions.len() as i32;
            layout.visible_count[b] = row.visible.len() as i32;
        }
        Ok(layout)
    }

    /// Makes `end` the row's new length: positions from the row's current
    /// end up to `end` (generated tokens) become visible, and the cache
    /// capacity grows to `end` where it was smaller (a decode step's cache
    /// holds one entry more). Keeps the layout's identity (region ids and
    /// routes stay valid).
    pub fn extend_visible(&mut self, b: usize, end: usize) -> Result<()> {
        const OP: &str = "GazeLayout::extend_visible";
        ensure(b < self.batch(), || {
            Error::index(OP, "b", format!("row {b} of a batch of {}", self.batch()))
        })?;
        ensure(end <= i32::MAX as usize, || {
            Error::index(OP, "end", format!("{end} exceeds i32::MAX"))
        })?;
        let old = self.end[b];
        ensure(end >= old, || {
            Error::value(
                OP,
                "end",
                format!("row {b}: {end} is before the row's end {old}"),
            )
        })?;
        if end == old {
            return Ok(());
        }
        let n = self.visible_count[b] as usize;
        if n > 0 && self.visible[(b * self.max_visible + n - 1) * 2 + 1] as usize == old {
            self.visible[(b * self.max_visible + n - 1) * 2 + 1] = end as i32;
        } else {
            if n == self.max_visible {
                self.widen_visible();
            }
            let at = (b * self.max_visible + n) * 2;
            self.visible[at] = old as i32;
            self.visible[at + 1] = end as i32;
            self.visible_count[b] += 1;
        }
        self.end[b] = end;
        self.seq = self.seq.max(end);
        Ok(())
    }

    fn widen_visible(&mut self) {
        let (old, new) = (self.max_visible, self.max_visible + 1);
        let mut visible = vec![0; self.batch() * new * 2];
        for b in 0..self.batch() {
            visible[b * new * 2..][..old * 2]
                .copy_from_slice(&self.visible[b * old * 2..][..old * 2]);
        }
        self.visible = visible;
        self.max_visible = new;
    }

    /// Identity of this layout, recorded by routes derived from it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Rows, `B`.
    pub fn batch(&self) -> usize {
        self.region_count.len()
    }

    /// Capacity of the cache the positions index.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// One past the largest position row `b` uses. Panics when `b >= batch()`.
    pub fn end(&self, b: usize) -> usize {
        self.end[b]
    }

    /// Regions of row `b`. Panics when `b >= batch()`.
    pub fn regions(&self, b: usize) -> usize {
        self.region_count[b] as usize
    }

    /// The largest region count of any row: the padded width of descriptors.
    pub fn max_regions(&self) -> usize {
        self.max_regions
    }

    /// The most tokens of any region.
    pub fn max_region_len(&self) -> usize {
        self.max_region_len
    }

    /// The most visible ranges of any row.
    pub fn max_visible(&self) -> usize {
        self.max_visible
    }

    /// Token positions of region `r` of row `b`. Panics when `b >= batch()`
    /// or `r >= max_regions()`; empty for `regions(b) <= r < max_regions()`.
    pub fn region(&self, b: usize, r: usize) -> &[i32] {
        let at = (b * self.max_regions + r) * self.max_region_len;
        &self.region_pos[at..at + self.region_len[b * self.max_regions + r] as usize]
    }

    /// The visible ranges of row `b`. Panics when `b >= batch()`.
    pub fn visible(&self, b: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        let at = b * self.max_visible * 2;
        self.visible[at..at + self.visible_count[b] as usize * 2]
            .chunks_exact(2)
            .map(|r| r[0] as usize..r[1] as usize)
    }

    /// Always-visible keys of row `b`.
    pub fn visible_len(&self, b: usize) -> usize {
        self.visible(b).map(|r| r.len()).sum()
    }

    /// Packed arrays as the kernels take them: region count `[B]`, region
    /// length `[B, R_max]`, region positions `[B, R_max, P_max]`.
    pub fn packed_regions(&self) -> (&[i32], &[i32], &[i32]) {
        (&self.region_count, &self.region_len, &self.region_pos)
    }

    /// Packed visible ranges: count `[B]`, `(start, end)` pairs `[B, V_max, 2]`.
    pub fn packed_visible(&self) -> (&[i32], &[i32]) {
        (&self.visible_count, &self.visible)
    }
}

/// Selected regions per (row, query, query head): `[B, Nq, Hq, k]` region ids,
/// strictly ascending, padded with -1. Made by route_topk, or checked by
/// [`Routes::from_ids`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    pub(crate) layout_id: u64,
    pub(crate) shape: [usize; 4],
    pub(crate) ids: Vec<i32>,
}

impl Routes {
    /// Routes `[B, queries, heads, k]` for `layout`, all -1, to be filled by
    /// route_topk.
    ///
    /// # Panics
    /// Like `vec!`, when `B x queries x heads x k` ids do not fit in memory.
    pub fn new(layout: &GazeLayout, queries: usize, heads: usize, k: usize) -> Self {
        let shape = [layout.batch(), queries, heads, k];
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        Routes {
            layout_id: 0,
            shape,
            ids: vec![-1; len.expect("routes larger than the address space")],
        }
    }

    /// Routes given directly, `[B, queries, heads, k]` row-major: each
    /// `k`-list strictly ascending region ids of its row, then -1 padding.
    pub fn from_ids(
        layout: &GazeLayout,
        queries: usize,
        heads: usize,
        k: usize,
        ids: &[i32],
    ) -> Result<Self> {
        const WHAT: &str = "Routes::from_ids";
        let shape = [layout.batch(), queries, heads, k];
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        ensure(len == Some(ids.len()), || {
            Error::shape(
                WHAT,
                "ids",
                format!("{} ids for routes {shape:?}", ids.len()),
            )
        })?;
        for (i, list) in ids.chunks(k.max(1)).enumerate() {
            let b = i / (queries * heads).max(1);
            let regions = layout.regions(b) as i32;
            let valid = list.iter().take_while(|&&r| r >= 0).count();
            ensure(list[valid..].iter().all(|&r| r == -1), || {
                Error::value(
                    WHAT,
                    "ids",
                    format!("route list {i}: -1 padding must come last, and only -1"),
                )
            })?;
            for (j, &r) in list[..valid].iter().enumerate() {
                ensure(r < regions, || {
                    Error::index(
                        WHAT,
                        "ids",
                        format!("route list {i}: region {r} of a row with {regions}"),
                    )
                })?;
                ensure(j == 0 || list[j - 1] < r, || {
                    Error::value(
                        WHAT,
                        "ids",
                        format!("route list {i}: ids must be strictly ascending"),
                    )
                })?;
            }
        }
        Ok(Routes {
            layout_id: layout.id(),
            shape,
            ids: ids.to_vec(),
        })
    }

    /// `[B, Nq, Hq, k]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The selected regions of (row `b`, query `n`, head `h`), ascending.
    /// Panics when an index is past [`shape`](Self::shape).
    pub fn get(&self, b: usize, n: usize, h: usize) -> &[i32] {
        let [_, nq, hq, k] = self.shape;
        let list = &self.ids[((b * nq + n) * hq + h) * k..][..k];
        &list[..list.iter().take_while(|&&r| r >= 0).count()]
    }

    /// All ids, `[B, Nq, Hq, k]` row-major.
    pub fn ids(&self) -> &[i32] {
        &self.ids
    }

    pub(crate) fn check_from(&self, op: &'static str, layout: &GazeLayout) -> Result<()> {
        ensure(self.layout_id == layout.id(), || {
            Error::value(op, "routes", "these routes were not computed by route_topk (or checked by Routes::from_ids) for the same layout")
        })
    }
}
