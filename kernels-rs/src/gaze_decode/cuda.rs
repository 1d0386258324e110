//! CUDA path of gaze_decode (kernels: kernels-cuda/src/gaze_decode.cu).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, SyncOnDrop};
use foveal_sys as ffi;

use super::{check, Dims, OP};
use crate::cuda::{
    check_aligned, check_head_dim, check_row_strides, check_status, ffi_stream, sm_count, DevView,
    DevViewMut, Workspace,
};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use crate::gaze_layout::GazeLayout;
use crate::glimpse_scores::cuda::ffi_dtype;

/// Attended tokens a split gets at least (by the host's bound), so that short
/// sets are not spread thin over blocks whose merge would cost more than
/// their share.
const MIN_TOKENS_PER_SPLIT: usize = 64;

/// Attends each query head to its row's visible keys and routed regions
/// (module docs), into `o [B, Hq, D]` and, when given, `lse [B, Hq]`.
///
/// Needs 16-byte-aligned q, k and v whose strides (but the head dim's) are
/// multiples of 16 bytes, and a head dim that is a multiple of 16 bytes, at
/// most 256; at most 32,768 regions per row. Scratch comes from `workspace`
/// (reserve [`workspace_bytes`] before capturing a graph).
#[allow(clippy::too_many_arguments)]
pub fn gaze_decode<T: Element>(
    stream: &Arc<CudaStream>,
    q: &DevView<'_, T, 3>,
    k: &DevView<'_, T, 4>,
    v: &DevView<'_, T, 4>,
    layout: &DeviceGazeLayout,
    routes: &DeviceRoutes,
    scale: Option<f32>,
    o: &mut DevViewMut<'_, T, 3>,
    lse: Option<&mut DevViewMut<'_, f32, 2>>,
    workspace: &mut Workspace,
) -> Result<()> {
    let host = layout.host();
    let dims = check(
        q.shape(),
        k.shape(),
        v.shape(),
        host,
        routes.shape(),
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    routes.check_from(OP, layout)?;
    check_views(OP, q, k, v, 16 / std::mem::size_of::<T>())?;
    let plan = Plan::new(OP, &dims, host, sm_count(stream, OP)?, &LIMITS)?;

    let (mut params, _guards) = decode_params(OP, stream, q, k, v, layout, &dims, o, lse)?;
    let (regions, _ws) = workspace.regions(stream, plan.region_bytes(&dims))?;
    let (route_ids, _ri) = routes.ids.device_ptr(stream);
    params.routes = route_ids as *const i32;
    plan.set_workspace(&mut params, regions);
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held (with its ordering guard) until this call has enqueued
    // the kernels; lse is null exactly when no lse view was given. `check`
    // and the checks above bound every index the kernels form: q/k/v/o/lse by
    // their validated layouts; positions by the GazeLayout (each < seq <= S,
    // each region's count and the padded widths from the same host layout as
    // the uploaded arrays); region ids by the routes, checked against this
    // layout (DeviceRoutes::check_from: ids < the row's region count, -1
    // padding); the workspace regions by `Plan::region_bytes`, sized from
    // the same `max_segments`, `max_tokens` and `num_splits` the kernels use
    // (each unit's attended tokens are at most `max_tokens`: its visible
    // keys plus the union of its heads' routed regions).
    let status = unsafe { ffi::foveal_gaze_decode(&params, stream_ptr) };
    check_status(OP, status)
}

/// The view checks gaze_decode and gaze_route_decode share: a head dim that
/// is a multiple of `multiple` elements (the 16-byte vector, or more) and at
/// most FOVEAL_GAZE_MAX_HEAD_DIM, and q, k, v rows at 16-byte strides.
pub(crate) fn check_views<T: Element>(
    op: &'static str,
    q: &DevView<'_, T, 3>,
    k: &DevView<'_, T, 4>,
    v: &DevView<'_, T, 4>,
    multiple: usize,
) -> Result<()> {
    let vec = 16 / std::mem::size_of::<T>();
    let max_d = ffi::FOVEAL_GAZE_MAX_HEAD_DIM as usize;
    check_head_dim(op, q.shape()[2], multiple, max_d)?;
    check_row_strides(op, "q", q, vec)?;
    check_row_strides(op, "k", k, vec)?;
    check_row_strides(op, "v", v, vec)
}

/// The launch parameters gaze_decode and gaze_route_decode share: q, k, v, o
/// and lse (null without an lse view) with their strides, the layout's arrays
/// and widths, and the sizes of the call, after checking that q, k and v are
/// 16-byte aligned. The routes, the workspace regions and the split plan are
/// left null / 0 for the caller to set. The guards order every buffer on
/// `stream`: keep them until the launch is enqueued.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_params<'s, T: Element>(
    op: &'static str,
    stream: &'s CudaStream,
    q: &'s DevView<'_, T, 3>,
    k: &'s DevView<'_, T, 4>,
    v: &'s DevView<'_, T, 4>,
    layout: &'s DeviceGazeLayout,
    dims: &Dims,
    o: &'s mut DevViewMut<'_, T, 3>,
    lse: Option<&'s mut DevViewMut<'_, f32, 2>>,
) -> Result<(ffi::foveal_gaze_decode_params, Vec<SyncOnDrop<'s>>)> {
    let host = layout.host();
    let (q_ptr, q_guard) = q.ptr(stream);
    let (k_ptr, k_guard) = k.ptr(stream);
    let (v_ptr, v_guard) = v.ptr(stream);
    check_aligned(op, "q", q_ptr, 16)?;
    check_aligned(op, "k", k_ptr, 16)?;
    check_aligned(op, "v", v_ptr, 16)?;
    let o_strides = o.layout().strides();
    let (o_ptr, o_guard) = o.ptr_mut(stream);
    let lse_strides = lse.as_ref().map_or([0, 0], |l| l.layout().strides());
    let mut guards = vec![q_guard, k_guard, v_guard, o_guard];
    let lse_ptr = match lse {
        Some(l) => {
            let (ptr, guard) = l.ptr_mut(stream);
            guards.push(guard);
            ptr
        }
        None => 0,
    };
    let mut array = |a: &'s CudaSlice<i32>| {
        let (ptr, guard) = a.device_ptr(stream);
        guards.push(guard);
        ptr as *const i32
    };
    let (region_count, region_len, region_pos) = (
        array(&layout.region_count),
        array(&layout.region_len),
        array(&layout.region_pos),
    );
    let (visible_count, visible) = (array(&layout.visible_count), array(&layout.visible));
    let [qsb, qsh, _] = q.layout().strides();
    let [ksb, kss, ksh, _] = k.layout().strides();
    let [vsb, vss, vsh, _] = v.layout().strides();
    let params = ffi::foveal_gaze_decode_params {
        q: q_ptr as *const _,
        q_stride_b: qsb as i64,
        q_stride_h: qsh as i64,
        k: k_ptr as *const _,
        k_stride_b: ksb as i64,
        k_stride_s: kss as i64,
        k_stride_h: ksh as i64,
        v: v_ptr as *const _,
        v_stride_b: vsb as i64,
        v_stride_s: vss as i64,
        v_stride_h: vsh as i64,
        region_count,
        region_len,
        region_pos,
        visible_count,
        visible,
        max_regions: host.max_regions() as i32,
        max_region_len: host.max_region_len() as i32,
        max_visible: host.max_visible() as i32,
        routes: std::ptr::null(),
        route_k: dims.k as i32,
        o: o_ptr as *mut _,
        o_stride_b: o_strides[0] as i64,
        o_stride_h: o_strides[1] as i64,
        lse: lse_ptr as *mut f32,
        lse_stride_b: lse_strides[0] as i64,
        lse_stride_h: lse_strides[1] as i64,
        segments: std::ptr::null_mut(),
        unit_info: std::ptr::null_mut(),
        token_pos: std::ptr::null_mut(),
        token_mask: std::ptr::null_mut(),
        partial_o: std::ptr::null_mut(),
        partial_ml: std::ptr::null_mut(),
        batch: dims.batch as i32,
        q_heads: dims.q_heads as i32,
        kv_heads: dims.kv_heads as i32,
        head_dim: dims.head_dim as i32,
        max_segments: 0,
        max_tokens: 0,
        num_splits: 0,
        scale: dims.scale,
        dtype: ffi_dtype(T::DTYPE),
    };
    Ok((params, guards))
}

