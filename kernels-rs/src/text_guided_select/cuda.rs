//! CUDA path of text_guided_select (kernels: kernels-cuda/src/text_guided_select.cu).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::{check, Lengths, OP};
use crate::cuda::{
    check_aligned, check_grid_batch, check_head_dim, check_row_strides, check_status, driver_err,
    ffi_stream, sm_count, DevView, DevViewMut, Workspace,
};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::glimpse_scores::cuda::ffi_dtype;

/// [`Lengths`] uploaded to the device (once per batch, before the op).
#[derive(Debug)]
pub struct DeviceLengths {
    host: Lengths,
    t_len: CudaSlice<i32>,
    n_len: CudaSlice<i32>,
}

impl DeviceLengths {
    /// Uploads `lengths` (each at most `i32::MAX`, at most 65,535 rows).
    pub fn new(stream: &Arc<CudaStream>, lengths: &Lengths) -> Result<Self> {
        const WHAT: &str = "DeviceLengths::new";
        check_grid_batch(WHAT, lengths.batch())?;
        let to_i32 = |v: &[usize]| -> Result<Vec<i32>> {
            let mut out: Vec<i32> = Vec::with_capacity(v.len().max(1));
            for &x in v {
                out.push(
                    i32::try_from(x)
                        .map_err(|_| Error::index(WHAT, "lengths", format!("{x} exceeds i32")))?,
                );
            }
            if out.is_empty() {
                out.push(0);
            }
            Ok(out)
        };
        let (t, n) = (to_i32(lengths.t_len())?, to_i32(lengths.n_len())?);
        Ok(DeviceLengths {
            host: lengths.clone(),
            t_len: stream.clone_htod(&t).map_err(driver_err(WHAT))?,
            n_len: stream.clone_htod(&n).map_err(driver_err(WHAT))?,
        })
    }

    /// The host lengths it was made from.
    pub fn host(&self) -> &Lengths {
        &self.host
    }
}

/// Selects each row's visual tokens (module docs): kept indices ascending
/// into `keep [B, N]` (padded with -1), counts into `count [B]` (on the
/// device), and `S` into `scores [B, N]` when given. Needs a 16-byte-aligned
/// `k_vis` whose strides are multiples of 16 bytes, and a head dim that is a
/// multiple of 16 bytes, at most 256. Scratch memory comes from `workspace`.
#[allow(clippy::too_many_arguments)]
pub fn text_guided_select<T: Element>(
    stream: &Arc<CudaStream>,
    q_text: &DevView<'_, T, 4>,
    k_vis: &DevView<'_, T, 4>,
    lengths: &DeviceLengths,
    gamma: f32,
    keep: &mut DevViewMut<'_, i32, 2>,
    count: &mut DevViewMut<'_, i32, 1>,
    scores: Option<&mut DevViewMut<'_, f32, 2>>,
    workspace: &mut Workspace,
) -> Result<()> {
    let d = check(
        q_text.shape(),
        k_vis.shape(),
        &lengths.host,
        gamma,
        keep.shape(),
        count.shape(),
        scores.as_ref().map(|s| s.shape()),
    )?;
    let vec = 16 / std::mem::size_of::<T>();
    check_head_dim(OP, d.head_dim, vec, ffi::FOVEAL_TGS_MAX_HEAD_DIM as usize)?;
    check_row_strides(OP, "k_vis", k_vis, vec)?;
    check_grid_batch(OP, d.batch)?;
    if d.batch == 0 {
        return Ok(());
    }

    // Split the text tokens so that the score kernels fill the GPU twice over.
    let keys = ffi::FOVEAL_TGS_KEYS_PER_BLOCK as usize;
    let key_chunks = d.visual.div_ceil(keys);
    let blocks = (key_chunks * d.batch).max(1);
    let text_splits = (2 * sm_count(stream, OP)?)
        .div_ceil(blocks)
        .clamp(1, d.text.clamp(1, 65_535));

    let lse_partial = d.batch * key_chunks * d.q_heads * d.text * 2 * 4;
    let lse = d.batch * d.q_heads * d.text * 2 * 4;
    let s_partial = d.batch * text_splits * d.visual * 4;
    let own_scores = if scores.is_some() {
        0
    } else {
        d.batch * d.visual * 4
    };

    let (k_ptr, _k) = k_vis.ptr(stream);
    check_aligned(OP, "k_vis", k_ptr, 16)?;
    let (q_ptr, _q) = q_text.ptr(stream);
    let [qsb, qst, qsh, _] = q_text.layout().strides();
    let [ksb, ksn, ksh, _] = k_vis.layout().strides();
    let keep_sb = keep.layout().stride(0);
    let count_s = count.layout().stride(0);
    let (keep_ptr, _kp) = keep.ptr_mut(stream);
    let (count_ptr, _c) = count.ptr_mut(stream);
    let (t_len, _t) = lengths.t_len.device_ptr(stream);
    let (n_len, _n) = lengths.n_len.device_ptr(stream);
    let ([lse_partial, lse, s_partial, own], _ws) =
        workspace.regions(stream, [lse_partial, lse, s_partial, own_scores])?;
    let (scores_ptr, scores_sb, _s) = match scores {
        Some(s) => {
            let sb = s.layout().stride(0);
            let (p, guard) = s.ptr_mut(stream);
            (p, sb, Some(guard))
        }
        None => (own, d.visual, None),
    };
    let params = ffi::foveal_text_guided_select_params {
        q: q_ptr as *const _,
        q_stride_b: qsb as i64,
        q_stride_t: qst as i64,
        q_stride_h: qsh as i64,
        k: k_ptr as *const _,
        k_stride_b: ksb as i64,
        k_stride_n: ksn as i64,
        k_stride_h: ksh as i64,
        t_len: t_len as *const i32,
        n_len: n_len as *const i32,
        scores: scores_ptr as *mut f32,
        scores_stride_b: scores_sb as i64,
        keep_idx: keep_ptr as *mut i32,
        keep_stride_b: keep_sb as i64,
        keep_count: count_ptr as *mut i32,
        count_stride: count_s as i64,
        lse_partial: lse_partial as *mut f32,
        lse: lse as *mut f32,
        s_partial: s_partial as *mut f32,
        batch: d.batch as i32,
        text: d.text as i32,
        visual: d.visual as i32,
        q_heads: d.q_heads as i32,
        kv_heads: d.kv_heads as i32,
        head_dim: d.head_dim as i32,
        text_splits: text_splits as i32,
        scale: d.scale,
        gamma,
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held with its guard until the kernels are enqueued. `check`
    // bounds t_len <= T and n_len <= N (the device copies are those values),
    // ties the outputs to [B, N] and [B], and the checks above give the key
    // loads their 16-byte alignment and a head dim the shared tiles hold; the
    // workspace regions have the sizes the kernels index ([B, chunks, Hq, T,
    // 2], [B, Hq, T, 2], [B, splits, N], [B, N]); the batch fits the grid.
    let status = unsafe { ffi::foveal_text_guided_select(&params, stream_ptr) };
    check_status(OP, status)
}
