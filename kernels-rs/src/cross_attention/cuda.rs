//! CUDA path of cross_attention (kernels: kernels-cuda/src/cross_attention.cu,
//! on the tile machinery of kernels-cuda/src/attention_tile.cuh).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::{check, Dims, SeqLens, OP};
use crate::cuda::{
    check_aligned, check_status, ffi_stream, shared_memory, sm_count, DevView, DevViewMut,
    DeviceLens, Workspace,
};
use crate::dtype::{DType, Element};
use crate::error::{ensure, Error, Result};
use crate::glimpse_scores::cuda::ffi_dtype;

/// [`SeqLens`] uploaded to the device (once per batch, before the op).
#[derive(Debug)]
pub struct DeviceSeqLens {
    host: SeqLens,
    q: DeviceLens,
    kv: DeviceLens,
}

impl DeviceSeqLens {
    /// Uploads `lens` (each at most `i32::MAX`, at most 65,535 rows).
    pub fn new(stream: &Arc<CudaStream>, lens: &SeqLens) -> Result<Self> {
        Ok(DeviceSeqLens {
            host: lens.clone(),
            q: DeviceLens::new(stream, lens.q())?,
            kv: DeviceLens::new(stream, lens.kv())?,
        })
    }

    /// The host lengths it was made from.
    pub fn host(&self) -> &SeqLens {
        &self.host
    }
}