/// The workspace bytes [`gaze_decode`] uses for these sizes (reserve them
/// before capturing a CUDA graph).
pub fn workspace_bytes(
    stream: &Arc<CudaStream>,
    layout: &DeviceGazeLayout,
    q_shape: [usize; 3],
    kv_heads: usize,
    k: usize,
) -> Result<usize> {
    let dims = workspace_dims(OP, q_shape, kv_heads, k)?;
    let plan = Plan::new(OP, &dims, layout.host(), sm_count(stream, OP)?, &LIMITS)?;
    Ok(Workspace::size_of(&plan.region_bytes(&dims)))
}

/// The sizes a `workspace_bytes` call describes (gaze_decode's and
/// gaze_route_decode's): q `[B, Hq, D]`, `kv_heads` and `k` routes per head.
pub(crate) fn workspace_dims(
    op: &'static str,
    q_shape: [usize; 3],
    kv_heads: usize,
    k: usize,
) -> Result<Dims> {
    let [batch, q_heads, head_dim] = q_shape;
    ensure(kv_heads > 0 && q_heads % kv_heads == 0, || {
        Error::shape(
            op,
            "q",
            format!("{q_heads} query heads are not a multiple of {kv_heads} KV heads"),
        )
    })?;
    Ok(Dims {
        batch,
        q_heads,
        kv_heads,
        head_dim,
        k,
        scale: 1.0,
    })
}

