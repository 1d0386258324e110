//! CUDA path of select_keep (kernel: kernels-cuda/src/select_keep.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use foveal_sys as ffi;

use super::{check, KeepRule, OP};
use crate::cuda::{check_status, ffi_stream, DevView, DeviceKeepSet, DeviceRowLayout};
use crate::error::Result;

/// Fills `keep` with the kept visual tokens of every row (module docs); the
/// counts stay on the device.
pub fn select_keep(
    stream: &Arc<CudaStream>,
    logits: &DevView<'_, f32, 2>,
    rows: &DeviceRowLayout,
    rule: &KeepRule,
    keep: &mut DeviceKeepSet,
) -> Result<()> {
    let host = rows.host();
    check(logits.shape(), host, rule, keep.nv_max, keep.batch)?;
    let (x, _x) = logits.ptr(stream);
    let (nv, _n) = rows.nv.device_ptr(stream);
    let (idx, _i) = keep.idx.device_ptr_mut(stream);
    let (count, _c) = keep.count.device_ptr_mut(stream);
    let params = ffi::foveal_select_keep_params {
        logits: x as *const f32,
        logits_stride_b: logits.layout().stride(0) as i64,
        nv: nv as *const i32,
        keep_idx: idx as *mut i32,
        keep_stride_b: keep.nv_max as i64,
        keep_count: count as *mut i32,
        batch: host.batch() as i32,
        nv_max: host.nv_max() as i32,
        threshold_logit: rule.threshold_logit(),
        max_ratio: rule.max_ratio.unwrap_or(1.0),
        has_max_ratio: i32::from(rule.max_ratio.is_some()),
        min_keep: rule.min_keep.min(i32::MAX as usize) as i32,
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: the pointers are live device allocations held with their
    // guards until the kernel is enqueued; `check` ties the logits' shape and
    // the keep set's size to the row layout, whose nv[b] <= nv_max bounds
    // every index the kernel forms.
    let status = unsafe { ffi::foveal_select_keep(&params, stream_ptr) };
    check_status(OP, status)?;
    keep.layout_id = host.id();
    Ok(())
}
