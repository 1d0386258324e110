//! CUDA path of pos_conv1d (kernel: kernels-cuda/src/pos_conv1d.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::{check, OP};
use crate::cuda::{check_grid_batch, check_status, ffi_stream, DevView, DevViewMut, DeviceLens};
use crate::dtype::Element;
use crate::error::Result;
use crate::glimpse_scores::cuda::ffi_dtype;

/// Adds the depthwise convolution of each row's valid tokens to them (module
/// docs): `out [B, N, C]` from `x [B, N, C]`, `weight [C, 7]`, `bias [C]`
/// (contiguous). Any strides; 16-byte vectors where x, out and C allow them.
pub fn pos_conv1d<T: Element>(
    stream: &Arc<CudaStream>,
    x: &DevView<'_, T, 3>,
    lens: &DeviceLens,
    weight: &DevView<'_, T, 2>,
    bias: &DevView<'_, T, 1>,
    out: &mut DevViewMut<'_, T, 3>,
) -> Result<()> {
    let d = check(
        x.shape(),
        lens.host(),
        weight.shape(),
        bias.shape(),
        out.shape(),
    )?;
    check_grid_batch(OP, d.batch)?;
    if d.batch == 0 || d.tokens == 0 || d.channels == 0 {
        return Ok(());
    }
    let [xsb, xsn, _] = x.layout().strides();
    let [osb, osn, _] = out.layout().strides();
    let (x_ptr, _x) = x.ptr(stream);
    let (w_ptr, _w) = weight.ptr(stream);
    let (b_ptr, _b) = bias.ptr(stream);
    let (len_ptr, _l) = lens.dev.device_ptr(stream);
    let (out_ptr, _o) = out.ptr_mut(stream);
    let params = ffi::foveal_pos_conv1d_params {
        x: x_ptr as *const _,
        x_stride_b: xsb as i64,
        x_stride_n: xsn as i64,
        out: out_ptr as *mut _,
        out_stride_b: osb as i64,
        out_stride_n: osn as i64,
        len: len_ptr as *const i32,
        weight: w_ptr as *const _,
        weight_stride_c: weight.layout().stride(0) as i64,
        bias: b_ptr as *const _,
        batch: d.batch as i32,
        tokens: d.tokens as i32,
        channels: d.channels as i32,
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: x, weight, bias, the lengths and out are live device
    // allocations of the stream's context, held with their guards until the
    // kernel is enqueued. `check` ties weight to [C, 7], bias to [C], out to
    // x's shape and each length (the device copy of the host lengths it
    // checked) to N, so every token and channel the kernel touches lies in a
    // validated layout; the kernel takes 16-byte vectors only where it has
    // checked the addresses, strides and C itself; the batch fits the grid.
    let status = unsafe { ffi::foveal_pos_conv1d(&params, stream_ptr) };
    check_status(OP, status)
}
