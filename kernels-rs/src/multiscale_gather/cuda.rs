//! CUDA path of multiscale_gather (kernels: kernels-cuda/src/multiscale_gather.cu).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal_sys as ffi;

use super::{check, ScaleSet, OP};
use crate::cuda::{check_grid_batch, check_status, ffi_stream, DevView, DevViewMut, Workspace};
use crate::dtype::Element;
use crate::error::Result;
use crate::glimpse_scores::cuda::ffi_dtype;

/// Gathers every window's tokens at its chosen scale (module docs). The
/// counts stay on the device; the per-window plan (choice, probability,
/// first slot) lives in `workspace`.
#[allow(clippy::too_many_arguments)]
pub fn multiscale_gather<T: Element>(
    stream: &Arc<CudaStream>,
    x: &DevView<'_, T, 4>,
    z: &DevView<'_, f32, 3>,
    window: usize,
    scales: &ScaleSet,
    scale_by_prob: bool,
    tokens: &mut DevViewMut<'_, T, 3>,
    positions: &mut DevViewMut<'_, i32, 2>,
    count: &mut DevViewMut<'_, i32, 1>,
    workspace: &mut Workspace,
) -> Result<()> {
    let (d, n_out) = check(
        x.shape(),
        z.shape(),
        window,
        scales,
        tokens.shape(),
        positions.shape(),
        count.shape(),
    )?;
    check_grid_batch(OP, d.batch)?;
    if d.batch == 0 {
        return Ok(());
    }
    let mut scale_h = [0i32; ffi::FOVEAL_MULTISCALE_MAX_SCALES as usize];
    let mut scale_w = scale_h;
    for (s, &(kh, kw)) in scales.scales().iter().enumerate() {
        (scale_h[s], scale_w[s]) = (kh as i32, kw as i32);
    }
    let plan = d.batch * d.windows * 4;
    let [xsb, xsy, xsx, _] = x.layout().strides();
    let [zsb, zsm, _] = z.layout().strides();
    let [tsb, tsn, _] = tokens.layout().strides();
    let psb = positions.layout().stride(0);
    let cs = count.layout().stride(0);
    let (x_ptr, _x) = x.ptr(stream);
    let (z_ptr, _z) = z.ptr(stream);
    let (t_ptr, _t) = tokens.ptr_mut(stream);
    let (p_ptr, _p) = positions.ptr_mut(stream);
    let (c_ptr, _c) = count.ptr_mut(stream);
    let ([choice, prob, offset], _ws) = workspace.regions(stream, [plan, plan, plan])?;
    let params = ffi::foveal_multiscale_gather_params {
        x: x_ptr as *const _,
        x_stride_b: xsb as i64,
        x_stride_y: xsy as i64,
        x_stride_x: xsx as i64,
        z: z_ptr as *const f32,
        z_stride_b: zsb as i64,
        z_stride_m: zsm as i64,
        scale_h,
        scale_w,
        num_scales: scales.len() as i32,
        scale_by_prob: i32::from(scale_by_prob),
        tokens: t_ptr as *mut _,
        tokens_stride_b: tsb as i64,
        tokens_stride_n: tsn as i64,
        positions: p_ptr as *mut i32,
        positions_stride_b: psb as i64,
        count: c_ptr as *mut i32,
        count_stride: cs as i64,
        choice: choice as *mut i32,
        prob: prob as *mut f32,
        offset: offset as *mut i32,
        batch: d.batch as i32,
        height: d.height as i32,
        width: d.width as i32,
        channels: d.channels as i32,
        window: d.window as i32,
        n_out_max: n_out as i32,
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held with its guard until the kernels are enqueued. `check`
    // ties z to the windows and scales, and the outputs to N_out_max, the sum
    // over windows of their largest token count: a window's first slot plus
    // its tokens never passes it. Every scale divides the window and is at
    // least 1, so the pooled cells lie inside the map; the workspace regions
    // hold B * M entries each; the batch fits the grid.
    let status = unsafe { ffi::foveal_multiscale_gather(&params, stream_ptr) };
    check_status(OP, status)
}