/// Attends every valid query of each row to the row's valid keys (module
/// docs), into `o [B, Nq, Hq, D]` and, when given, `lse [B, Hq, Nq]`.
///
/// Needs q, k, v and o 16-byte aligned with every stride but the head dim's a
/// multiple of 16 bytes, and a head dim that is a multiple of 16 (bf16, f16:
/// the tensor-core tiles) or 4 (f32), at most 256. Scratch for split-KV
/// comes from `workspace` (reserve [`workspace_bytes`] before capturing a
/// graph).
#[allow(clippy::too_many_arguments)]
pub fn cross_attention<T: Element>(
    stream: &Arc<CudaStream>,
    q: &DevView<'_, T, 4>,
    k: &DevView<'_, T, 4>,
    v: &DevView<'_, T, 4>,
    lens: &DeviceSeqLens,
    scale: Option<f32>,
    o: &mut DevViewMut<'_, T, 4>,
    lse: Option<&mut DevViewMut<'_, f32, 3>>,
    workspace: &mut Workspace,
) -> Result<()> {
    let dims = check(
        q.shape(),
        k.shape(),
        v.shape(),
        &lens.host,
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    check_head_dim(T::DTYPE, dims.head_dim)?;
    let vec = 16 / std::mem::size_of::<T>();
    for (arg, shape, strides) in [
        ("q", q.shape(), q.layout().strides()),
        ("k", k.shape(), k.layout().strides()),
        ("v", v.shape(), v.layout().strides()),
        ("o", o.shape(), o.layout().strides()),
    ] {
        let misaligned = (0..3).any(|i| shape[i] > 1 && strides[i] % vec != 0);
        ensure(!misaligned, || Error::Unsupported {
            op: OP,
            msg: format!("the strides of `{arg}` must be multiples of {vec} elements"),
        })?;
    }
    let plan = Plan::new(T::DTYPE, &dims, &lens.host, sm_count(stream, OP)?)?;
    if dims.batch == 0 || dims.queries == 0 {
        return Ok(()); // nothing to write
    }
    let stream_ptr = ffi_stream(stream, OP)?;
    check_shared_memory(T::DTYPE, &dims, &plan)?;

    let (q_ptr, _q) = q.ptr(stream);
    let (k_ptr, _k) = k.ptr(stream);
    let (v_ptr, _v) = v.ptr(stream);
    check_aligned(OP, "q", q_ptr, 16)?;
    check_aligned(OP, "k", k_ptr, 16)?;
    check_aligned(OP, "v", v_ptr, 16)?;
    let [qsb, qsn, qsh, _] = q.layout().strides();
    let [ksb, ksn, ksh, _] = k.layout().strides();
    let [vsb, vsn, vsh, _] = v.layout().strides();
    let [osb, osn, osh, _] = o.layout().strides();
    let (o_ptr, _o) = o.ptr_mut(stream);
    check_aligned(OP, "o", o_ptr, 16)?;
    let lse_strides = lse.as_ref().map_or([0; 3], |l| l.layout().strides());
    let (lse_ptr, _l) = match lse {
        Some(l) => {
            let (ptr, guard) = l.ptr_mut(stream);
            (ptr, Some(guard))
        }
        None => (0, None),
    };
    let (q_len, _ql) = lens.q.dev.device_ptr(stream);
    let (kv_len, _kl) = lens.kv.dev.device_ptr(stream);
    let (partials, _ws) = if plan.num_splits > 1 {
        let (regions, guard) = workspace.regions(stream, plan.region_bytes(&dims))?;
        (regions, Some(guard))
    } else {
        ([0; 2], None)
    };
    let params = ffi::foveal_cross_attention_params {
        q: q_ptr as *const _,
        q_stride_b: qsb as i64,
        q_stride_n: qsn as i64,
        q_stride_h: qsh as i64,
        k: k_ptr as *const _,
        k_stride_b: ksb as i64,
        k_stride_n: ksn as i64,
        k_stride_h: ksh as i64,
        v: v_ptr as *const _,
        v_stride_b: vsb as i64,
        v_stride_n: vsn as i64,
        v_stride_h: vsh as i64,
        q_len: q_len as *const i32,
        kv_len: kv_len as *const i32,
        o: o_ptr as *mut _,
        o_stride_b: osb as i64,
        o_stride_n: osn as i64,
        o_stride_h: osh as i64,
        lse: lse_ptr as *mut f32,
        lse_stride_b: lse_strides[0] as i64,
        lse_stride_h: lse_strides[1] as i64,
        lse_stride_n: lse_strides[2] as i64,
        partial_o: partials[0] as *mut f32,
        partial_ml: partials[1] as *mut f32,
        batch: dims.batch as i32,
        queries: dims.queries as i32,
        keys: dims.keys as i32,
        q_heads: dims.q_heads as i32,
        kv_heads: dims.kv_heads as i32,
        head_dim: dims.head_dim as i32,
        tile_rows: plan.tile_rows as i32,
        num_splits: plan.num_splits as i32,
        scale: dims.scale,
        dtype: ffi_dtype(T::DTYPE),
    };
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held with its ordering guard until the kernels are enqueued;
    // lse is null exactly when no lse view was given, the partials exactly
    // when there is one split. `check` bounds every index the kernels form:
    // q/k/v/o/lse by their validated layouts, the lengths (the device copies
    // of the host lengths it checked) by Nq and Nk, so no query or key past
    // the tensors is read. The checks above give the 16-byte loads and stores
    // aligned bases and strides and a head dim of whole vectors (of whole
    // mma tiles for bf16/f16) that the kernels' tiles hold; `Plan::new`
    // checks the grid and sizes the workspace regions from the same
    // num_splits the kernels index them with; the block's shared memory fits
    // the device (`check_shared_memory`).
    let status = unsafe { ffi::foveal_cross_attention(&params, stream_ptr) };
    check_status(OP, status)
}

/// The workspace bytes [`cross_attention`] uses for these sizes (reserve
/// them before capturing a CUDA graph): `q_shape` `[B, Nq, Hq, D]`.
pub fn workspace_bytes<T: Element>(
    stream: &Arc<CudaStream>,
    lens: &DeviceSeqLens,
    q_shape: [usize; 4],
    kv_heads: usize,
) -> Result<usize> {
    let [batch, queries, q_heads, head_dim] = q_shape;
    ensure(kv_heads > 0 && q_heads % kv_heads == 0, || {
        Error::shape(
            OP,
            "q",
            format!("{q_heads} query heads are not a multiple of {kv_heads} KV heads"),
        )
    })?;
    let dims = Dims {
        batch,
        queries,
        keys: lens.host.kv().iter().copied().max().unwrap_or(0),
        q_heads,
        kv_heads,
        head_dim,
        scale: 1.0,
    };
    let plan = Plan::new(T::DTYPE, &dims, &lens.host, sm_count(stream, OP)?)?;
    Ok(if plan.num_splits > 1 {
        Workspace::size_of(&plan.region_bytes(&dims))
    } else {
        0
    })
}

/// Refuses, before anything is allocated or launched, a call whose attention
/// kernel needs more shared memory per block (its static part plus the
/// dynamic Q and K/V tiles) than the current device allows a kernel that
/// opts in. Every kernel fits sm_80 and sm_90; the head dim 256 tiles (up to
/// 141 KiB) do not fit the 99 KiB of sm_86, sm_89 and sm_120. Make the
/// stream's context current first.
fn check_shared_memory(dtype: DType, dims: &Dims, plan: &Plan) -> Result<()> {
    let query = ffi::foveal_cross_attention_params {
        head_dim: dims.head_dim as i32,
        tile_rows: plan.tile_rows as i32,
        dtype: ffi_dtype(dtype),
        ..Default::default()
    };
    // SAFETY: the query reads only the dtype, head dim and tile rows of
    // `query` and writes `out`, a valid struct; it enqueues nothing.
    let need = shared_memory(OP, |out| unsafe {
        ffi::foveal_cross_attention_shared_memory(&query, out)
    })?;
    let tile = if dtype == DType::F32 {
        "f32"
    } else if plan.tile_rows == ffi::FOVEAL_CROSS_ATTN_DECODE_ROWS as usize {
        "decode"
    } else {
        "prefill"
    };
    need.check(
        OP,
        &format!(
            "the Q tile and K/V stages of the {tile} kernel, {} rows, head dim {}",
            plan.tile_rows, dims.head_dim
        ),
        "; head dims above 128 need a device with more shared memory per block (sm_80, sm_90)",
    )
}

/// The head dims the kernels take: multiples of 16 (bf16, f16) or 4 (f32)
/// up to 256.
fn check_head_dim(dtype: DType, d: usize) -> Result<()> {
    let multiple = if dtype == DType::F32 { 4 } else { 16 };
    let max = ffi::FOVEAL_CROSS_ATTN_MAX_HEAD_DIM as usize;
    ensure(d % multiple == 0 && d <= max, || Error::Unsupported {
        op: OP,
        msg: format!("head dim {d} must be a multiple of {multiple} and at most {max}"),
    })
}

/// Keys whose count bounds the splits of a row (one split per this many
/// keys at most: the kernels' pipeline stages hold 16 to 64 keys).
const KEYS_PER_SPLIT_MIN: usize = 64;
/// Most splits of one tile.
const MAX_SPLITS: usize = 128;

/// The launch shape of one call, from the host lengths only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    tile_rows: usize,
    num_splits: usize,
}

