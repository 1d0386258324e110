//! CUDA path of region_descriptors (kernel: kernels-cuda/src/region_descriptors.cu).

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::{check, OP};
use crate::cuda::{
    check_aligned, check_grid_batch, check_row_strides, check_status, ffi_stream, DevView,
    DevViewMut,
};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::gaze_layout::cuda::DeviceGazeLayout;
use crate::glimpse_scores::cuda::ffi_dtype;

/// Writes the mean key of regions `regions` of each row into `desc
/// [B, Hkv, R, D]` (module docs); other regions are left as they are. The
/// result is bit-identical to the CPU reference. Needs a 16-byte-aligned `k`
/// whose strides are multiples of 16 bytes, and a head dim that is a multiple
/// of 16 bytes (every common head dim: 64, 80, 96, 128, 256).
pub fn region_descriptors<T: Element>(
    stream: &Arc<CudaStream>,
    k: &DevView<'_, T, 4>,
    layout: &DeviceGazeLayout,
    regions: Range<usize>,
    desc: &mut DevViewMut<'_, f32, 4>,
) -> Result<()> {
    let host = layout.host();
    let d = check(k.shape(), host, &regions, desc.shape())?;
    let vec = 16 / std::mem::size_of::<T>();
    ensure(d.head_dim % vec == 0, || Error::Unsupported {
        op: OP,
        msg: format!(
            "head dim {} must be a multiple of {vec} elements (16 bytes)",
            d.head_dim
        ),
    })?;
    check_row_strides(OP, "k", k, vec)?;
    check_grid_batch(OP, d.batch)?;
    let threads = d.regions.len() * d.kv_heads * (d.head_dim / vec);
    let block = ffi::FOVEAL_REGION_DESCRIPTORS_THREADS as usize;
    ensure(threads.div_ceil(block) <= i32::MAX as usize, || {
        Error::Unsupported {
            op: OP,
            msg: format!(
                "{} regions x {} KV heads exceed the kernel's grid",
                d.regions.len(),
                d.kv_heads
            ),
        }
    })?;
    if threads == 0 {
        return Ok(());
    }
    let (k_ptr, _k) = k.ptr(stream);
    check_aligned(OP, "k", k_ptr, 16)?;
    let [ksb, kss, ksh, _] = k.layout().strides();
    let [dsb, dsh, dsr, _] = desc.layout().strides();
    let (desc_ptr, _d) = desc.ptr_mut(stream);
    let (count, _c) = layout.region_count.device_ptr(stream);
    let (len, _l) = layout.region_len.device_ptr(stream);
    let (pos, _p) = layout.region_pos.device_ptr(stream);
    let params = ffi::foveal_region_descriptors_params {
        k: k_ptr as *const _,
        k_stride_b: ksb as i64,
        k_stride_s: kss as i64,
        k_stride_h: ksh as i64,
        region_count: count as *const i32,
        region_len: len as *const i32,
        region_pos: pos as *const i32,
        r_max: host.max_regions() as i32,
        p_max: host.max_region_len() as i32,
        desc: desc_ptr as *mut f32,
        desc_stride_b: dsb as i64,
        desc_stride_h: dsh as i64,
        desc_stride_r: dsr as i64,
        r_begin: d.regions.start as i32,
        r_end: d.regions.end as i32,
        batch: d.batch as i32,
        kv_heads: d.kv_heads as i32,
        head_dim: d.head_dim as i32,
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: k, desc and the layout's arrays are live device allocations of
    // the stream's context, held with their guards until the kernel is
    // enqueued. The layout was validated on the host (GazeLayout::new: every
    // position < seq, lengths and counts within [B, r_max] and [B, r_max,
    // p_max], which the uploaded arrays hold), and `check` ties it to k
    // (seq <= S, same batch) and desc ([B, Hkv, >= r_max, D]); the kernel only
    // writes regions r_begin <= r < min(r_end, count[b]) <= r_max. The checks
    // above give k's 16-byte loads their alignment; batch and block count
    // fit the grid.
    let status = unsafe { ffi::foveal_region_descriptors(&params, stream_ptr) };
    check_status(OP, status)
}
