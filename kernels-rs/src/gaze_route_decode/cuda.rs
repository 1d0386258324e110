//! CUDA path of gaze_route_decode (kernel: kernels-cuda/src/gaze_route_decode.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtrMut};
use foveal_sys as ffi;

use super::{check, OP};
use crate::cuda::{
    check_aligned, check_row_strides, check_status, ffi_stream, shared_memory, sm_count, DevView,
    DevViewMut, Workspace,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::gaze_decode::cuda::{check_views, decode_params, workspace_dims, Limits, Plan};
use crate::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};

/// Routes each query head to its `top_k` best regions and attends its row's
/// visible keys and those regions (module docs), in one kernel launch: `o
/// [B, Hq, D]`, `lse [B, Hq]` when given, and `routes` `[B, 1, Hq, top_k]`
/// (e.g. `DeviceRoutes::new(stream, layout, 1, Hq, top_k)`; tied to `layout`
/// after the call), equal to route_topk's.
///
/// Needs what route_topk and gaze_decode need (16-byte-aligned q, k, v and
/// desc, strides but the head dim's multiples of 16 bytes, a head dim that is
/// a multiple of 16 bytes and of 4 elements, at most 256) and at most 4,096
/// regions in a row (a router's scores sit in shared memory); a block's
/// shared memory (the kernel's static part, about 5 KB, plus the larger of
/// the attend ring, 2 to 4 stages of at most 36 KB as the device allows, and
/// a router's `4 D + 5 x regions` bytes) must fit the device's per-block
/// opt-in limit, else `Error::Unsupported` before anything is launched. Scratch comes from `workspace` (reserve
/// [`workspace_bytes`] before capturing a graph).
#[allow(clippy::too_many_arguments)]
pub fn gaze_route_decode<T: Element>(
    stream: &Arc<CudaStream>,
    q: &DevView<'_, T, 3>,
    k: &DevView<'_, T, 4>,
    v: &DevView<'_, T, 4>,
    desc: &DevView<'_, f32, 4>,
    layout: &DeviceGazeLayout,
    top_k: usize,
    scale: Option<f32>,
    o: &mut DevViewMut<'_, T, 3>,
    lse: Option<&mut DevViewMut<'_, f32, 2>>,
    routes: &mut DeviceRoutes,
    workspace: &mut Workspace,
) -> Result<()> {
    let host = layout.host();
    let dims = check(
        q.shape(),
        k.shape(),
        v.shape(),
        desc.shape(),
        host,
        top_k,
        routes.shape(),
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    // the descriptors are read as float4: the head dim a multiple of 4 too
    let vec = 16 / std::mem::size_of::<T>();
    check_views(OP, q, k, v, vec.max(4))?;
    check_row_strides(OP, "desc", desc, 4)?;
    let plan = Plan::new(OP, &dims, host, sm_count(stream, OP)?, &LIMITS)?;

    let (mut decode, _guards) = decode_params(OP, stream, q, k, v, layout, &dims, o, lse)?;
    let (desc_ptr, _d) = desc.ptr(stream);
    check_aligned(OP, "desc", desc_ptr, 16)?;
    let (regions, _ws) = workspace.regions(stream, plan.region_bytes(&dims))?;
    let (route_ids, _ri) = routes.ids.device_ptr_mut(stream);
    let [dsb, dsh, dsr, _] = desc.layout().strides();
    plan.set_workspace(&mut decode, regions);
    let params = ffi::foveal_gaze_route_decode_params {
        decode,
        desc: desc_ptr as *const f32,
        desc_stride_b: dsb as i64,
        desc_stride_h: dsh as i64,
        desc_stride_r: dsr as i64,
        routes: route_ids as *mut i32,
        top_k: dims.k as i32,
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // The attend ring and a router's region scores share the dynamic shared
    // memory: with the kernel's static part it must fit the device's
    // per-block limit, checked here rather than left to fail as a launch.
    // SAFETY: the query reads only the sizes, dtype and group of `params`
    // and writes `out`, a valid struct; it enqueues nothing.
    let need = shared_memory(OP, |out| unsafe {
        ffi::foveal_gaze_route_decode_shared_memory(&params, out)
    })?;
    need.check(
        OP,
        &format!(
            "the attend ring or the scores of {} regions",
            host.max_regions()
        ),
        "; use route_topk + gaze_decode",
    )?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held (with its ordering guard) until this call has enqueued
    // the memset and the kernel; lse is null exactly when no lse view was
    // given. `check` (route_topk's and gaze_decode's checks) and the checks
    // above bound every index the kernel forms: q/k/v/o/lse/desc by their
    // validated layouts (desc [B, Hkv, >= max_regions, D], 16-byte aligned);
    // positions by the GazeLayout (each < seq <= S); region ids by the
    // row's region count (<= max_regions <= FOVEAL_GAZE_ROUTE_MAX_REGIONS,
    // the shared arrays' bound); the routes' buffer holds [B, 1, Hq, top_k]
    // contiguous ids (its shape is checked); the workspace regions by
    // `Plan::region_bytes`, sized from the same `max_segments`,
    // `max_tokens` and `num_splits` the kernel uses.
    let status = unsafe { ffi::foveal_gaze_route_decode(&params, stream_ptr) };
    check_status(OP, status)?;
    routes.layout_id = host.id();
    Ok(())
}

/// The workspace bytes [`gaze_route_decode`] uses for these sizes (reserve
/// them before capturing a CUDA graph).
pub fn workspace_bytes(
    stream: &Arc<CudaStream>,
    layout: &DeviceGazeLayout,
    q_shape: [usize; 3],
    kv_heads: usize,
    top_k: usize,
) -> Result<usize> {
    let dims = workspace_dims(OP, q_shape, kv_heads, top_k)?;
    let plan = Plan::new(OP, &dims, layout.host(), sm_count(stream, OP)?, &LIMITS)?;
    Ok(Workspace::size_of(&plan.region_bytes(&dims)))
}

/// The fused kernel's bounds: gaze_decode's split rule, capped at
/// FOVEAL_GAZE_ROUTE_MAX_SPLITS; the region scores of a router's head in
/// shared memory.
const LIMITS: Limits = Limits {
    max_regions: ffi::FOVEAL_GAZE_ROUTE_MAX_REGIONS as usize,
    too_many_regions: |n, max| {
        format!("{n} regions in a row, the fused kernel holds at most {max} in shared memory (use route_topk + gaze_decode)")
    },
    max_splits: ffi::FOVEAL_GAZE_ROUTE_MAX_SPLITS as usize,
};
