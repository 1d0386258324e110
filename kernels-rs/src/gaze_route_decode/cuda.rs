//! CUDA path of gaze_route_decode (kernel: kernels-cuda/src/gaze_route_decode.cu).

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtrMut};
use foveal_sys as ffi;

use super::{check, OP};
use crate::cuda::{
    check_aligned, check_status, ffi_stream, sm_count, DevView, DevViewMut, Workspace,
};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::gaze_decode::cuda::decode_params;
use crate::gaze_decode::Dims;
use crate::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
use crate::gaze_layout::GazeLayout;

/// Attended tokens a split gets at least (by the host's bound), as in gaze_decode.
const MIN_TOKENS_PER_SPLIT: usize = 64;

/// Routes each query head to its `top_k` best regions and attends its row's
/// visible keys and those regions (module docs), in one kernel launch: `o
/// [B, Hq, D]`, `lse [B, Hq]` when given, and `routes` `[B, 1, Hq, top_k]`
/// (e.g. `DeviceRoutes::new(stream, layout, 1, Hq, top_k)`; tied to `layout`
/// after the call), equal to route_topk's.
///
/// Needs what route_topk and gaze_decode need (16-byte-aligned q, k, v and
/// desc, strides but the head dim's multiples of 16 bytes, a head dim that is
/// a multiple of 16 bytes and of 4 elements, at most 256) and at most 4,096
/// regions in a row (their scores sit in shared memory). Scratch comes from
/// `workspace` (reserve [`workspace_bytes`] before capturing a graph).
#[allow(clippy::too_many_arguments)]
pub fn gaze_route_decode<T: Element>(
    stream: &Arc<CudaStream>,
    q: &DevView<'_, T, 3>,
    k: &DevView<'_, T, 4>,
    v: &DevView<'_, T, 4>,
    desc: &DevView<'_, f32, 4>,
    layout: &DeviceGazeLayout,
    top_k: usize,
    scale: Option<f32>,
    o: &mut DevViewMut<'_, T, 3>,
    lse: Option<&mut DevViewMut<'_, f32, 2>>,
    routes: &mut DeviceRoutes,
    workspace: &mut Workspace,
) -> Result<()> {
    let host = layout.host();
    let dims = check(
        q.shape(),
        k.shape(),
        v.shape(),
        desc.shape(),
        host,
        top_k,
        routes.shape(),
        scale,
        o.shape(),
        lse.as_ref().map(|l| l.shape()),
    )?;
    let vec = 16 / std::mem::size_of::<T>();
    let max_d = ffi::FOVEAL_GAZE_MAX_HEAD_DIM as usize;
    ensure(
        dims.head_dim % vec == 0 && dims.head_dim % 4 == 0 && dims.head_dim <= max_d,
        || Error::Unsupported {
            op: OP,
            msg: format!(
                "head dim {} must be a multiple of {} and at most {max_d}",
                dims.head_dim,
                vec.max(4)
            ),
        },
    )?;
    for (arg, shape, strides, unit) in [
        ("q", &q.shape()[..2], &q.layout().strides()[..2], vec),
        ("k", &k.shape()[..3], &k.layout().strides()[..3], vec),
        ("v", &v.shape()[..3], &v.layout().strides()[..3], vec),
        ("desc", &desc.shape()[..3], &desc.layout().strides()[..3], 4),
    ] {
        let misaligned = shape
            .iter()
            .zip(strides)
            .any(|(&n, &s)| n > 1 && s % unit != 0);
        ensure(!misaligned, || Error::Unsupported {
            op: OP,
            msg: format!("the strides of `{arg}` must be multiples of {unit} elements (16 bytes)"),
        })?;
    }
    let plan = Plan::new(&dims, host, sm_count(stream, OP)?)?;

    let (mut decode, _guards) = decode_params(OP, stream, q, k, v, layout, &dims, o, lse)?;
    let (desc_ptr, _d) = desc.ptr(stream);
    check_aligned(OP, "desc", desc_ptr, 16)?;
    let ([segments, partial_o, partial_ml, tickets], _ws) =
        workspace.regions(stream, plan.region_bytes(&dims))?;
    let (route_ids, _ri) = routes.ids.device_ptr_mut(stream);
    let [dsb, dsh, dsr, _] = desc.layout().strides();
    decode.segments = segments as *mut i32;
    decode.partial_o = partial_o as *mut f32;
    decode.partial_ml = partial_ml as *mut f32;
    decode.max_segments = plan.max_segments as i32;
    decode.num_splits = plan.num_splits as i32;
    let params = ffi::foveal_gaze_route_decode_params {
        decode,
        desc: desc_ptr as *const f32,
        desc_stride_b: dsb as i64,
        desc_stride_h: dsh as i64,
        desc_stride_r: dsr as i64,
        routes: route_ids as *mut i32,
        top_k: dims.k as i32,
        tickets: tickets as *mut u32,
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held (with its ordering guard) until this call has enqueued
    // the memset and the kernel; lse is null exactly when no lse view was
    // given. `check` (route_topk's and gaze_decode's checks) and the checks
    // above bound every index the kernel forms: q/k/v/o/lse/desc by their
    // validated layouts (desc [B, Hkv, >= max_regions, D], 16-byte aligned);
    // positions by the GazeLayout (each < seq <= S); region ids by the
    // row's region count (<= max_regions <= FOVEAL_GAZE_ROUTE_MAX_REGIONS,
    // the shared arrays' bound); the routes' buffer holds [B, 1, Hq, top_k]
    // contiguous ids (its shape is checked); the workspace regions by
    // `Plan::region_bytes`, sized from the same `max_segments` and
    // `num_splits` the kernel uses.
    let status = unsafe { ffi::foveal_gaze_route_decode(&params, stream_ptr) };
    check_status(OP, status)?;
    routes.layout_id = host.id();
    Ok(())
}

/// The workspace bytes [`gaze_route_decode`] uses for these sizes (reserve
/// them before capturing a CUDA graph).
pub fn workspace_bytes(
    stream: &Arc<CudaStream>,
    layout: &DeviceGazeLayout,
    q_shape: [usize; 3],
    kv_heads: usize,
    top_k: usize,
) -> Result<usize> {
    let [batch, q_heads, head_dim] = q_shape;
    ensure(kv_heads > 0 && q_heads % kv_heads == 0, || {
        Error::shape(
            OP,
            "q",
            format!("{q_heads} query heads are not a multiple of {kv_heads} KV heads"),
        )
    })?;
    let dims = Dims {
        batch,
        q_heads,
        kv_heads,
        head_dim,
        k: top_k,
        scale: 1.0,
    };
    let plan = Plan::new(&dims, layout.host(), sm_count(stream, OP)?)?;
    Ok(Workspace::size_of(&plan.region_bytes(&dims)))
}

/// The launch shape of one call, from host-known bounds only (gaze_decode's
/// split rule, capped at FOVEAL_GAZE_ROUTE_MAX_SPLITS).
struct Plan {
    units: usize,
    max_segments: usize,
    num_splits: usize,
}

impl Plan {
    fn new(dims: &Dims, layout: &GazeLayout, sms: usize) -> Result<Self> {
        let max_group = ffi::FOVEAL_GAZE_MAX_GROUP as usize;
        let group = dims.q_heads / dims.kv_heads;
        let units = dims.kv_heads * group.div_ceil(max_group);
        let heads_per_unit = group.min(max_group);
        let max_regions = ffi::FOVEAL_GAZE_ROUTE_MAX_REGIONS as usize;
        ensure(layout.max_regions() <= max_regions, || {
            Error::Unsupported {
            op: OP,
            msg: format!(
                "{} regions in a row, the fused kernel holds at most {max_regions} in shared memory (use route_topk + gaze_decode)",
                layout.max_regions()
            ),
        }
        })?;
        let max_segments = layout.max_visible()
            + layout
                .max_regions()
                .min(heads_per_unit.saturating_mul(dims.k));
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
        let blocks_per_split = dims.batch * units;
        let max_splits = max_tokens
            .div_ceil(MIN_TOKENS_PER_SPLIT)
            .clamp(1, ffi::FOVEAL_GAZE_ROUTE_MAX_SPLITS as usize);
        let num_splits = (2 * sms)
            .div_ceil(blocks_per_split.max(1))
            .clamp(1, max_splits);
        let fits = units <= 65_535
            && dims.batch <= 65_535
            && dims
                .batch
                .saturating_mul(units)
                .saturating_mul(num_splits)
                .saturating_mul(max_segments)
                <= i32::MAX as usize / 4
            && heads_per_unit.saturating_mul(dims.k) <= i32::MAX as usize;
        ensure(fits, || {
            Error::Unsupported {
            op: OP,
            msg: format!("{} rows x {units} units x {num_splits} splits x {max_segments} segments exceed the kernel's limits", dims.batch),
        }
        })?;
        Ok(Plan {
            units,
            max_segments,
            num_splits,
        })
    }

    /// Bytes of the workspace regions: segments (one list per block),
    /// partial outputs, partial (max, sum), tickets.
    fn region_bytes(&self, dims: &Dims) -> [usize; 4] {
        let units = dims.batch * self.units;
        let partials = dims.batch * dims.q_heads * self.num_splits;
        [
            units * self.num_splits * self.max_segments * 16,
            partials * dims.head_dim * 4,
            partials * 8,
            units * 4,
        ]
    }
}