impl Plan {
    fn new(dtype: DType, dims: &Dims, lens: &SeqLens, sms: usize) -> Result<Self> {
        let group = dims.group();
        let max_rows = lens.q().iter().map(|&n| n * group).max().unwrap_or(0);
        let tile_rows = tile_rows(dtype, dims.head_dim, max_rows);
        // Blocks that have rows to attend, and the keys of the longest row.
        let blocks: usize = lens
            .q()
            .iter()
            .map(|&n| (n * group).div_ceil(tile_rows) * dims.kv_heads)
            .sum();
        let max_kv = lens.kv().iter().copied().max().unwrap_or(0);
        let max_splits = max_kv.div_ceil(KEYS_PER_SPLIT_MIN).clamp(1, MAX_SPLITS);
        // Two resident blocks per SM (the prefill kernels' occupancy).
        let num_splits = num_splits(blocks, 2 * sms, max_splits);
        let tiles = (dims.queries * group).div_ceil(tile_rows);
        ensure(
            tiles.saturating_mul(num_splits) <= i32::MAX as usize
                && dims.kv_heads <= 65_535
                && dims.batch <= 65_535,
            || Error::Unsupported {
                op: OP,
                msg: format!(
                    "{} rows x {} KV heads x {tiles} tiles exceed the kernels' grid",
                    dims.batch, dims.kv_heads
                ),
            },
        )?;
        Ok(Plan {
            tile_rows,
            num_splits,
        })
    }

    /// Bytes of the workspace regions: partial outputs, partial (max, sum).
    fn region_bytes(&self, dims: &Dims) -> [usize; 2] {
        let partials = dims.batch * dims.queries * dims.q_heads * self.num_splits;
        [partials * dims.head_dim * 4, partials * 8]
    }
}

/// Rows per block of the kernel that serves these sizes (foveal.h).
fn tile_rows(dtype: DType, head_dim: usize, max_rows: usize) -> usize {
    if dtype == DType::F32 {
        ffi::FOVEAL_CROSS_ATTN_F32_ROWS as usize
    } else if max_rows <= ffi::FOVEAL_CROSS_ATTN_DECODE_ROWS as usize {
        ffi::FOVEAL_CROSS_ATTN_DECODE_ROWS as usize
    } else if head_dim <= 128 {
        ffi::FOVEAL_CROSS_ATTN_PREFILL_ROWS as usize
    } else {
        ffi::FOVEAL_CROSS_ATTN_PREFILL_ROWS_WIDE as usize
    }
}

/// Split-KV factor: 1 when the blocks already fill 80% of a wave of `slots`
/// resident blocks; otherwise the smallest split count (up to `max_splits`)
/// whose last wave is at least 85% as full as the best one's.
fn num_splits(blocks: usize, slots: usize, max_splits: usize) -> usize {
    if blocks == 0 || blocks * 5 >= slots * 4 {
        return 1;
    }
    let fill = |s: usize| {
        let waves = (blocks * s) as f64 / slots as f64;
        waves / waves.ceil()
    };
    let best = (1..=max_splits).map(fill).fold(0.0, f64::max);
    (1..=max_splits)
        .find(|&s| fill(s) >= 0.85 * best)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_only_when_needed() {
        // many blocks: no split
        assert_eq!(num_splits(500, 264, 100), 1);
        assert_eq!(num_splits(212, 264, 100), 1);
        // decode, 4 KV heads, 7,290 keys: about one wave
        let s = num_splits(4, 264, 7290usize.div_ceil(64));
        assert!((56..=66).contains(&s), "{s}");
        // bounded by the keys
        assert_eq!(num_splits(4, 264, 3), 3);
        assert_eq!(num_splits(0, 264, 10), 1);
    }

    #[test]
    fn tile_rows_follow_the_kernels() {
        assert_eq!(tile_rows(DType::BF16, 128, 7), 16);
        assert_eq!(tile_rows(DType::BF16, 128, 16), 16);
        assert_eq!(tile_rows(DType::F16, 64, 17), 128);
        assert_eq!(tile_rows(DType::BF16, 256, 112), 64);
        assert_eq!(tile_rows(DType::F32, 128, 1000), 16);
    }
}
