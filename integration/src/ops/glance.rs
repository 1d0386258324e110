//! foveal's Glance2Gaze ops on candle tensors (SPEC "Glance2Gaze"):
//! `glance_fusion` (a `CustomOp2` over the projected layers and the
//! instruction) and `cross_attention` (a `CustomOp3` over q, k, v), which
//! Gaze Compression runs with its learned queries. CPU tensors go to
//! foveal's CPU references, CUDA tensors to its CUDA paths on candle's
//! stream, reading candle's device buffers in place.
//!
//! `cross_attention` and [`AttendLens`] have the signatures of VISOR's
//! wrappers (branch visor-model, `ops/visor.rs`); when both are in, one copy
//! goes.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout as CLayout, Result, Shape, Tensor,
};
use foveal::cross_attention::SeqLens;
use foveal::glance_fusion::Lengths;
use foveal::{View, ViewMut};

use super::{cpu_slice, strided, wrap};

/// Glance Fusion (foveal glance_fusion): `vq [S, B, N, dt]`, the S ViT
/// layers' tokens after their projections, and `e [S, B, M, dt]`, the
/// instruction after each layer's linear map (same dtype; any strides,
/// `dt` contiguous); per row `lengths` valid visual and instruction tokens
/// (a row without instruction tokens is refused). Returns `[B, N, dt]`
/// contiguous in the input type: per token the layers weighted by the
/// softmax over `s` of `mean_m (vq[s, n] . e[s, m]) / sqrt(dt)`; 0 past a
/// row's visual tokens.
pub fn glance_fusion(vq: &Tensor, e: &Tensor, lengths: &Lengths) -> Result<Tensor> {
    if vq.dtype() != e.dtype() {
        bail!(
            "glance_fusion: vq is {:?}, e is {:?}",
            vq.dtype(),
            e.dtype()
        )
    }
    vq.apply_op2_no_bwd(e, &GlanceFusion { lengths })
}

struct GlanceFusion<'a> {
    lengths: &'a Lengths,
}

impl GlanceFusion<'_> {
    fn out_shape(vq: [usize; 4]) -> [usize; 3] {
        [vq[1], vq[2], vq[3]]
    }
}

