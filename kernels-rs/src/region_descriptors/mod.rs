//! region_descriptors: Gaze Attention's region descriptors (SPEC "Gaze
//! Attention / region_descriptors", the paper's Section 3.2).
//!
//! In: one layer's keys `k [B, S, Hkv, D]` (any memory order, head dim
//! contiguous), a [`GazeLayout`], and the range of region ids to compute.
//! Out: `desc [B, Hkv, R, D]` f32 (`R >= layout.max_regions()`), where
//! `desc[b, h, r] = mean over the tokens p of region r of k[b, p, h]`,
//! accumulated in f32. Only regions `range.start..min(range.end, regions(b))`
//! of each row are written, so a new frame's regions are computed without
//! touching the old ones (incremental).
//!
//! Descriptors are f32 whatever the key type: they are small (`R x D` per KV
//! head) and route_topk ranks dot products with them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use std::ops::Range;

use crate::error::{ensure, Error, Result};
use crate::gaze_layout::GazeLayout;

pub(crate) const OP: &str = "region_descriptors";

/// The sizes of one call, after validation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub regions: Range<usize>,
}

/// Checks k `[B, S, Hkv, D]`, the layout, the region range and desc
/// `[B, Hkv, R, D]`.
pub(crate) fn check(
    k: [usize; 4],
    layout: &GazeLayout,
    regions: &Range<usize>,
    desc: [usize; 4],
) -> Result<Dims> {
    let [b, s, hkv, d] = k;
    ensure(layout.batch() == b, || {
        Error::shape(OP, "layout", format!("{} rows, k has {b}", layout.batch()))
    })?;
    ensure(layout.seq() <= s, || {
        Error::index(
            OP,
            "layout",
            format!("positions index a cache of {}, k holds {s}", layout.seq()),
        )
    })?;
    ensure(regions.start <= regions.end, || {
        Error::value(OP, "regions", format!("{regions:?} is reversed"))
    })?;
    ensure(
        desc[0] == b && desc[1] == hkv && desc[3] == d && desc[2] >= layout.max_regions(),
        || {
            Error::shape(
                OP,
                "desc",
                format!(
                    "shape {desc:?}, expected [{b}, {hkv}, >= {}, {d}]",
                    layout.max_regions()
                ),
            )
        },
    )?;
    ensure(d <= i32::MAX as usize && hkv <= i32::MAX as usize, || {
        Error::Unsupported {
            op: OP,
            msg: "sizes past 32-bit indices".into(),
        }
    })?;
    let regions = regions.start.min(layout.max_regions())..regions.end.min(layout.max_regions());
    Ok(Dims {
        batch: b,
        kv_heads: hkv,
        head_dim: d,
        regions,
    })
}
