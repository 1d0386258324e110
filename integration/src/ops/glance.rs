//! foveal's Glance2Gaze op on candle tensors (SPEC "Glance2Gaze"):
//! `glance_fusion`, a `CustomOp2` over the projected layers and the
//! instruction. CPU tensors go to foveal's CPU reference, CUDA tensors to its
//! CUDA path on candle's stream, reading candle's device buffers in place.
//! Gaze Compression's attention is VISOR's `cross_attention` wrapper
//! (`ops/visor.rs`) with learned queries.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, DType, Layout as CLayout, Result, Shape, Storage, Tensor,
};
use foveal::glance_fusion::Lengths;
use foveal::ViewMut;

#[cfg(feature = "cuda")]
use super::device_view;
use super::{host_view, strided, wrap, SideOutput};

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
    vq.apply_op2_no_bwd(
        e,
        &GlanceFusion {
            lengths,
            weights: SideOutput::unwanted(),
        },
    )
}

/// [`glance_fusion`] and, from the same call, the layer weights `[B, N, S]`
/// f32 (per token the softmax over the S layers; 0 past a row's visual
/// tokens).
pub fn glance_fusion_weights(
    vq: &Tensor,
    e: &Tensor,
    lengths: &Lengths,
) -> Result<(Tensor, Tensor)> {
    if vq.dtype() != e.dtype() {
        bail!(
            "glance_fusion: vq is {:?}, e is {:?}",
            vq.dtype(),
            e.dtype()
        )
    }
    let op = GlanceFusion {
        lengths,
        weights: SideOutput::wanted(),
    };
    let out = vq.apply_op2_no_bwd(e, &op)?;
    let (s, b, n, _) = vq.dims4()?;
    let weights = op
        .weights
        .into_tensor((b, n, s), "glance_fusion's weights")?;
    Ok((out, weights))
}

struct GlanceFusion<'a> {
    lengths: &'a Lengths,
    /// Where the call leaves its weights, when asked for.
    weights: SideOutput,
}

impl GlanceFusion<'_> {
    fn out_shape(vq: [usize; 4]) -> [usize; 3] {
        [vq[1], vq[2], vq[3]]
    }

    /// `[B, N, S]` of `vq [S, B, N, dt]`.
    fn weights_shape(vq: [usize; 4]) -> [usize; 3] {
        [vq[1], vq[2], vq[0]]
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
        let w_shape = Self::weights_shape(vl.shape());
        let mut weights = vec![
            0f32;
            if self.weights.is_wanted() {
                w_shape.iter().product()
            } else {
                0
            }
        ];
        let storage = with_element!(s1.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            {
                let vq = host_view::<T, _>(s1, l1, vl)?;
                let e = host_view::<T, _>(s2, l2, el)?;
                let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                let mut w = if self.weights.is_wanted() {
                    Some(ViewMut::contiguous(&mut weights, w_shape).map_err(wrap)?)
                } else {
                    None
                };
                foveal::glance_fusion::cpu::glance_fusion(vq, e, self.lengths, &mut o, w.as_mut())
                    .map_err(wrap)?;
            }
            <T as candle_core::WithDType>::to_cpu_storage_owned(out)
        });
        if self.weights.is_wanted() {
            self.weights.keep(Storage::Cpu(CpuStorage::F32(weights)));
        }
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
        use foveal::cuda::{DevViewMut, Workspace};
        use foveal::glance_fusion::cuda::{glance_fusion, DeviceLengths};
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (vl, el) = (strided::<4>(l1)?, strided::<4>(l2)?);
        let shape = Self::out_shape(vl.shape());
        let w_shape = Self::weights_shape(vl.shape());
        let mut weights = if self.weights.is_wanted() {
            Some(dev.alloc_zeros::<f32>(w_shape.iter().product::<usize>().max(1))?)
        } else {
            None
        };
        // The lengths go up once per call (an asynchronous copy on the stream).
        let lengths = DeviceLengths::new(&stream, self.lengths).map_err(wrap)?;
        let mut workspace = Workspace::new();
        let storage = with_element!(s1.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            {
                let vq = device_view::<T, _>(s1, l1, vl)?;
                let e = device_view::<T, _>(s2, l2, el)?;
                let mut o = DevViewMut::of(&mut out, foveal::Layout::contiguous(shape)).map_err(wrap)?;
                let mut w = match weights.as_mut() {
                    Some(w) => Some(DevViewMut::of(w, foveal::Layout::contiguous(w_shape)).map_err(wrap)?),
                    None => None,
                };
                glance_fusion(&stream, &vq, &e, &lengths, &mut o, w.as_mut(), &mut workspace).map_err(wrap)?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        if let Some(w) = weights {
            self.weights
                .keep(Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(
                    w, dev,
                )));
        }
        Ok((storage, Shape::from_dims(&shape)))
    }
}
