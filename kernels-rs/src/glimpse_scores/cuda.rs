//! CUDA path of glimpse_scores (kernels: kernels-cuda/src/glimpse_scores.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::{check, ScoreMode, OP};
use crate::cuda::{
    check_aligned, check_head_dim, check_row_strides, check_status, ffi_stream, sm_count, DevView,
    DevViewMut, DeviceRowLayout, Workspace,
};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Error, Result};

/// Keys a split gets at least, so that short rows are not spread thin.
const MIN_KEYS_PER_SPLIT: usize = 128;

/// Writes the glimpse token's scores to the visual tokens into `out`
/// `[B, Nv_max, Hq]` (module docs). Needs a 16-byte-aligned q and k whose
/// strides are multiples of 16 bytes, and a head dim that is a multiple of
/// 16 bytes, at most 256.
#[allow(clippy::too_many_arguments)]
pub fn glimpse_scores<T: Element>(
    stream: &Arc<CudaStream>,
    q: &DevView<'_, T, 3>,
    k: &DevView<'_, T, 4>,
    rows: &DeviceRowLayout,
    scale: Option<f32>,
    mode: ScoreMode,
    out: &mut DevViewMut<'_, f32, 3>,
    workspace: &mut Workspace,
) -> Result<()> {
    let dims = check(q.shape(), k.shape(), out.shape(), rows.host(), scale)?;
    let vec = 16 / std::mem::size_of::<T>();
    let max_d = ffi::FOVEAL_GLIMPSE_MAX_HEAD_DIM as usize;
    check_head_dim(OP, dims.head_dim, vec, max_d)?;
    check_row_strides(OP, "q", q, vec)?;
    check_row_strides(OP, "k", k, vec)?;
    if dims.nv_max == 0 {
        return Ok(());
    }

    // Flash-decoding split: four blocks a SM (one wave: the tensor-core
    // kernel's registers and shared memory allow four to six at D <= 128).
    let head_chunks = dims
        .group()
        .div_ceil(ffi::FOVEAL_GLIMPSE_MAX_GROUP as usize);
    // The kernels' int32 index space, grid (y <= 65,535) and the normalize
    // kernel's shared memory (two floats per head: 96 KiB at 12,288 heads,
    // opted in past 48 KiB; checked against the device by the launcher).
    ensure(
        dims.nv_max * dims.q_heads <= i32::MAX as usize
            && dims.kv_heads * head_chunks <= 65_535
            && dims.q_heads <= 12_288,
        || Error::Unsupported {
            op: OP,
            msg: format!(
                "{} visual tokens x {} query heads exceed the kernels' limits",
                dims.nv_max, dims.q_heads
            ),
        },
    )?;
    let blocks_per_split = dims.batch * dims.kv_heads * head_chunks;
    // The softmax modes stream every valid key of a row, Logits mode its visual keys.
    let max_keys = if mode == ScoreMode::Logits {
        dims.nv_max
    } else {
        rows.host().max_len()
    };
    let max_splits = max_keys.div_ceil(MIN_KEYS_PER_SPLIT).max(1);
    let num_splits = (4 * sm_count(stream, OP)?)
        .div_ceil(blocks_per_split)
        .clamp(1, max_splits);

    let pos_to_vis_bytes = dims.batch * dims.seq * 4;
    let partial_bytes = dims.batch * num_splits * dims.q_heads * 2 * 4;
    let (q_ptr, _q) = q.ptr(stream);
    let (k_ptr, _k) = k.ptr(stream);
    check_aligned(OP, "q", q_ptr, 16)?;
    check_aligned(OP, "k", k_ptr, 16)?;
    let ([pos_to_vis, partial], _ws) =
        workspace.regions(stream, [pos_to_vis_bytes, partial_bytes])?;
    let out_strides = out.layout().strides();
    let (out_ptr, _o) = out.ptr_mut(stream);
    let (start, _s) = rows.start.device_ptr(stream);
    let (end, _e) = rows.end.device_ptr(stream);
    let (vis_pos, _v) = rows.vis_pos.device_ptr(stream);
    let (nv, _n) = rows.nv.device_ptr(stream);
    let [qsb, qsh, _] = q.layout().strides();
    let [ksb, kss, ksh, _] = k.layout().strides();
    let params = ffi::foveal_glimpse_scores_params {
        q: q_ptr as *const _,
        q_stride_b: qsb as i64,
        q_stride_h: qsh as i64,
        k: k_ptr as *const _,
        k_stride_b: ksb as i64,
        k_stride_s: kss as i64,
        k_stride_h: ksh as i64,
        row_start: start as *const i32,
        row_end: end as *const i32,
        vis_pos: vis_pos as *const i32,
        vis_stride_b: dims.nv_max as i64,
        nv: nv as *const i32,
        out: out_ptr as *mut f32,
        out_stride_b: out_strides[0] as i64,
        out_stride_i: out_strides[1] as i64,
        pos_to_vis: pos_to_vis as *mut i32,
        partial: partial as *mut f32,
        batch: dims.batch as i32,
        seq: dims.seq as i32,
        q_heads: dims.q_heads as i32,
        kv_heads: dims.kv_heads as i32,
        head_dim: dims.head_dim as i32,
        nv_max: dims.nv_max as i32,
        num_splits: num_splits as i32,
        scale: dims.scale,
        mode: match mode {
            ScoreMode::Logits => ffi::foveal_score_mode::FOVEAL_SCORES_LOGITS,
            ScoreMode::LogSoftmax => ffi::foveal_score_mode::FOVEAL_SCORES_LOG_SOFTMAX,
            ScoreMode::Softmax => ffi::foveal_score_mode::FOVEAL_SCORES_SOFTMAX,
        },
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held (with its ordering guard) until this call has enqueued
    // the kernels; `check` and the checks above bound every index the kernels
    // form: q/k/out by their validated layouts, positions by the RowLayout
    // (start <= p < end <= seq), the workspace regions by their sizes here.
    let status = unsafe { ffi::foveal_glimpse_scores(&params, stream_ptr) };
    check_status(OP, status)
}

pub(crate) fn ffi_dtype(d: DType) -> ffi::foveal_dtype {
    match d {
        DType::F32 => ffi::foveal_dtype::FOVEAL_F32,
        DType::F16 => ffi::foveal_dtype::FOVEAL_F16,
        DType::BF16 => ffi::foveal_dtype::FOVEAL_BF16,
    }
}
