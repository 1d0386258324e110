//! CPU reference of compact_kv, gather_rows and keep_positions.

use super::{
    check_keep_positions, check_layer_counts, check_planes, source_slot, KeepPositions, Padding, OP,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{View, ViewMut};
use crate::rows::RowLayout;
use crate::select_keep::KeepSet;

/// Builds the positions to keep of every row: its valid positions, less the
/// visual tokens that `keep` does not keep, less the last position (the
/// glimpse token) when `drop_last`. `out` comes from
/// [`KeepPositions::for_rows`] with the same `drop_last`.
pub fn keep_positions(
    rows: &RowLayout,
    keep: &KeepSet,
    drop_last: bool,
    out: &mut KeepPositions,
) -> Result<()> {
    const WHAT: &str = "keep_positions";
    keep.check_from(WHAT, rows)?;
    check_keep_positions(rows, drop_last, (out.width, out.src_seq, out.batch()))?;
    for b in 0..rows.batch() {
        let vis = rows.visual(b);
        let kept = keep.kept(b);
        let end = rows.end(b) - usize::from(drop_last);
        let (mut vi, mut ki) = (0, 0);
        let row = &mut out.positions[b * out.width..(b + 1) * out.width];
        row.fill(-1);
        let mut n = 0;
        for p in rows.start(b)..end {
            let is_visual = vi < vis.len() && vis[vi] as usize == p;
            let keep_it = if is_visual {
                let k = ki < kept.len() && kept[ki] as usize == vi;
                ki += usize::from(k);
                vi += 1;
                k
            } else {
                true
            };
            if keep_it {
                row[n] = p as i32;
                n += 1;
            }
        }
        out.lengths[b] = n as i32;
    }
    out.max_len = out.lengths.iter().map(|&n| n as usize).max().unwrap_or(0);
    Ok(())
}

/// Compacts the K and V caches of every layer in one call: `k_src[l]`,
/// `v_src[l]` are `[B, S, Hkv, D]` views (any memory order), `k_dst[l]`,
/// `v_dst[l]` their compacted `[B, S_dst, Hkv, D]` destinations.
pub fn compact_kv<'a, T: Element>(
    k_src: &[View<'_, T, 4>],
    v_src: &[View<'_, T, 4>],
    keep: &KeepPositions,
    padding: Padding,
    k_dst: &mut [ViewMut<'a, T, 4>],
    v_dst: &mut [ViewMut<'a, T, 4>],
) -> Result<()> {
    check_layer_counts(k_src.len(), v_src.len(), k_dst.len(), v_dst.len())?;
    let src: Vec<View<'_, T, 4>> = k_src.iter().chain(v_src).copied().collect();
    let mut dst: Vec<&mut ViewMut<'a, T, 4>> = k_dst.iter_mut().chain(v_dst.iter_mut()).collect();
    gather_planes(OP, &src, keep, padding, &mut dst)
}

/// The same gather for rows of any element type: hidden states `[B, S, W]`,
/// position ids `[B, S, 1]` (one plane per M-RoPE section). All planes share
/// one shape and strides.
pub fn gather_rows<T: bytemuck::Pod>(
    src: &[View<'_, T, 3>],
    keep: &KeepPositions,
    padding: Padding,
    dst: &mut [ViewMut<'_, T, 3>],
) -> Result<()> {
    const WHAT: &str = "gather_rows";
    let src4: Vec<View<'_, T, 4>> = src
        .iter()
        .map(|v| View::new(v.data(), v.layout().with_unit_heads()))
        .collect::<Result<_>>()?;
    let mut dst4: Vec<ViewMut<'_, T, 4>> = dst.iter_mut().map(ViewMut::as_unit_heads).collect();
    let mut dst4_refs: Vec<&mut ViewMut<'_, T, 4>> = dst4.iter_mut().collect();
    gather_planes(WHAT, &src4, keep, padding, &mut dst4_refs)
}

fn gather_planes<T: bytemuck::Pod>(
    op: &'static str,
    src: &[View<'_, T, 4>],
    keep: &KeepPositions,
    padding: Padding,
    dst: &mut [&mut ViewMut<'_, T, 4>],
) -> Result<()> {
    let src_desc: Vec<([usize; 4], [usize; 4])> = src
        .iter()
        .map(|v| (v.shape(), v.layout().strides()))
        .collect();
    let dst_desc: Vec<([usize; 4], [usize; 4])> = dst
        .iter()
        .map(|v| (v.shape(), v.layout().strides()))
        .collect();
    let dims = check_planes(
        op,
        &src_desc,
        &dst_desc,
        (keep.batch(), keep.src_seq(), keep.max_len()),
    )?;
    if dst.iter().all(|d| d.layout().numel() == 0) {
        // Empty rows (width 0): nothing to write, however many of them.
        return Ok(());
    }
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        for b in 0..dims.batch {
            let row = keep.row(b);
            for j in 0..dims.dst_seq {
                let from =
                    source_slot(j, row.len(), dims.dst_seq, padding).map(|i| row[i] as usize);
                for h in 0..dims.heads {
                    let out = d.row_mut([b, j, h, 0]);
                    match from {
                        Some(p) => out.copy_from_slice(s.row([b, p, h, 0])),
                        None => out.fill(bytemuck::Zeroable::zeroed()),
                    }
                }
            }
        }
    }
    Ok(())
}