/// What the kernels of gaze_decode and gaze_route_decode bound differently.
pub(crate) struct Limits {
    /// Most regions in a row, and the error's words for a row with more (of
    /// its region count and that bound).
    pub max_regions: usize,
    pub too_many_regions: fn(usize, usize) -> String,
    /// Most blocks sharing one unit's attended set.
    pub max_splits: usize,
}

/// gaze_decode's bounds: the per-region head masks of a unit in shared
/// memory; the merge's weights (a float per split) in the attend kernel's
/// ring, which holds thousands, far more than the split rule asks.
const LIMITS: Limits = Limits {
    max_regions: ffi::FOVEAL_GAZE_MAX_REGIONS as usize,
    too_many_regions: |n, max| format!("{n} regions in a row, the kernels take at most {max}"),
    max_splits: ffi::FOVEAL_GAZE_ROUTE_MAX_SPLITS as usize,
};

/// Blocks of the attend kernels an SM holds at once (their design: shared
/// memory for two of them, docs/ops/gaze_decode.md).
const BLOCKS_PER_SM: usize = 2;

/// The launch shape of one call of gaze_decode or gaze_route_decode, from
/// host-known bounds only.
pub(crate) struct Plan {
    /// Units (row, KV head, chunk of query heads) per row.
    pub units: usize,
    pub max_segments: usize,
    /// Bound on any unit's attended tokens.
    pub max_tokens: usize,
    pub num_splits: usize,
}

