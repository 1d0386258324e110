//! CUDA path of glance_fusion (kernels: kernels-cuda/src/glance_fusion.cu).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use foveal_sys as ffi;

use super::{check, Dims, Lengths, OP};
use crate::cuda::{
    check_grid_batch, check_status, driver_err, ffi_stream, sm_count, DevView, DevViewMut,
    Workspace,
};
use crate::dtype::Element;
use crate::error::{ensure, Error, Result};
use crate::glimpse_scores::cuda::ffi_dtype;
use crate::layout::Layout;

/// [`Lengths`] uploaded to the device (once per batch, before the op).
#[derive(Debug)]
pub struct DeviceLengths {
    host: Lengths,
    n_len: CudaSlice<i32>,
    m_len: CudaSlice<i32>,
}

impl DeviceLengths {
    /// Uploads `lengths` (each at most `i32::MAX`, at most 65,535 rows).
    pub fn new(stream: &Arc<CudaStream>, lengths: &Lengths) -> Result<Self> {
        const WHAT: &str = "glance_fusion::DeviceLengths::new";
        check_grid_batch(WHAT, lengths.batch())?;
        let to_i32 = |arg: &'static str, v: &[usize]| -> Result<Vec<i32>> {
            let mut out = Vec::with_capacity(v.len().max(1));
            for &x in v {
                out.push(
                    i32::try_from(x)
                        .map_err(|_| Error::index(WHAT, arg, format!("{x} exceeds i32")))?,
                );
            }
            if out.is_empty() {
                out.push(0); // never read; a zero-length allocation is not a buffer
            }
            Ok(out)
        };
        let n = to_i32("n_len", lengths.n_len())?;
        let m = to_i32("m_len", lengths.m_len())?;
        Ok(DeviceLengths {
            host: lengths.clone(),
            n_len: stream.clone_htod(&n).map_err(driver_err(WHAT))?,
            m_len: stream.clone_htod(&m).map_err(driver_err(WHAT))?,
        })
    }

    /// The host lengths it was made from.
    pub fn host(&self) -> &Lengths {
        &self.host
    }
}

/// Elements of `T` in one 16-byte column.
fn column<T: Element>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// The workspace bytes one call takes: the mean instruction vectors, `[S, B,
/// ceil(dt / v) * v]` f32 (`v` elements in 16 bytes). Reserve them before
/// capturing a CUDA graph.
pub fn workspace_bytes<T: Element>(layers: usize, batch: usize, dim: usize) -> usize {
    Workspace::size_of(&[mean_bytes::<T>(layers, batch, dim)])
}

fn mean_bytes<T: Element>(layers: usize, batch: usize, dim: usize) -> usize {
    layers * batch * dim.div_ceil(column::<T>()) * column::<T>() * 4
}

/// Whether a tensor can be read and written in 16-byte columns: its base on
/// a 16-byte boundary, every stride of a dimension longer than 1 a multiple of
/// the column.
fn columns_aligned<const N: usize>(ptr: u64, layout: &Layout<N>, vec: usize) -> bool {
    ptr % 16 == 0
        && layout
            .shape()
            .iter()
            .zip(layout.strides())
            .all(|(&n, s)| n <= 1 || s % vec == 0)
}

/// Blocks that share one row's tokens: together about two per multiprocessor
/// (each block loads its row's mean instruction vectors once).
fn tiles(d: &Dims, sms: usize) -> usize {
    (2 * sms).div_ceil(d.batch).clamp(1, d.tokens.max(1))
}

