//! foveal's ops on candle tensors: GlimpsePrune's here, FocusLLaVA's,
//! Gaze Attention's, VISOR's and Glance2Gaze's in their own files (re-exported).
//!
//! `glimpse_scores` is a candle `CustomOp2`: `cpu_fwd` runs foveal's CPU
//! reference on candle's host buffers, `cuda_fwd` (feature `cuda`) runs the
//! CUDA path on candle's own stream, reading candle's device buffers in
//! place. The ops whose results are not one tensor (the kept set, the
//! compaction of many caches at once) are functions over the tensors'
//! storages, dispatched the same way. KV caches are candle/HF `[B, Hkv, S, D]`
//! tensors, which foveal reads as its logical `[B, S, Hkv, D]` without a copy.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Layout as CLayout, Result, Shape, Storage, Tensor,
    WithDType,
};
use foveal::compact_kv::cpu as compact_cpu;
use foveal::{
    KeepPositions, KeepRule, KeepSet, Layout, Padding, RowLayout, ScoreMode, View, ViewMut,
};

fn wrap(e: foveal::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Runs `$body` with `$T` bound to the foveal element type of `$dtype`.
macro_rules! with_element {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::F32 => {
                type $T = f32;
                $body
            }
            d => bail!("foveal: unsupported element type {d:?} (bf16, f16 or f32)"),
        }
    };
}

/// Runs `$body` with `$T` bound to the plain type of `$dtype`, for the gathers.
macro_rules! with_plain {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            d => with_element!(d, $T => $body),
        }
    };
}

/// A candle layout as foveal's, in candle's dimension order.
fn strided<const N: usize>(l: &CLayout) -> Result<Layout<N>> {
    let (Ok(dims), Ok(strides)) = (
        <[usize; N]>::try_from(l.dims()),
        <[usize; N]>::try_from(l.stride()),
    ) else {
        bail!(
            "foveal: expected a rank-{N} tensor, got shape {:?}",
            l.dims()
        )
    };
    Layout::strided(dims, strides).map_err(wrap)
}

/// A candle/HF cache `[B, Hkv, S, D]` as foveal's logical `[B, S, Hkv, D]`.
fn kv_layout(l: &CLayout) -> Result<Layout<4>> {
    let [b, h, s, d] = strided::<4>(l)?.shape();
    let st = l.stride();
    Layout::strided([b, s, h, d], [st[0], st[2], st[1], st[3]]).map_err(wrap)
}

fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &CLayout) -> Result<&'a [T]> {
    Ok(&s.as_slice::<T>()?[l.start_offset()..])
}

/// foveal's view of a candle CPU tensor: its storage from the layout's start
/// offset, under `layout` (the tensor's shape and strides, possibly reordered).
fn host_view<'a, T: WithDType, const N: usize>(
    s: &'a CpuStorage,
    l: &CLayout,
    layout: Layout<N>,
) -> Result<View<'a, T, N>> {
    View::new(cpu_slice::<T>(s, l)?, layout).map_err(wrap)
}

/// foveal's view of a candle CUDA tensor ([`host_view`] on the device).
#[cfg(feature = "cuda")]
fn device_view<'a, T: candle_core::cuda_backend::CudaDType, const N: usize>(
    s: &'a candle_core::CudaStorage,
    l: &CLayout,
    layout: Layout<N>,
) -> Result<foveal::cuda::DevView<'a, T, N>> {
    foveal::cuda::DevView::new(s.as_cuda_slice::<T>()?.slice(l.start_offset()..), layout)
        .map_err(wrap)
}

/// A second output of a candle custom op (candle's ops return one tensor):
/// asked for or not; the op's forward leaves its storage here, and the
/// caller takes it as a tensor after the call.
struct SideOutput(Option<std::sync::Mutex<Option<Storage>>>);

impl SideOutput {
    fn wanted() -> Self {
        Self(Some(std::sync::Mutex::new(None)))
    }

    fn unwanted() -> Self {
        Self(None)
    }

    fn is_wanted(&self) -> bool {
        self.0.is_some()
    }

    /// Leaves the output (a no-op when it was not asked for).
    fn keep(&self, storage: Storage) {
        if let Some(Ok(mut slot)) = self.0.as_ref().map(|m| m.lock()) {
            *slot = Some(storage);
        }
    }

