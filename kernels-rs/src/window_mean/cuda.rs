//! CUDA path of window_mean (kernel: kernels-cuda/src/window_mean.cu).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal_sys as ffi;

use super::{check, Pool, OP};
use crate::cuda::{check_grid_batch, check_status, ffi_stream, DevView, DevViewMut};
use crate::dtype::Element;
use crate::error::Result;
use crate::glimpse_scores::cuda::ffi_dtype;

/// Writes the mean (or max) of every window of `x [B, Hx, Wx, C]` into `out
/// [B, M, C]` (module docs). Any strides (channels contiguous).
pub fn window_mean<T: Element>(
    stream: &Arc<CudaStream>,
    x: &DevView<'_, T, 4>,
    window: usize,
    pool: Pool,
    out: &mut DevViewMut<'_, T, 3>,
) -> Result<()> {
    let d = check(x.shape(), out.shape(), window)?;
    check_grid_batch(OP, d.batch)?;
    if d.batch == 0 || d.windows == 0 || d.channels == 0 {
        return Ok(());
    }
    let [xsb, xsy, xsx, _] = x.layout().strides();
    let [osb, osm, _] = out.layout().strides();
    let (x_ptr, _x) = x.ptr(stream);
    let (out_ptr, _o) = out.ptr_mut(stream);
    let params = ffi::foveal_window_mean_params {
        x: x_ptr as *const _,
        x_stride_b: xsb as i64,
        x_stride_y: xsy as i64,
        x_stride_x: xsx as i64,
        out: out_ptr as *mut _,
        out_stride_b: osb as i64,
        out_stride_m: osm as i64,
        batch: d.batch as i32,
        height: d.height as i32,
        width: d.width as i32,
        channels: d.channels as i32,
        window: d.window as i32,
        pool: match pool {
            Pool::Mean => ffi::foveal_pool::FOVEAL_POOL_MEAN,
            Pool::Max => ffi::foveal_pool::FOVEAL_POOL_MAX,
        },
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: x and out are live device allocations of the stream's context,
    // held with their guards until the kernel is enqueued; `check` ties out's
    // shape to x's and the window, so every offset the kernel forms (cells of
    // existing windows, channels below C) lies inside the validated layouts;
    // the batch fits the grid (check_grid_batch).
    let status = unsafe { ffi::foveal_window_mean(&params, stream_ptr) };
    check_status(OP, status)
}
