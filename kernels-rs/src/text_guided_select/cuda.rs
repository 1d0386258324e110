//! CUDA path of text_guided_select (kernels: kernels-cuda/src/text_guided_select.cu).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::Dims;
use super::{check, Lengths, OP};
use crate::cuda::{
    check_aligned, check_grid_batch, check_head_dim, check_row_strides, check_status, driver_err,
    ffi_stream, shared_memory, sm_count, DevView, DevViewMut, Workspace,
};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Error, Result};
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
/// multiple of 16 bytes, at most 256; for bf16 and f16 (the tensor-core
/// path, which copies query rows in 16-byte pieces) `q_text` likewise. Scratch
/// memory comes from `workspace`.
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
    let tensor_cores = T::DTYPE != DType::F32;
    if tensor_cores {
        check_row_strides(OP, "q_text", q_text, vec)?;
    }
    check_grid_batch(OP, d.batch)?;
    if d.batch == 0 {
        return Ok(());
    }

    let plan = Plan::new(T::DTYPE, &d, sm_count(stream, OP)?)?;
    let stream_ptr = ffi_stream(stream, OP)?;
    check_shared_memory(T::DTYPE, d.head_dim)?;

    let key_chunks = d.visual.div_ceil(plan.key_chunk);
    let lse_partial = d.batch * key_chunks * d.q_heads * d.text * 2 * 4;
    let lse = d.batch * d.q_heads * d.text.div_ceil(MMA_TEXT) * MMA_TEXT * 2 * 4;
    let s_partial = d.batch * plan.text_splits * d.visual * 4;
    let own_scores = if scores.is_some() {
        0
    } else {
        d.batch * d.visual * 4
    };

    let (k_ptr, _k) = k_vis.ptr(stream);
    check_aligned(OP, "k_vis", k_ptr, 16)?;
    let (q_ptr, _q) = q_text.ptr(stream);
    if tensor_cores {
        check_aligned(OP, "q_text", q_ptr, 16)?;
    }
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
        key_chunk: plan.key_chunk as i32,
        text_splits: plan.text_splits as i32,
        text_per_split: plan.text_per_split as i32,
        scale: d.scale,
        gamma,
        dtype: ffi_dtype(T::DTYPE),
    };
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held with its guard until the kernels are enqueued. `check`
    // bounds t_len <= T and n_len <= N (the device copies are those values),
    // ties the outputs to [B, N] and [B], and the checks above give the key
    // loads their 16-byte alignment and a head dim the shared tiles hold
    // (the query rows are staged through shared memory, any alignment for
    // f32; bf16/f16 copy them in 16-byte pieces: `check_row_strides` and
    // `check_aligned` on q_text too); the workspace regions have the sizes
    // the kernels index ([B, ceil(N / key_chunk), Hq, T, 2], [B, Hq, T16,
    // 2], [B, splits, N], [B, N]) from the same plan; the grids fit
    // (`Plan::new`, `check_grid_batch`), and the blocks' shared memory the
    // device (`check_shared_memory`).
    let status = unsafe { ffi::foveal_text_guided_select(&params, stream_ptr) };
    check_status(OP, status)
}

/// Text tokens per block of the tensor-core score kernel (foveal.h).
const MMA_TEXT: usize = ffi::FOVEAL_TGS_MMA_TEXT as usize;

/// How the kernels share out one call, from the sizes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    /// Visual tokens per block of the log-sum-exp kernel.
    key_chunk: usize,
    /// Blocks over one row's text tokens in the score kernel, and their
    /// tokens each.
    text_splits: usize,
    text_per_split: usize,
}