/// Fuses the layers of `vq [S, B, N, dt]` under the instruction `e [S, B, M,
/// dt]` into `out [B, N, dt]` and, when given, the weights into `weights [B,
/// N, S]` (module docs). Any strides with `dt` contiguous; 16-byte accesses
/// where the three tensors allow them (bases on 16-byte boundaries, strides
/// and `dt` multiples of 16 bytes), element accesses otherwise. Takes `S <=
/// 8` and `dt <= 4,096`. Scratch memory comes from `workspace`
/// ([`workspace_bytes`]).
#[allow(clippy::too_many_arguments)]
pub fn glance_fusion<T: Element>(
    stream: &Arc<CudaStream>,
    vq: &DevView<'_, T, 4>,
    e: &DevView<'_, T, 4>,
    lengths: &DeviceLengths,
    out: &mut DevViewMut<'_, T, 3>,
    weights: Option<&mut DevViewMut<'_, f32, 3>>,
    workspace: &mut Workspace,
) -> Result<()> {
    let d = check(
        vq.shape(),
        e.shape(),
        &lengths.host,
        out.shape(),
        weights.as_ref().map(|w| w.shape()),
    )?;
    let (max_layers, max_dim) = (
        ffi::FOVEAL_GLANCE_MAX_LAYERS as usize,
        ffi::FOVEAL_GLANCE_MAX_DIM as usize,
    );
    ensure(d.layers <= max_layers && d.dim <= max_dim, || {
        Error::Unsupported {
            op: OP,
            msg: format!(
                "{} layers of width {}: the kernels take at most {max_layers} layers and dt <= {max_dim}",
                d.layers, d.dim
            ),
        }
    })?;
    check_grid_batch(OP, d.batch)?;
    if d.batch == 0 || d.tokens == 0 {
        return Ok(());
    }
    let tiles = tiles(&d, sm_count(stream, OP)?);

    let vec = column::<T>();
    let (vq_ptr, _vq) = vq.ptr(stream);
    let (e_ptr, _e) = e.ptr(stream);
    let [vss, vsb, vsn, _] = vq.layout().strides();
    let [ess, esb, esm, _] = e.layout().strides();
    let out_layout = *out.layout();
    let [osb, osn, _] = out_layout.strides();
    let (out_ptr, _o) = out.ptr_mut(stream);
    let vec16 = d.dim % vec == 0
        && columns_aligned(vq_ptr, vq.layout(), vec)
        && columns_aligned(e_ptr, e.layout(), vec)
        && columns_aligned(out_ptr, &out_layout, vec);
    let (n_len, _n) = lengths.n_len.device_ptr(stream);
    let (m_len, _m) = lengths.m_len.device_ptr(stream);
    let ([e_mean], _ws) = workspace.regions(stream, [mean_bytes::<T>(d.layers, d.batch, d.dim)])?;
    let (w_ptr, [wsb, wsn, _], _w) = match weights {
        Some(w) => {
            let strides = w.layout().strides();
            let (p, guard) = w.ptr_mut(stream);
            (p, strides, Some(guard))
        }
        None => (0, [0; 3], None),
    };
    let params = ffi::foveal_glance_fusion_params {
        vq: vq_ptr as *const _,
        vq_stride_s: vss as i64,
        vq_stride_b: vsb as i64,
        vq_stride_n: vsn as i64,
        e: e_ptr as *const _,
        e_stride_s: ess as i64,
        e_stride_b: esb as i64,
        e_stride_m: esm as i64,
        n_len: n_len as *const i32,
        m_len: m_len as *const i32,
        out: out_ptr as *mut _,
        out_stride_b: osb as i64,
        out_stride_n: osn as i64,
        weights: w_ptr as *mut f32,
        weights_stride_b: wsb as i64,
        weights_stride_n: wsn as i64,
        e_mean: e_mean as *mut f32,
        layers: d.layers as i32,
        batch: d.batch as i32,
        tokens: d.tokens as i32,
        instr: d.instr as i32,
        dim: d.dim as i32,
        tiles: tiles as i32,
        vec16: i32::from(vec16),
        scale: d.scale,
        dtype: ffi_dtype(T::DTYPE),
    };
    let stream_ptr = ffi_stream(stream, OP)?;
    // SAFETY: every pointer is a live device allocation of the stream's
    // context, held with its guard until the kernels are enqueued (weights
    // NULL when absent, which the kernel checks). `check` ties e, out and
    // weights to vq's shape, bounds n_len <= N and 1 <= m_len <= M (the
    // device copies are those values), and the kernels index only below
    // those lengths, the batch and dt; 16-byte accesses only where
    // `columns_aligned` holds for all three tensors; S <= 8 and dt <= 4,096
    // were checked above; the workspace region holds [S, B, ceil(dt / v) * v]
    // floats on a 256-byte boundary; the batch fits the grid.
    let status = unsafe { ffi::foveal_glance_fusion(&params, stream_ptr) };
    check_status(OP, status)
}
