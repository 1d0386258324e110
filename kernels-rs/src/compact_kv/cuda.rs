//! CUDA path of compact_kv, gather_rows and keep_positions (kernels:
//! kernels-cuda/src/compact_kv.cu).

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use foveal_sys as ffi;

use super::{check_keep_positions, check_layer_counts, check_planes, Padding};
use crate::cuda::{
    check_status, ffi_stream, DevView, DevViewMut, DeviceKeepPositions, DeviceKeepSet,
    DeviceRowLayout,
};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::layout::Layout;

/// Builds the positions to keep of every row on the device (see the CPU
/// twin, `cpu::keep_positions`): valid positions, less the visual tokens
/// `keep` drops, less the last position when `drop_last`. `out` comes from
/// [`DeviceKeepPositions::for_rows`] with the same `drop_last`.
pub fn keep_positions(
    stream: &Arc<CudaStream>,
    rows: &DeviceRowLayout,
    keep: &DeviceKeepSet,
    drop_last: bool,
    out: &mut DeviceKeepPositions,
) -> Result<()> {
    const WHAT: &str = "keep_positions";
    keep.check_from(WHAT, rows)?;
    let host = rows.host();
    check_keep_positions(host, drop_last, (out.width, out.src_seq, out.batch))?;
    let (start, _s) = rows.start.device_ptr(stream);
    let (end, _e) = rows.end.device_ptr(stream);
    let (vis_pos, _v) = rows.vis_pos.device_ptr(stream);
    let (nv, _n) = rows.nv.device_ptr(stream);
    let (idx, _i) = keep.idx.device_ptr(stream);
    let (count, _c) = keep.count.device_ptr(stream);
    let (positions, _p) = out.positions.device_ptr_mut(stream);
    let (lengths, _l) = out.lengths.device_ptr_mut(stream);
    let params = ffi::foveal_keep_positions_params {
        row_start: start as *const i32,
        row_end: end as *const i32,
        vis_pos: vis_pos as *const i32,
        vis_stride_b: host.nv_max() as i64,
        nv: nv as *const i32,
        keep_idx: idx as *const i32,
        keep_stride_b: keep.nv_max as i64,
        keep_count: count as *const i32,
        drop_last: i32::from(drop_last),
        positions: positions as *mut i32,
        positions_stride_b: out.width as i64,
        lengths: lengths as *mut i32,
        batch: host.batch() as i32,
        seq: host.seq() as i32,
        width: out.width as i32,
    };
    let stream_ptr = ffi_stream(stream, WHAT)?;
    // SAFETY: live device allocations, held with their guards until the
    // kernel is enqueued. The keep set was filled by select_keep from these
    // rows (checked), so its indices are below nv[b]; every output slot the
    // kernel computes is below the row's compacted length <= width (checked
    // against for_rows), and no dropped position is visual (checked).
    let status = unsafe { ffi::foveal_keep_positions(&params, stream_ptr) };
    check_status(WHAT, status)?;
    // The new lengths are known on the device only: bound them by the width.
    out.max_len = out.width;
    Ok(())
}

