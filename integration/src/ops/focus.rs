//! foveal's FocusLLaVA ops on candle tensors (SPEC "FocusLLaVA"):
//! `window_mean` is a candle `CustomOp1` (one tensor out); `multiscale_gather`
//! and `text_guided_select`, whose results are several tensors, are functions
//! over the storages with the same CPU / CUDA dispatch as the GlimpsePrune
//! wrappers. A [`KeepPlan`] for the row gather is made from
//! text_guided_select's kept indices by [`plan_from_kept`].

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, DType, Layout as CLayout, Result, Shape, Storage, Tensor,
};
use foveal::compact_kv::cpu as compact_cpu;
use foveal::multiscale_gather::max_tokens;
use foveal::text_guided_select::Lengths;
use foveal::window_mean::num_windows;
use foveal::{KeepPositions, KeepSet, Layout, Pool, RowLayout, ScaleSet, ViewMut};

#[cfg(feature = "cuda")]
use super::device_view;
use super::{host_view, strided, tensor_from_cpu, wrap, KeepPlan, Plan};

#[cfg(feature = "cuda")]
fn tensor_from_cuda<T: candle_core::cuda_backend::CudaDType>(
    data: cudarc::driver::CudaSlice<T>,
    dev: &candle_core::CudaDevice,
    shape: &[usize],
) -> Tensor {
    let storage = candle_core::CudaStorage::wrap_cuda_slice(data, dev.clone());
    Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// The mean (or max) of every `window x window` window of `x [B, Hx, Wx, C]`
/// (foveal::window_mean): `[B, M, C]` in the input type, windows in raster
/// order, border windows smaller.
pub fn window_mean(x: &Tensor, window: usize, pool: Pool) -> Result<Tensor> {
    x.apply_op1_no_bwd(&WindowMean { window, pool })
}

struct WindowMean {
    window: usize,
    pool: Pool,
}

impl WindowMean {
    fn out_shape(&self, x: &Layout<4>) -> [usize; 3] {
        let [b, h, w, c] = x.shape();
        [b, num_windows(h, w, self.window), c]
    }
}

impl CustomOp1 for WindowMean {
    fn name(&self) -> &'static str {
        "foveal-window-mean"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        let xl = strided::<4>(l)?;
        let shape = self.out_shape(&xl);
        let storage = with_element!(s.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            let x = host_view::<T, _>(s, l, xl)?;
            let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
            foveal::window_mean::cpu::window_mean(x, self.window, self.pool, &mut o).map_err(wrap)?;
            <T as candle_core::WithDType>::to_cpu_storage_owned(out)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &CLayout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use foveal::cuda::DevViewMut;
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let xl = strided::<4>(l)?;
        let shape = self.out_shape(&xl);
        let storage = with_element!(s.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            let x = device_view::<T, _>(s, l, xl)?;
            let mut o = DevViewMut::of(&mut out, Layout::contiguous(shape)).map_err(wrap)?;
            foveal::window_mean::cuda::window_mean(&stream, &x, self.window, self.pool, &mut o).map_err(wrap)?;
            candle_core::CudaStorage::wrap_cuda_slice(out, dev)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }
}

/// multiscale_gather's outputs, on the device of its inputs.
#[derive(Debug, Clone)]
pub struct Gathered {
    /// `[B, N_out_max, C]`, the input type: each window's tokens at its
    /// chosen scale, windows in order; zeros past the count.
    pub tokens: Tensor,
    /// `[B, N_out_max]` i32: each token's source pixel `y * Wx + x` (the
    /// top-left of its pooled cell); -1 past the count.
    pub positions: Tensor,
    /// `[B]` i32: the tokens of each row.
    pub count: Tensor,
}

/// The vision-guided sampler's gather (foveal::multiscale_gather): per window
/// of `x [B, Hx, Wx, C]` the scale `argmax z` (`z [B, M, S]`, any float type,
/// taken to f32) max-pooled, times its softmax probability when
/// `scale_by_prob` (the paper's Eq. 2).
pub fn multiscale_gather(
    x: &Tensor,
    z: &Tensor,
    window: usize,
    scales: &ScaleSet,
    scale_by_prob: bool,
) -> Result<Gathered> {
    let z = z.to_dtype(DType::F32)?;
    let (xs, xl) = x.storage_and_layout();
    let (zs, zl) = z.storage_and_layout();
    let x_layout = strided::<4>(xl)?;
    let z_layout = strided::<3>(zl)?;
    let [b, h, w, c] = x_layout.shape();
    let n_out = max_tokens(h, w, window, scales);
    let tok_shape = [b, n_out, c];
    let tok_layout = Layout::contiguous(tok_shape);
    let pos_layout = Layout::contiguous([b, n_out]);
    let count_layout = Layout::contiguous([b]);
    let out = match (&*xs, &*zs) {
        (Storage::Cpu(xc), Storage::Cpu(zc)) => with_element!(x.dtype(), T => {
            let mut tokens = vec![T::default(); tok_layout.span()];
            let mut positions = vec![0i32; pos_layout.span()];
            let mut count = vec![0i32; b];
            let xv = host_view::<T, _>(xc, xl, x_layout)?;
            let zv = host_view::<f32, _>(zc, zl, z_layout)?;
            foveal::multiscale_gather::cpu::multiscale_gather(
                xv,
                zv,
                window,
                scales,
                scale_by_prob,
                &mut ViewMut::new(&mut tokens, tok_layout).map_err(wrap)?,
                &mut ViewMut::new(&mut positions, pos_layout).map_err(wrap)?,
                &mut ViewMut::new(&mut count, count_layout).map_err(wrap)?,
            )
            .map_err(wrap)?;
            Gathered {
                tokens: tensor_from_cpu(tokens, &tok_shape),
                positions: tensor_from_cpu(positions, &[b, n_out]),
                count: tensor_from_cpu(count, &[b]),
            }
        }),
        #[cfg(feature = "cuda")]
        (Storage::Cuda(xc), Storage::Cuda(zc)) => with_element!(x.dtype(), T => {
            use foveal::cuda::{DevViewMut, Workspace};
            let dev = xc.device().clone();
            let stream = dev.cuda_stream();
            let mut tokens = dev.alloc_zeros::<T>(tok_layout.span().max(1))?;
            let mut positions = dev.alloc_zeros::<i32>(pos_layout.span().max(1))?;
            let mut count = dev.alloc_zeros::<i32>(b.max(1))?;
            let xv = device_view::<T, _>(xc, xl, x_layout)?;
            let zv = device_view::<f32, _>(zc, zl, z_layout)?;
            let mut workspace = Workspace::new();
            foveal::multiscale_gather::cuda::multiscale_gather(
                &stream,
                &xv,
                &zv,
                window,
                scales,
                scale_by_prob,
                &mut DevViewMut::of(&mut tokens, tok_layout).map_err(wrap)?,
                &mut DevViewMut::of(&mut positions, pos_layout).map_err(wrap)?,
                &mut DevViewMut::of(&mut count, count_layout).map_err(wrap)?,
                &mut workspace,
            )
            .map_err(wrap)?;
            Gathered {
                tokens: tensor_from_cuda(tokens, &dev, &tok_shape),
                positions: tensor_from_cuda(positions, &dev, &[b, n_out]),
                count: tensor_from_cuda(count, &dev, &[b]),
            }
        }),
        _ => bail!("multiscale_gather: x and z must be on one device (CPU or CUDA)"),
    };
    Ok(out)
}

/// text_guided_select's outputs, on the device of its inputs.
#[derive(Debug, Clone)]
pub struct TextSelection {
    /// `[B, N]` i32: each row's kept visual indices ascending, -1 after.
    pub keep: Tensor,
    /// `[B]` i32: the kept tokens of each row.
    pub count: Tensor,
}

impl TextSelection {
    /// The kept indices of each row (a readback from the GPU: the caller's
    /// explicit synchronisation).
    pub fn kept(&self) -> Result<Vec<Vec<usize>>> {
        let keep = self.keep.to_vec2::<i32>()?;
        let count = self.count.to_vec1::<i32>()?;
        Ok(keep
            .iter()
            .zip(&count)
            .map(|(row, &n)| row[..n as usize].iter().map(|&i| i as usize).collect())
            .collect())
    }
}

/// The text-guided sampler (foveal::text_guided_select): `q_text [B, T, Hq,
/// D]` (the text tokens' queries after RoPE) and `k_vis [B, N, Hkv, D]` (the
/// visual keys of the same layer), both in the SPEC's logical order with any
/// strides (a transposed `[B, H, S, D]` view reads in place; on a GPU, 16-byte
/// aligned ones: base and every stride but the head dim's, both tensors for
/// bf16/f16, `k_vis` for f32); `lengths` the valid text and visual tokens of
/// each row.
pub fn text_guided_select(
    q_text: &Tensor,
    k_vis: &Tensor,
    lengths: &Lengths,
    gamma: f32,
) -> Result<TextSelection> {
    if q_text.dtype() != k_vis.dtype() {
        bail!(
            "text_guided_select: q_text is {:?} but k_vis is {:?}",
            q_text.dtype(),
            k_vis.dtype()
        )
    }
    let (qs, ql) = q_text.storage_and_layout();
    let (ks, kl) = k_vis.storage_and_layout();
    let (q_layout, k_layout) = (strided::<4>(ql)?, strided::<4>(kl)?);
    let [b, n, _, _] = k_layout.shape();
    let keep_layout = Layout::contiguous([b, n]);
    let count_layout = Layout::contiguous([b]);
    let out = match (&*qs, &*ks) {
        (Storage::Cpu(qc), Storage::Cpu(kc)) => with_element!(q_text.dtype(), T => {
            let mut keep = vec![0i32; keep_layout.span()];
            let mut count = vec![0i32; b];
            let q = host_view::<T, _>(qc, ql, q_layout)?;
            let k = host_view::<T, _>(kc, kl, k_layout)?;
            foveal::text_guided_select::cpu::text_guided_select(
                q,
                k,
                lengths,
                gamma,
                &mut ViewMut::new(&mut keep, keep_layout).map_err(wrap)?,
                &mut ViewMut::new(&mut count, count_layout).map_err(wrap)?,
                None,
            )
            .map_err(wrap)?;
            TextSelection { keep: tensor_from_cpu(keep, &[b, n]), count: tensor_from_cpu(count, &[b]) }
        }),
        #[cfg(feature = "cuda")]
        (Storage::Cuda(qc), Storage::Cuda(kc)) => with_element!(q_text.dtype(), T => {
            use foveal::cuda::{DevViewMut, Workspace};
            use foveal::text_guided_select::cuda::DeviceLengths;
            let dev = qc.device().clone();
            let stream = dev.cuda_stream();
            let mut keep = dev.alloc_zeros::<i32>(keep_layout.span().max(1))?;
            let mut count = dev.alloc_zeros::<i32>(b.max(1))?;
            let q = device_view::<T, _>(qc, ql, q_layout)?;
            let k = device_view::<T, _>(kc, kl, k_layout)?;
            let dev_lengths = DeviceLengths::new(&stream, lengths).map_err(wrap)?;
            let mut workspace = Workspace::new();
            foveal::text_guided_select::cuda::text_guided_select(
                &stream,
                &q,
                &k,
                &dev_lengths,
                gamma,
                &mut DevViewMut::of(&mut keep, keep_layout).map_err(wrap)?,
                &mut DevViewMut::of(&mut count, count_layout).map_err(wrap)?,
                None,
                &mut workspace,
            )
            .map_err(wrap)?;
            TextSelection { keep: tensor_from_cuda(keep, &dev, &[b, n]), count: tensor_from_cuda(count, &dev, &[b]) }
        }),
        _ => bail!("text_guided_select: q_text and k_vis must be on one device (CPU or CUDA)"),
    };
    Ok(out)
}

/// A [`KeepPlan`] on `device` from host lists of kept visual indices (into
/// each row's visual tokens, ascending): every text position of a row and its
/// kept visual tokens; the last position dropped when `drop_last`
/// (GlimpsePrune's glimpse token). On a GPU the lists are uploaded and the
/// positions built there (foveal keep_positions).
pub fn plan_from_kept(
    rows: &RowLayout,
    kept: &[Vec<usize>],
    drop_last: bool,
    device: &candle_core::Device,
) -> Result<KeepPlan> {
    let keep = KeepSet::from_rows(rows, kept).map_err(wrap)?;
    let inner = match device {
        candle_core::Device::Cpu => {
            let mut positions = KeepPositions::for_rows(rows, drop_last);
            compact_cpu::keep_positions(rows, &keep, drop_last, &mut positions).map_err(wrap)?;
            Plan::Host { keep, positions }
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => {
            use foveal::cuda::{DeviceKeepPositions, DeviceKeepSet, DeviceRowLayout};
            let stream = dev.cuda_stream();
            let dev_rows = DeviceRowLayout::new(&stream, rows).map_err(wrap)?;
            let dev_keep = DeviceKeepSet::from_host(&stream, &keep).map_err(wrap)?;
            let mut positions =
                DeviceKeepPositions::for_rows(&stream, &dev_rows, drop_last).map_err(wrap)?;
            foveal::compact_kv::cuda::keep_positions(
                &stream,
                &dev_rows,
                &dev_keep,
                drop_last,
                &mut positions,
            )
            .map_err(wrap)?;
            Plan::Device {
                stream,
                keep: dev_keep,
                positions,
            }
        }
        _ => bail!("foveal: plans live on CPU or CUDA devices"),
    };
    Ok(KeepPlan {
        rows: rows.clone(),
        inner,
    })
}