impl Plan {
    pub(crate) fn new(
        op: &'static str,
        dims: &Dims,
        layout: &GazeLayout,
        sms: usize,
        limits: &Limits,
    ) -> Result<Self> {
        let max_group = ffi::FOVEAL_GAZE_MAX_GROUP as usize;
        let group = dims.q_heads / dims.kv_heads;
        let units = dims.kv_heads * group.div_ceil(max_group);
        let heads_per_unit = group.min(max_group);
        ensure(layout.max_regions() <= limits.max_regions, || {
            Error::Unsupported {
                op,
                msg: (limits.too_many_regions)(layout.max_regions(), limits.max_regions),
            }
        })?;
        let max_segments = layout.max_visible()
            + layout
                .max_regions()
                .min(heads_per_unit.saturating_mul(dims.k));
        // A bound on any unit's attended tokens: its visible keys plus the
        // union of at most heads_per_unit * k regions.
        let union_bound = heads_per_unit
            .saturating_mul(dims.k)
            .saturating_mul(layout.max_region_len());
        let max_tokens = (0..layout.batch())
            .map(|b| {
                let regions: usize = (0..layout.regions(b))
                    .map(|r| layout.region(b, r).len())
                    .sum();
                layout.visible_len(b) + regions.min(union_bound)
            })
            .max()
            .unwrap_or(0);
        // Flash-decoding split: one wave of the attend blocks (as many as the
        // SMs hold at once, whole splits per unit), at least
        // MIN_TOKENS_PER_SPLIT tokens of the bound each.
        let unit_count = dims.batch * units;
        let max_splits = max_tokens
            .div_ceil(MIN_TOKENS_PER_SPLIT)
            .clamp(1, limits.max_splits);
        let num_splits = (BLOCKS_PER_SM * sms / unit_count.max(1)).clamp(1, max_splits);
        // The kernels' int32 index space and grids (y, z <= 65,535; the fused
        // kernel's one-dimensional grid of routers and attend blocks).
        let fits = units <= 65_535
            && dims.batch <= 65_535
            && max_tokens <= i32::MAX as usize
            && unit_count.saturating_mul(max_segments) <= i32::MAX as usize / 4
            && unit_count.saturating_mul(heads_per_unit + num_splits) <= i32::MAX as usize
            && heads_per_unit.saturating_mul(dims.k) <= i32::MAX as usize;
        ensure(fits, || {
            Error::Unsupported {
            op,
            msg: format!(
                "{} rows x {units} units x {max_segments} segments ({max_tokens} tokens) exceed the kernels' limits",
                dims.batch
            ),
        }
        })?;
        Ok(Plan {
            units,
            max_segments,
            max_tokens,
            num_splits,
        })
    }

    /// Bytes of the workspace regions of gaze_decode and gaze_route_decode:
    /// segments and records of the units (and the fused kernel's block
    /// counter), the units' token lists (positions, masks), partial outputs,
    /// partial (max, sum).
    pub(crate) fn region_bytes(&self, dims: &Dims) -> [usize; 6] {
        let units = dims.batch * self.units;
        let partials = dims.batch * dims.q_heads * self.num_splits;
        let words = ffi::FOVEAL_GAZE_UNIT_WORDS as usize;
        [
            units * self.max_segments * 16,
            (units * words + 1) * 4,
            units * self.max_tokens * 4,
            units * self.max_tokens,
            partials * dims.head_dim * 4,
            partials * 8,
        ]
    }

    /// Points `params` at the workspace regions carved for
    /// [`Plan::region_bytes`] and sets the plan's sizes.
    pub(crate) fn set_workspace(
        &self,
        params: &mut ffi::foveal_gaze_decode_params,
        regions: [u64; 6],
    ) {
        let [segments, unit_info, token_pos, token_mask, partial_o, partial_ml] = regions;
        params.segments = segments as *mut i32;
        params.unit_info = unit_info as *mut i32;
        params.token_pos = token_pos as *mut i32;
        params.token_mask = token_mask as *mut u8;
        params.partial_o = partial_o as *mut f32;
        params.partial_ml = partial_ml as *mut f32;
        params.max_segments = self.max_segments as i32;
        params.max_tokens = self.max_tokens as i32;
        params.num_splits = self.num_splits as i32;
    }
}