/// Compacts the K and V caches of every layer in one launch (up to 128
/// planes, i.e. 64 layers of K and V; longer lists are cut into launches of
/// 128 planes): `k_src[l]`, `v_src[l]` are
/// `[B, S, Hkv, D]` views (any memory order), `k_dst[l]`, `v_dst[l]` their
/// compacted `[B, S_dst, Hkv, D]` destinations.
pub fn compact_kv<'a, T: Element>(
    stream: &Arc<CudaStream>,
    k_src: &[DevView<'_, T, 4>],
    v_src: &[DevView<'_, T, 4>],
    keep: &DeviceKeepPositions,
    padding: Padding,
    k_dst: &mut [DevViewMut<'a, T, 4>],
    v_dst: &mut [DevViewMut<'a, T, 4>],
) -> Result<()> {
    check_layer_counts(k_src.len(), v_src.len(), k_dst.len(), v_dst.len())?;
    let src: Vec<(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)> = k_src
        .iter()
        .chain(v_src)
        .map(|v| {
            let (p, g) = v.ptr(stream);
            (p, g, *v.layout())
        })
        .collect();
    let dst: Vec<(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)> = k_dst
        .iter_mut()
        .chain(v_dst.iter_mut())
        .map(|v| {
            let l = *v.layout();
            let (p, g) = v.ptr_mut(stream);
            (p, g, l)
        })
        .collect();
    gather_planes::<T>(super::OP, stream, &src, keep, padding, &dst)
}

/// The same gather for rows of any element type: hidden states `[B, S, W]`,
/// position ids `[B, S, 1]` (one plane per M-RoPE section).
pub fn gather_rows<T: bytemuck::Pod>(
    stream: &Arc<CudaStream>,
    src: &[DevView<'_, T, 3>],
    keep: &DeviceKeepPositions,
    padding: Padding,
    dst: &mut [DevViewMut<'_, T, 3>],
) -> Result<()> {
    let src: Vec<(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)> = src
        .iter()
        .map(|v| {
            let (p, g) = v.ptr(stream);
            (p, g, v.layout().with_unit_heads())
        })
        .collect();
    let dst: Vec<(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)> = dst
        .iter_mut()
        .map(|v| {
            let l = v.layout().with_unit_heads();
            let (p, g) = v.ptr_mut(stream);
            (p, g, l)
        })
        .collect();
    gather_planes::<T>("gather_rows", stream, &src, keep, padding, &dst)
}

/// Gathers planes `[B, S, H, W]` of `T`, in launches of up to
/// FOVEAL_GATHER_MAX_PLANES planes.
fn gather_planes<T>(
    op: &'static str,
    stream: &Arc<CudaStream>,
    src: &[(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)],
    keep: &DeviceKeepPositions,
    padding: Padding,
    dst: &[(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)],
) -> Result<()> {
    let desc = |planes: &[(sys::CUdeviceptr, SyncOnDrop<'_>, Layout<4>)]| -> Vec<([usize; 4], [usize; 4])> {
        planes.iter().map(|(_, _, l)| (l.shape(), l.strides())).collect()
    };
    let dims = check_planes(
        op,
        &desc(src),
        &desc(dst),
        (keep.batch, keep.src_seq, keep.max_len),
    )?;
    let elem = std::mem::size_of::<T>();
    let [ssb, sss, ssh, _] = src[0].2.strides();
    let [dsb, dss, dsh, _] = dst[0].2.strides();
    // Heads stored back to back in both are one longer row.
    let (heads, width) = if dims.heads > 1 && ssh == dims.width && dsh == dims.width {
        (1, dims.heads * dims.width)
    } else {
        (dims.heads, dims.width)
    };
    let row_bytes = width * elem;
    ensure(
        heads * row_bytes <= i32::MAX as usize && dims.dst_seq <= i32::MAX as usize,
        || Error::Unsupported {
            op,
            msg: format!(
                "a row of {row_bytes} bytes or a capacity of {} slots exceeds i32",
                dims.dst_seq
            ),
        },
    )?;
    let (positions, _p) = keep.positions.device_ptr(stream);
    let (lengths, _l) = keep.lengths.device_ptr(stream);
    let max_planes = ffi::FOVEAL_GATHER_MAX_PLANES as usize;
    let stream_ptr = ffi_stream(stream, op)?;
    for (src_chunk, dst_chunk) in src.chunks(max_planes).zip(dst.chunks(max_planes)) {
        let mut params = ffi::foveal_gather_params {
            num_planes: src_chunk.len() as i32,
            src_stride_b: (ssb * elem) as i64,
            src_stride_s: (sss * elem) as i64,
            src_stride_h: (ssh * elem) as i64,
            dst_stride_b: (dsb * elem) as i64,
            dst_stride_s: (dss * elem) as i64,
            dst_stride_h: (dsh * elem) as i64,
            batch: dims.batch as i32,
            heads: heads as i32,
            row_bytes: row_bytes as i32,
            dst_seq: dims.dst_seq as i32,
            positions: positions as *const i32,
            positions_stride_b: keep.width as i64,
            lengths: lengths as *const i32,
            left_pad: i32::from(padding == Padding::Left),
            ..Default::default()
        };
        for (i, ((s, _, _), (d, _, _))) in src_chunk.iter().zip(dst_chunk).enumerate() {
            params.src[i] = *s as *const _;
            params.dst[i] = *d as *mut _;
        }
        // SAFETY: every plane pointer is a live device allocation held with
        // its guard by the caller of this function until the launch is
        // enqueued. `check_planes` gave all planes one validated shape and
        // strides; positions are below keep.src_seq <= the source capacity
        // and lengths at most keep.max_len <= the destination capacity, both by
        // construction of the keep positions. Rust's borrows keep the
        // destinations distinct from the sources.
        let status = unsafe { ffi::foveal_gather_positions(&params, stream_ptr) };
        check_status(op, status)?;
    }
    Ok(())
}
