//! foveal's Glance2Gaze op on candle tensors (SPEC "Glance2Gaze"):
//! `glance_fusion`, a `CustomOp2` over the projected layers and the
//! instruction. CPU tensors go to foveal's CPU reference, CUDA tensors to its
//! CUDA path on candle's stream, reading candle's device buffers in place.
//! Gaze Compression's attention is VISOR's `cross_attention` wrapper
//! (`ops/visor.rs`) with learned queries.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout as CLayout, Result, Shape, Tensor};
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