impl CustomOp2 for GlanceFusion<'_> {
    fn name(&self) -> &'static str {
        "foveal-glance-fusion"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        let (vl, el) = (strided::<4>(l1)?, strided::<4>(l2)?);
        let shape = Self::out_shape(vl.shape());
        let storage = with_element!(s1.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            {
                let vq = View::new(cpu_slice::<T>(s1, l1)?, vl).map_err(wrap)?;
                let e = View::new(cpu_slice::<T>(s2, l2)?, el).map_err(wrap)?;
                let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                foveal::glance_fusion::cpu::glance_fusion(vq, e, self.lengths, &mut o, None)
                    .map_err(wrap)?;
            }
            <T as candle_core::WithDType>::to_cpu_storage_owned(out)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use foveal::cuda::{DevView, DevViewMut, Workspace};
        use foveal::glance_fusion::cuda::{glance_fusion, DeviceLengths};
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (vl, el) = (strided::<4>(l1)?, strided::<4>(l2)?);
        let shape = Self::out_shape(vl.shape());
        // The lengths go up once per call (an asynchronous copy on the stream).
        let lengths = DeviceLengths::new(&stream, self.lengths).map_err(wrap)?;
        let mut workspace = Workspace::new();
        let storage = with_element!(s1.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            {
                let vq = DevView::new(s1.as_cuda_slice::<T>()?.slice(l1.start_offset()..), vl).map_err(wrap)?;
                let e = DevView::new(s2.as_cuda_slice::<T>()?.slice(l2.start_offset()..), el).map_err(wrap)?;
                let mut o = DevViewMut::of(&mut out, foveal::Layout::contiguous(shape)).map_err(wrap)?;
                glance_fusion(&stream, &vq, &e, &lengths, &mut o, None, &mut workspace).map_err(wrap)?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }
}

/// The valid queries and keys of each row of a cross-attention call
/// (foveal's [`SeqLens`]), placed where the tensors live: on a GPU uploaded
/// once, then shared by every call over the same rows.
#[derive(Debug)]
pub struct AttendLens {
    host: SeqLens,
    placed: LensPlaced,
}

#[derive(Debug)]
enum LensPlaced {
    Host,
    #[cfg(feature = "cuda")]
    Device(foveal::cross_attention::cuda::DeviceSeqLens),
}

impl AttendLens {
    /// Row `b` has `q_lens[b]` valid queries and `kv_lens[b]` valid keys
    /// (each a prefix of its row), for tensors on `device`.
    pub fn new(q_lens: &[usize], kv_lens: &[usize], device: &Device) -> Result<Self> {
        let host = SeqLens::new(q_lens, kv_lens).map_err(wrap)?;
        let placed = match device {
            Device::Cpu => LensPlaced::Host,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => LensPlaced::Device(
                foveal::cross_attention::cuda::DeviceSeqLens::new(&d.cuda_stream(), &host)
                    .map_err(wrap)?,
            ),
            d => bail!("foveal: cross_attention runs on CPU or CUDA tensors, not {d:?}"),
        };
        Ok(AttendLens { host, placed })
    }

    pub fn host(&self) -> &SeqLens {
        &self.host
    }
}

/// Non-causal attention of queries over keys (foveal cross_attention): `q
/// [B, Nq, Hq, D]`, `k`, `v` `[B, Nk, Hkv, D]` (any strides, head dim
/// contiguous; GQA: query head `h` reads KV head `h / (Hq / Hkv)`), per row
/// the valid queries and keys `lens` -> `o [B, Nq, Hq, D]` contiguous in q's
/// dtype (0 past a row's queries, and for a row without keys). `scale`
/// defaults to `1/sqrt(D)`.
pub fn cross_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &AttendLens,
    scale: Option<f32>,
) -> Result<Tensor> {
    if q.dtype() != k.dtype() || k.dtype() != v.dtype() {
        bail!(
            "cross_attention: q, k, v are {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    q.apply_op3_no_bwd(k, v, &CrossAttention { lens, scale })
}

struct CrossAttention<'a> {
    lens: &'a AttendLens,
    scale: Option<f32>,
}

impl CustomOp3 for CrossAttention<'_> {
    fn name(&self) -> &'static str {
        "foveal-cross-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        if !matches!(self.lens.placed, LensPlaced::Host) {
            bail!("cross_attention: the lengths were placed on a GPU, the tensors are on the CPU")
        }
        let (ql, kl, vl) = (strided::<4>(l1)?, strided::<4>(l2)?, strided::<4>(l3)?);
        let shape = ql.shape();
        let storage = with_element!(s1.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            {
                let q = View::new(cpu_slice::<T>(s1, l1)?, ql).map_err(wrap)?;
                let k = View::new(cpu_slice::<T>(s2, l2)?, kl).map_err(wrap)?;
                let v = View::new(cpu_slice::<T>(s3, l3)?, vl).map_err(wrap)?;
                let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                foveal::cross_attention::cpu::cross_attention(q, k, v, &self.lens.host, self.scale, &mut o, None)
                    .map_err(wrap)?;
            }
            <T as candle_core::WithDType>::to_cpu_storage_owned(out)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &CLayout,
        s2: &candle_core::CudaStorage,
        l2: &CLayout,
        s3: &candle_core::CudaStorage,
        l3: &CLayout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use foveal::cuda::{DevView, DevViewMut, Workspace};
        let LensPlaced::Device(lens) = &self.lens.placed else {
            bail!("cross_attention: the lengths were placed on the CPU, the tensors are on a GPU")
        };
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (ql, kl, vl) = (strided::<4>(l1)?, strided::<4>(l2)?, strided::<4>(l3)?);
        let shape = ql.shape();
        let mut workspace = Workspace::new();
        let storage = with_element!(s1.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            {
                let q = DevView::new(s1.as_cuda_slice::<T>()?.slice(l1.start_offset()..), ql).map_err(wrap)?;
                let k = DevView::new(s2.as_cuda_slice::<T>()?.slice(l2.start_offset()..), kl).map_err(wrap)?;
                let v = DevView::new(s3.as_cuda_slice::<T>()?.slice(l3.start_offset()..), vl).map_err(wrap)?;
                let mut o = DevViewMut::of(&mut out, foveal::Layout::contiguous(shape)).map_err(wrap)?;
                foveal::cross_attention::cuda::cross_attention(&stream, &q, &k, &v, lens, self.scale, &mut o, None, &mut workspace)
                    .map_err(wrap)?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }
}