    /// The output the forward left, as a tensor of `shape`; `what` names it
    /// in the error when none was left.
    fn into_tensor(self, shape: impl Into<Shape>, what: &str) -> Result<Tensor> {
        let storage = self
            .0
            .and_then(|m| m.into_inner().ok().flatten())
            .ok_or_else(|| candle_core::Error::msg(format!("{what}: the op left no output")))?;
        Ok(Tensor::from_storage(
            storage,
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

fn tensor_from_cpu<T: WithDType>(data: Vec<T>, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cpu(T::to_cpu_storage_owned(data)),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The glimpse token's scores to the visual tokens (foveal::glimpse_scores):
/// `q [B, Hq, D]`, `k [B, Hkv, S, D]` -> `[B, Nv_max, Hq]` f32.
pub fn glimpse_scores(
    q: &Tensor,
    k: &Tensor,
    rows: &RowLayout,
    scale: Option<f32>,
    mode: ScoreMode,
) -> Result<Tensor> {
    q.apply_op2_no_bwd(
        k,
        &GlimpseScores {
            rows: rows.clone(),
            scale,
            mode,
        },
    )
}

struct GlimpseScores {
    rows: RowLayout,
    scale: Option<f32>,
    mode: ScoreMode,
}

impl GlimpseScores {
    fn out_shape(&self, q: &Layout<3>) -> [usize; 3] {
        let [b, hq, _] = q.shape();
        [b, self.rows.nv_max(), hq]
    }
}

impl CustomOp2 for GlimpseScores {
    fn name(&self) -> &'static str {
        "foveal-glimpse-scores"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        if s1.dtype() != s2.dtype() {
            bail!(
                "glimpse_scores: q is {:?} but k is {:?}",
                s1.dtype(),
                s2.dtype()
            )
        }
        let (ql, kl) = (strided::<3>(l1)?, kv_layout(l2)?);
        let shape = self.out_shape(&ql);
        let mut out = vec![0f32; shape.iter().product()];
        with_element!(s1.dtype(), T => {
            let q = host_view::<T, _>(s1, l1, ql)?;
            let k = host_view::<T, _>(s2, l2, kl)?;
            let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
            foveal::glimpse_scores::cpu::glimpse_scores(q, k, &self.rows, self.scale, self.mode, &mut o).map_err(wrap)?
        });
        Ok((CpuStorage::F32(out), Shape::from_dims(&shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use foveal::cuda::{DevViewMut, DeviceRowLayout, Workspace};
        if s1.dtype() != s2.dtype() {
            bail!(
                "glimpse_scores: q is {:?} but k is {:?}",
                s1.dtype(),
                s2.dtype()
            )
        }
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (ql, kl) = (strided::<3>(l1)?, kv_layout(l2)?);
        let shape = self.out_shape(&ql);
        let mut out = dev.alloc_zeros::<f32>(shape.iter().product::<usize>().max(1))?;
        let rows = DeviceRowLayout::new(&stream, &self.rows).map_err(wrap)?;
        let mut workspace = Workspace::new();
        with_element!(s1.dtype(), T => {
            let q = device_view::<T, _>(s1, l1, ql)?;
            let k = device_view::<T, _>(s2, l2, kl)?;
            let mut o = DevViewMut::of(&mut out, Layout::contiguous(shape)).map_err(wrap)?;
            foveal::glimpse_scores::cuda::glimpse_scores(&stream, &q, &k, &rows, self.scale, self.mode, &mut o, &mut workspace)
                .map_err(wrap)?
        });
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from_dims(&shape),
        ))
    }
}

/// What survives pruning: the kept visual tokens and the positions to keep,
/// on the device of the logits they were computed from.
pub struct KeepPlan {
    rows: RowLayout,
    inner: Plan,
}

enum Plan {
    Host {
        keep: KeepSet,
        positions: KeepPositions,
    },
    #[cfg(feature = "cuda")]
    Device {
        stream: std::sync::Arc<cudarc::driver::CudaStream>,
        keep: foveal::cuda::DeviceKeepSet,
        positions: foveal::cuda::DeviceKeepPositions,
    },
}

/// select_keep over the predictor's logits `[B, Nv_max]`, then the positions
/// each row keeps (its text, its kept visual tokens; the last position, the
/// glimpse token, dropped when `drop_last`).
pub fn plan_keep(
    logits: &Tensor,
    rows: &RowLayout,
    rule: &KeepRule,
    drop_last: bool,
) -> Result<KeepPlan> {
    let logits = logits.to_dtype(DType::F32)?;
    let (storage, layout) = logits.storage_and_layout();
    let l = strided::<2>(layout)?;
    let inner = match &*storage {
        Storage::Cpu(s) => {
            let x = host_view::<f32, _>(s, layout, l)?;
            let mut keep = KeepSet::new(rows);
            foveal::select_keep::cpu::select_keep(x, rows, rule, &mut keep).map_err(wrap)?;
            let mut positions = KeepPositions::for_rows(rows, drop_last);
            compact_cpu::keep_positions(rows, &keep, drop_last, &mut positions).map_err(wrap)?;
            Plan::Host { keep, positions }
        }
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => {
            use foveal::cuda::{DeviceKeepPositions, DeviceKeepSet, DeviceRowLayout};
            let stream = s.device().cuda_stream();
            let dev_rows = DeviceRowLayout::new(&stream, rows).map_err(wrap)?;
            let x = device_view::<f32, _>(s, layout, l)?;
            let mut keep = DeviceKeepSet::new(&stream, &dev_rows).map_err(wrap)?;
            foveal::select_keep::cuda::select_keep(&stream, &x, &dev_rows, rule, &mut keep)
                .map_err(wrap)?;
            let mut positions =
                DeviceKeepPositions::for_rows(&stream, &dev_rows, drop_last).map_err(wrap)?;
            foveal::compact_kv::cuda::keep_positions(
                &stream,
                &dev_rows,
                &keep,
                drop_last,
                &mut positions,
            )
            .map_err(wrap)?;
            Plan::Device {
                stream,
                keep,
                positions,
            }
        }
        _ => bail!("foveal: select_keep runs on CPU or CUDA tensors"),
    };
    Ok(KeepPlan {
        rows: rows.clone(),
        inner,
    })
}

impl KeepPlan {
    pub fn rows(&self) -> &RowLayout {
        &self.rows
    }

    /// The kept visual indices of each row, ascending (reads them back from
    /// the GPU when the plan lives there).
    pub fn kept_visual(&self) -> Result<Vec<Vec<usize>>> {
        #[cfg(feature = "cuda")]
        let host: KeepSet;
        let keep = match &self.inner {
            Plan::Host { keep, .. } => keep,
            #[cfg(feature = "cuda")]
            Plan::Device { stream, keep, .. } => {
                host = keep.to_host(stream).map_err(wrap)?;
                &host
            }
        };
        Ok((0..self.rows.batch())
            .map(|b| keep.kept(b).iter().map(|&i| i as usize).collect())
            .collect())
    }

    /// The kept positions of each row (read back from the GPU if needed).
    pub fn positions(&self) -> Result<KeepPositions> {
        match &self.inner {
            Plan::Host { positions, .. } => Ok(positions.clone()),
            #[cfg(feature = "cuda")]
            Plan::Device {
                stream, positions, ..
            } => positions.to_host(stream).map_err(wrap),
        }
    }

    /// The capacity the compacted caches get: exact on the CPU; on the GPU
    /// the row width until [`fetch_max_len`](Self::fetch_max_len).
    pub fn max_len(&self) -> usize {
        match &self.inner {
            Plan::Host { positions, .. } => positions.max_len(),
            #[cfg(feature = "cuda")]
            Plan::Device { positions, .. } => positions.max_len(),
        }
    }

    /// Reads the compacted lengths back from the GPU (a synchronisation:
    /// the caller's choice) so the caches are sized to the new maximum length.
    pub fn fetch_max_len(&mut self) -> Result<usize> {
        match &mut self.inner {
            Plan::Host { positions, .. } => Ok(positions.max_len()),
            #[cfg(feature = "cuda")]
            Plan::Device {
                stream, positions, ..
            } => positions.fetch_max_len(stream).map_err(wrap),
        }
    }
}

/// Compacts the `[B, Hkv, S, D]` caches of every given layer in one call
/// (foveal::compact_kv) into new `[B, Hkv, max_len, D]` caches.
pub fn compact_kv(
    caches: &[(Tensor, Tensor)],
    plan: &KeepPlan,
    padding: Padding,
) -> Result<Vec<(Tensor, Tensor)>> {
    if caches.is_empty() {
        return Ok(Vec::new());
    }
    let tensors: Vec<&Tensor> = caches
        .iter()
        .map(|(k, _)| k)
        .chain(caches.iter().map(|(_, v)| v))
        .collect();
    let dtype = tensors[0].dtype();
    let [b, h, _, d] = <[usize; 4]>::try_from(tensors[0].dims())
        .map_err(|_| candle_core::Error::msg("compact_kv: caches must be [B, Hkv, S, D]"))?;
    let s_new = plan.max_len();
    let dst_layout = Layout::bhsd(b, s_new, h, d);
    let dst_shape = [b, h, s_new, d];
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let n_layers = caches.len();
    let out: Vec<Tensor> = match &plan.inner {
        Plan::Host { positions, .. } => with_element!(dtype, T => {
            let src = guards
                .iter()
                .map(|(s, l)| match &**s {
                    Storage::Cpu(c) => host_view::<T, _>(c, l, kv_layout(l)?),
                    _ => bail!("compact_kv: the caches and the plan must be on one device"),
                })
                .collect::<Result<Vec<View<'_, T, 4>>>>()?;
            let mut data: Vec<Vec<T>> = (0..2 * n_layers).map(|_| vec![T::default(); dst_layout.span()]).collect();
            {
                let mut dst = data.iter_mut().map(|x| ViewMut::new(x, dst_layout).map_err(wrap)).collect::<Result<Vec<_>>>()?;
                let (k_dst, v_dst) = dst.split_at_mut(n_layers);
                compact_cpu::compact_kv(&src[..n_layers], &src[n_layers..], positions, padding, k_dst, v_dst).map_err(wrap)?;
            }
            data.into_iter().map(|x| tensor_from_cpu(x, &dst_shape)).collect()
        }),
        #[cfg(feature = "cuda")]
        Plan::Device {
            stream, positions, ..
        } => with_element!(dtype, T => {
            use foveal::cuda::{DevView, DevViewMut};
            let mut device = None;
            let src = guards
                .iter()
                .map(|(s, l)| match &**s {
                    Storage::Cuda(c) => {
                        device.get_or_insert_with(|| c.device().clone());
                        DevView::new(c.as_cuda_slice::<T>()?.slice(l.start_offset()..), kv_layout(l)?).map_err(wrap)
                    }
                    _ => bail!("compact_kv: the caches and the plan must be on one device"),
                })
                .collect::<Result<Vec<DevView<'_, T, 4>>>>()?;
            let dev = device.expect("at least one cache");
            let mut data = (0..2 * n_layers).map(|_| dev.alloc_zeros::<T>(dst_layout.span().max(1))).collect::<Result<Vec<_>>>()?;
            {
                let mut dst = data.iter_mut().map(|x| DevViewMut::of(x, dst_layout).map_err(wrap)).collect::<Result<Vec<_>>>()?;
                let (k_dst, v_dst) = dst.split_at_mut(n_layers);
                foveal::compact_kv::cuda::compact_kv(stream, &src[..n_layers], &src[n_layers..], positions, padding, k_dst, v_dst)
                    .map_err(wrap)?;
            }
            data.into_iter()
                .map(|x| {
                    let storage = candle_core::CudaStorage::wrap_cuda_slice(x, dev.clone());
                    Tensor::from_storage(Storage::Cuda(storage), &dst_shape, BackpropOp::none(), false)
                })
                .collect()
        }),
    };
    drop(guards);
    let (k, v) = out.split_at(n_layers);
    Ok(k.iter().cloned().zip(v.iter().cloned()).collect())
}

/// The same gather for `[B, S, W]` rows of any plain type (hidden states,
/// position ids) -> `[B, max_len, W]`.
pub fn gather_rows(t: &Tensor, plan: &KeepPlan, padding: Padding) -> Result<Tensor> {
    let (storage, layout) = t.storage_and_layout();
    let src_layout = strided::<3>(layout)?;
    let [b, _, w] = src_layout.shape();
    let shape = [b, plan.max_len(), w];
    let dst_layout = Layout::contiguous(shape);
    let out = match (&plan.inner, &*storage) {
        (Plan::Host { positions, .. }, Storage::Cpu(c)) => with_plain!(t.dtype(), T => {
            let mut data = vec![T::default(); dst_layout.span()];
            let src = host_view::<T, _>(c, layout, src_layout)?;
            compact_cpu::gather_rows(&[src], positions, padding, &mut [ViewMut::new(&mut data, dst_layout).map_err(wrap)?])
                .map_err(wrap)?;
            tensor_from_cpu(data, &shape)
        }),
        #[cfg(feature = "cuda")]
        (
            Plan::Device {
                stream, positions, ..
            },
            Storage::Cuda(c),
        ) => with_plain!(t.dtype(), T => {
            use foveal::cuda::DevViewMut;
            let dev = c.device().clone();
            let mut data = dev.alloc_zeros::<T>(dst_layout.span().max(1))?;
            let src = device_view::<T, _>(c, layout, src_layout)?;
            foveal::compact_kv::cuda::gather_rows(stream, &[src], positions, padding, &mut [DevViewMut::of(&mut data, dst_layout).map_err(wrap)?])
                .map_err(wrap)?;
            Tensor::from_storage(Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(data, dev)), &shape, BackpropOp::none(), false)
        }),
        _ => bail!("gather_rows: the tensor and the plan must be on one device"),
    };
    Ok(out)
}

mod focus;
mod gaze;
mod glance;
mod visor;
pub use focus::{
    multiscale_gather, plan_from_kept, text_guided_select, window_mean, Gathered, TextSelection,
};
pub use gaze::{gaze_decode, region_descriptors, route_topk, GazeIndex, GazeRoutes};
pub use glance::{glance_fusion, glance_fusion_weights};
pub use visor::{
    cross_attention, cross_attention_lse, cross_attention_probs, pos_conv1d, token_pack, AttendLens,
};
