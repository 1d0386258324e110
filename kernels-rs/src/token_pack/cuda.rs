//! CUDA path of token_pack (kernel: kernels-cuda/src/token_pack.cu).

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal_sys as ffi;

use super::{check, OP};
use crate::cuda::{check_status, ffi_stream, DevView, DevViewMut};
use crate::dtype::Element;
use crate::error::Result;
use crate::glimpse_scores::cuda::ffi_dtype;

/// Resizes each `h x w` grid and packs 2 x 2 blocks (module docs):
/// `out [B, H'/2, W'/2, 4C]` from `x [B, h, w, C]`. Any strides; 16-byte
/// vectors where x, out and C allow them.
pub fn token_pack<T: Element>(
    stream: &Arc<CudaStream>,
    x: &DevView<'_, T, 4>,
    rho: f64,
    out: &mut DevViewMut<'_, T, 4>,
) -> Result<()> {
    let d = check(x.shape(), rho, out.shape())?;
    if d.batch == 0 || d.channels == 0 {
        return Ok(());
    }
    let [xsb, xsy, xsx, _] = x.layout().strides();
    let [osb, osy, osx, _] = out.layout().strides();
    let (x_ptr, _x) = x.ptr(stream);
    let (out_ptr, _o) = out.ptr_mut(stream);
    let params = ffi::foveal_token_pack_params {
        x: x_ptr as *const _,
        x_stride_b: xsb as i64,
        x_stride_y: xsy as i64,
        x_stride_x: xsx as i64,
        out: out_ptr as *mut _,
        out_stride_b: osb as i64,
        out_stride_y: osy as i64,
        out_stride_x: osx as i64,
        batch: d.batch as i32,
        height: d.height as i32,
        width: d.width as i32,
        channels: d.channels as i32,
        out_height: d.out_height as i32,
        out_width: d.out_width as i32,
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: x and out are live device allocations of the stream's context,
    // held with their guards until the kernel is enqueued. `check` computed
    // H' and W' from x's grid and rho and tied out's shape to
    // [B, H'/2, W'/2, 4C], so the source pixels (rows < h, columns < w) and
    // the packed slots the kernel addresses lie in the validated layouts,
    // with sizes inside 32-bit indices; the kernel takes 16-byte vectors only
    // where it has checked the addresses, strides and C itself.
    let status = unsafe { ffi::foveal_token_pack(&params, stream_ptr) };
    check_status(OP, status)
}
