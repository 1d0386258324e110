//! CUDA path of route_topk (kernels: kernels-cuda/src/route_topk.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use foveal_sys as ffi;

use super::{check, OP};
use crate::cuda::{
    check_aligned, check_grid_batch, check_head_dim, check_row_strides, check_status, ffi_stream,
    DevView, Workspace,
};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use crate::glimpse_scores::cuda::ffi_dtype;

/// Routes every (row, query, query head) to its `k` best regions (module
/// docs) into `routes` (`[B, Nq, Hq, k]`, e.g. from `DeviceRoutes::new(stream,
/// layout, Nq, Hq, k)`), on the device; the routes are then tied to `layout`.
/// The scores are bit-identical to the CPU reference's, so the routes are
/// too. Needs `desc` 16-byte aligned with strides that are multiples of 4,
/// and a head dim that is a multiple of 4, at most 256. Scratch memory (the
/// scores, `[B, Nq, Hq, max_regions]` f32) comes from `workspace`.
pub fn route_topk<T: Element>(
    stream: &Arc<CudaStream>,
    q: &DevView<'_, T, 4>,
    desc: &DevView<'_, f32, 4>,
    layout: &DeviceGazeLayout,
    k: usize,
    routes: &mut DeviceRoutes,
    workspace: &mut Workspace,
) -> Result<()> {
    let host = layout.host();
    let d = check(q.shape(), desc.shape(), host, k, routes.shape())?;
    check_head_dim(OP, d.head_dim, 4, ffi::FOVEAL_ROUTE_MAX_HEAD_DIM as usize)?;
    check_row_strides(OP, "desc", desc, 4)?;
    check_grid_batch(OP, d.batch)?;
    let lists = d.batch * d.queries * d.q_heads;
    let chunk = ffi::FOVEAL_ROUTE_HEAD_CHUNK as usize;
    let r_max = host.max_regions();
    ensure(
        lists <= i32::MAX as usize
            && d.kv_heads * (d.q_heads / d.kv_heads).div_ceil(chunk) <= 65_535
            && r_max.div_ceil(ffi::FOVEAL_ROUTE_REGIONS_PER_BLOCK as usize) <= 65_535,
        || Error::Unsupported {
            op: OP,
            msg: format!(
                "{lists} route lists, {} KV heads or {r_max} regions exceed the kernels' grids",
                d.kv_heads
            ),
        },
    )?;
    if lists > 0 {
        let (desc_ptr, _d) = desc.ptr(stream);
        check_aligned(OP, "desc", desc_ptr, 16)?;
        let (q_ptr, _q) = q.ptr(stream);
        let [qsb, qsn, qsh, _] = q.layout().strides();
        let [dsb, dsh, dsr, _] = desc.layout().strides();
        let (count, _c) = layout.region_count.device_ptr(stream);
        let ([scores], _ws) = workspace.regions(stream, [lists * r_max * 4])?;
        let (ids, _i) = routes.ids.device_ptr_mut(stream);
        let params = ffi::foveal_route_topk_params {
            q: q_ptr as *const _,
            q_stride_b: qsb as i64,
            q_stride_n: qsn as i64,
            q_stride_h: qsh as i64,
            desc: desc_ptr as *const f32,
            desc_stride_b: dsb as i64,
            desc_stride_h: dsh as i64,
            desc_stride_r: dsr as i64,
            region_count: count as *const i32,
            r_max: r_max as i32,
            scores: scores as *mut f32,
            routes: ids as *mut i32,
            batch: d.batch as i32,
            queries: d.queries as i32,
            q_heads: d.q_heads as i32,
            kv_heads: d.kv_heads as i32,
            head_dim: d.head_dim as i32,
            k: d.k as i32,
            dtype: ffi_dtype(T::DTYPE),
        };
        let stream_ptr = ffi_stream(stream, OP)?;
        // SAFETY: q, desc, the layout's counts, the workspace and the routes
        // are live device allocations of the stream's context, held with
        // their guards until the kernels are enqueued. `check` ties desc to
        // [B, Hkv, >= r_max, D] and q to [B, Nq, Hq, D] with Hq a multiple of
        // Hkv, and the routes' shape to [B, Nq, Hq, k] (their buffer holds
        // that many ids, contiguous); every region count is <= r_max
        // (GazeLayout), so the kernels read descriptor rows and workspace
        // scores ([B, Nq, Hq, r_max], sized here) inside their bounds. The
        // checks above give desc's 16-byte loads their alignment, bound the
        // head dim by the shared tile, and fit the grids.
        let status = unsafe { ffi::foveal_route_topk(&params, stream_ptr) };
        check_status(OP, status)?;
    }
    routes.layout_id = host.id();
    Ok(())
}