impl Plan {
    /// f32 (CUDA cores): 128 visual tokens per block, the text split so that
    /// the score kernels fill the GPU twice over. bf16/f16 (tensor cores):
    /// 16 text tokens per score block; key chunks (whole 64-key stages) that
    /// give the log-sum-exp kernel about two blocks per SM.
    fn new(dtype: DType, d: &Dims, sms: usize) -> Result<Self> {
        let per_split = |splits: usize| d.text.div_ceil(splits.max(1)).max(1);
        let plan = if dtype == DType::F32 {
            let key_chunk = ffi::FOVEAL_TGS_KEYS_PER_BLOCK as usize;
            let blocks = (d.visual.div_ceil(key_chunk) * d.batch).max(1);
            let text_splits = (2 * sms).div_ceil(blocks).clamp(1, d.text.max(1));
            let text_per_split = per_split(text_splits);
            Plan {
                key_chunk,
                text_splits: d.text.div_ceil(text_per_split).max(1),
                text_per_split,
            }
        } else {
            let rows = if d.head_dim > 128 {
                ffi::FOVEAL_TGS_MMA_ROWS_WIDE
            } else {
                ffi::FOVEAL_TGS_MMA_ROWS
            } as usize;
            let unit = ffi::FOVEAL_TGS_KEY_CHUNK as usize;
            let row_blocks =
                d.batch * d.kv_heads * (d.text * (d.q_heads / d.kv_heads)).div_ceil(rows);
            let stages = d.visual.div_ceil(unit).max(1);
            let chunks = (2 * sms).div_ceil(row_blocks.max(1)).clamp(1, stages);
            let key_chunk = stages.div_ceil(chunks) * unit;
            ensure(
                row_blocks / d.batch.max(1) <= 65_535 && d.text.div_ceil(MMA_TEXT) <= 65_535,
                || Error::Unsupported {
                    op: OP,
                    msg: format!(
                        "{} text tokens x {} query heads exceed the kernels' grid",
                        d.text, d.q_heads
                    ),
                },
            )?;
            Plan {
                key_chunk,
                text_splits: d.text.div_ceil(MMA_TEXT).max(1),
                text_per_split: MMA_TEXT,
            }
        };
        Ok(plan)
    }
}

/// Refuses, before anything is allocated or launched, a call whose kernels
/// need more shared memory per block than the current device allows a
/// kernel that opts in (every instance fits 99 KiB, so no current GPU
/// refuses; checked all the same). Make the stream's context current first.
fn check_shared_memory(dtype: DType, head_dim: usize) -> Result<()> {
    let query = ffi::foveal_text_guided_select_params {
        head_dim: head_dim as i32,
        dtype: ffi_dtype(dtype),
        ..Default::default()
    };
    // SAFETY: the query reads only the dtype and head dim of `query` and
    // writes `out`, a valid struct; it enqueues nothing.
    let need = shared_memory(OP, |out| unsafe {
        ffi::foveal_text_guided_select_shared_memory(&query, out)
    })?;
    need.check(
        OP,
        &format!("the query and key tiles of head dim {head_dim}"),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(batch: usize, text: usize, visual: usize, heads: (usize, usize), d: usize) -> Dims {
        Dims {
            batch,
            text,
            visual,
            q_heads: heads.0,
            kv_heads: heads.1,
            head_dim: d,
            scale: 1.0,
        }
    }

    #[test]
    fn tensor_core_plan_covers_the_text_and_keys_in_whole_stages() {
        // Qwen2.5-VL-7B heads, 64 text and 2,880 visual tokens, 132 SMs
        let p = Plan::new(DType::BF16, &dims(1, 64, 2880, (28, 4), 128), 132).unwrap();
        assert_eq!((p.text_splits, p.text_per_split), (4, 16));
        assert_eq!(p.key_chunk % 64, 0);
        // 4 row tiles x 4 KV heads x chunks: about two blocks per SM
        let blocks = 16 * 2880usize.div_ceil(p.key_chunk);
        assert!(
            (3 * 132 / 2..=3 * 132).contains(&blocks),
            "{blocks} blocks, chunk {}",
            p.key_chunk
        );
        // ragged text: the last split is partial; few keys: one chunk
        let p = Plan::new(DType::F16, &dims(2, 17, 5, (3, 1), 256), 132).unwrap();
        assert_eq!((p.text_splits, p.text_per_split, p.key_chunk), (2, 16, 64));
        // no text, no keys: still one split, one chunk of a stage
        let p = Plan::new(DType::BF16, &dims(1, 0, 0, (2, 2), 64), 132).unwrap();
        assert_eq!((p.text_splits, p.key_chunk), (1, 64));
    }

    #[test]
    fn f32_plan_splits_the_text_to_fill_the_gpu() {
        let p = Plan::new(DType::F32, &dims(1, 64, 2880, (28, 4), 128), 132).unwrap();
        assert_eq!(p.key_chunk, 128);
        // every split holds text, together all of it
        assert!(p.text_splits * p.text_per_split >= 64);
        assert!((p.text_splits - 1) * p.text_per_split < 64);
        // 23 key chunks x the splits: at least 1.5 blocks per SM
        assert!(p.text_splits * 23 >= 3 * 132 / 2, "{p:?}");
        let p = Plan::new(DType::F32, &dims(1, 3, 10, (2, 1), 16), 132).unwrap();
        assert_eq!((p.text_splits, p.text_per_split), (3, 1));
    }
}
