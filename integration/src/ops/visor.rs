//! foveal's VISOR ops on candle tensors (SPEC "VISOR"): `cross_attention`
//! (a `CustomOp3` over q, k, v), `pos_conv1d` (a `CustomOp3` over x, the
//! depthwise weight and the bias) and `token_pack` (a `CustomOp1`). CPU
//! tensors go to foveal's CPU references, CUDA tensors to its CUDA paths on
//! candle's stream, reading candle's device buffers in place.

use candle_core::backend::BackendStorage;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout as CLayout, Result, Shape,
    Storage, Tensor,
};
use foveal::cross_attention::SeqLens;
use foveal::ViewMut;

#[cfg(feature = "cuda")]
use super::device_view;
use super::{host_view, strided, wrap, SideOutput};

/// The valid queries and keys of each row of a cross-attention call
/// (foveal's [`SeqLens`]), placed where the tensors live: on a GPU uploaded
/// once, then shared by every layer and decode step that attends over the
/// same rows.
#[derive(Debug)]
pub struct AttendLens {
    host: SeqLens,
    placed: LensPlaced,
}

#[derive(Debug)]
enum LensPlaced {
    Host,
    #[cfg(feature = "cuda")]
    Device(Box<foveal::cross_attention::cuda::DeviceSeqLens>),
}

impl AttendLens {
    /// Row `b` has `q_lens[b]` valid queries and `kv_lens[b]` valid keys
    /// (each a prefix of its row), for tensors on `device`.
    pub fn new(q_lens: &[usize], kv_lens: &[usize], device: &Device) -> Result<Self> {
        let host = SeqLens::new(q_lens, kv_lens).map_err(wrap)?;
        let placed = match device {
            Device::Cpu => LensPlaced::Host,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => LensPlaced::Device(Box::new(
                foveal::cross_attention::cuda::DeviceSeqLens::new(&d.cuda_stream(), &host)
                    .map_err(wrap)?,
            )),
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
    check_dtypes(q, k, v)?;
    q.apply_op3_no_bwd(
        k,
        v,
        &CrossAttention {
            lens,
            scale,
            lse: SideOutput::unwanted(),
        },
    )
}

/// [`cross_attention`] and, from the same call, its log-sum-exp `lse [B,
/// Hq, Nq]` f32 (natural log of each query's softmax denominator over its
/// row's valid keys; `-inf` past a row's queries and for a row without
/// keys), for [`cross_attention_probs`].
pub fn cross_attention_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &AttendLens,
    scale: Option<f32>,
) -> Result<(Tensor, Tensor)> {
    check_dtypes(q, k, v)?;
    let op = CrossAttention {
        lens,
        scale,
        lse: SideOutput::wanted(),
    };
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    let (b, nq, hq, _) = q.dims4()?;
    let lse = op.lse.into_tensor((b, hq, nq), "cross_attention's lse")?;
    Ok((o, lse))
}

/// The attention probabilities of a [`cross_attention`] call, `p [B, Hq,
/// Nq, Nk]` f32: `exp(scale q . k - lse)` from q `[B, Nq, Hq, D]`, k `[B,
/// Nk, Hkv, D]` (GQA as the op) and the call's `lse [B, Hq, Nq]`
/// ([`cross_attention_lse`]); 0 past each row's valid keys and queries
/// (`lens`, on the host). Each valid query's row sums to 1. For pictures:
/// a GEMM of the queries asked for (narrow q and lse to fewer queries
/// first, with lengths to match).
pub fn cross_attention_probs(
    q: &Tensor,
    k: &Tensor,
    lse: &Tensor,
    lens: &SeqLens,
    scale: Option<f32>,
) -> Result<Tensor> {
    let (b, nq, hq, d) = q.dims4()?;
    let (_, nk, hkv, _) = k.dims4()?;
    if hkv == 0 || hq % hkv != 0 || lse.dims3()? != (b, hq, nq) {
        bail!(
            "cross_attention_probs: q {:?}, k {:?}, lse {:?}",
            q.dims(),
            k.dims(),
            lse.dims()
        )
    }
    let (q_lens, kv_lens) = (lens.q(), lens.kv());
    if q_lens.len() != b {
        bail!(
            "cross_attention_probs: lengths of {} rows for {b}",
            q_lens.len()
        )
    }
    let g = hq / hkv;
    let scale = f64::from(scale.unwrap_or(1.0 / (d as f32).sqrt()));
    // [B, Hkv, G * Nq, D] x [B, Hkv, D, Nk]: query head h = kvh * G + j.
    let qf = q
        .to_dtype(DType::F32)?
        .permute((0, 2, 1, 3))?
        .reshape((b, hkv, g * nq, d))?;
    let kt = k
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let logits = (qf.contiguous()?.matmul(&kt)? * scale)?.reshape((b, hq, nq, nk))?;
    let p = logits.broadcast_sub(&lse.unsqueeze(3)?)?.exp()?;
    // 0 outside each row's valid queries x keys (past them lse is -inf, p
    // inf or NaN).
    let mut valid = vec![0u8; b * nq * nk];
    for (r, (&ql, &kl)) in q_lens.iter().zip(kv_lens).enumerate() {
        for i in 0..ql.min(nq) {
            valid[(r * nq + i) * nk..][..kl.min(nk)].fill(1);
        }
    }
    let valid = Tensor::from_vec(valid, (b, 1, nq, nk), q.device())?.broadcast_as(p.shape())?;
    valid.where_cond(&p, &p.zeros_like()?)
}

fn check_dtypes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    if q.dtype() != k.dtype() || k.dtype() != v.dtype() {
        bail!(
            "cross_attention: q, k, v are {:?}, {:?}, {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )
    }
    Ok(())
}

struct CrossAttention<'a> {
    lens: &'a AttendLens,
    scale: Option<f32>,
    /// Where the call leaves its lse, when asked for.
    lse: SideOutput,
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
        let lse_shape = [shape[0], shape[2], shape[1]];
        let mut lse = vec![
            0f32;
            if self.lse.is_wanted() {
                lse_shape.iter().product()
            } else {
                0
            }
        ];
        let storage = with_element!(s1.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            {
                let q = host_view::<T, _>(s1, l1, ql)?;
                let k = host_view::<T, _>(s2, l2, kl)?;
                let v = host_view::<T, _>(s3, l3, vl)?;
                let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                let mut lse_view = if self.lse.is_wanted() {
                    Some(ViewMut::contiguous(&mut lse, lse_shape).map_err(wrap)?)
                } else {
                    None
                };
                foveal::cross_attention::cpu::cross_attention(q, k, v, &self.lens.host, self.scale, &mut o, lse_view.as_mut())
                    .map_err(wrap)?;
            }
            <T as candle_core::WithDType>::to_cpu_storage_owned(out)
        });
        if self.lse.is_wanted() {
            self.lse.keep(Storage::Cpu(CpuStorage::F32(lse)));
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
        s3: &candle_core::CudaStorage,
        l3: &CLayout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use foveal::cuda::{DevViewMut, Workspace};
        let LensPlaced::Device(lens) = &self.lens.placed else {
            bail!("cross_attention: the lengths were placed on the CPU, the tensors are on a GPU")
        };
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (ql, kl, vl) = (strided::<4>(l1)?, strided::<4>(l2)?, strided::<4>(l3)?);
        let shape = ql.shape();
        let lse_shape = [shape[0], shape[2], shape[1]];
        let mut lse = if self.lse.is_wanted() {
            Some(dev.alloc_zeros::<f32>(lse_shape.iter().product::<usize>().max(1))?)
        } else {
            None
        };
        let mut workspace = Workspace::new();
        let storage = with_element!(s1.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            {
                let q = device_view::<T, _>(s1, l1, ql)?;
                let k = device_view::<T, _>(s2, l2, kl)?;
                let v = device_view::<T, _>(s3, l3, vl)?;
                let mut o = DevViewMut::of(&mut out, foveal::Layout::contiguous(shape)).map_err(wrap)?;
                let mut lse_view = match lse.as_mut() {
                    Some(l) => Some(DevViewMut::of(l, foveal::Layout::contiguous(lse_shape)).map_err(wrap)?),
                    None => None,
                };
                foveal::cross_attention::cuda::cross_attention(&stream, &q, &k, &v, lens, self.scale, &mut o, lse_view.as_mut(), &mut workspace)
                    .map_err(wrap)?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        if let Some(l) = lse {
            self.lse
                .keep(Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(
                    l, dev,
                )));
        }
        Ok((storage, Shape::from_dims(&shape)))
    }
}

/// VISOR's conditional position embedding (foveal pos_conv1d): `x [B, N, C]`
/// (any strides, channels contiguous), row `b` valid for its first
/// `lens[b]` tokens, `weight [C, 7]`, `bias [C]` -> `x + DWConv1d(x)` `[B,
/// N, C]` contiguous (zero padding at each row's own ends; 0 past a row's
/// tokens).
pub fn pos_conv1d(x: &Tensor, lens: &[usize], weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.dtype() != weight.dtype() || x.dtype() != bias.dtype() {
        bail!(
            "pos_conv1d: x, weight, bias are {:?}, {:?}, {:?}",
            x.dtype(),
            weight.dtype(),
            bias.dtype()
        )
    }
    x.apply_op3_no_bwd(weight, bias, &PosConv1d { lens })
}

struct PosConv1d<'a> {
    lens: &'a [usize],
}

impl CustomOp3 for PosConv1d<'_> {
    fn name(&self) -> &'static str {
        "foveal-pos-conv1d"
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
        let (xl, wl, bl) = (strided::<3>(l1)?, strided::<2>(l2)?, strided::<1>(l3)?);
        let shape = xl.shape();
        let storage = with_element!(s1.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            {
                let x = host_view::<T, _>(s1, l1, xl)?;
                let w = host_view::<T, _>(s2, l2, wl)?;
                let b = host_view::<T, _>(s3, l3, bl)?;
                let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                foveal::pos_conv1d::cpu::pos_conv1d(x, self.lens, w, b, &mut o).map_err(wrap)?;
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
        use foveal::cuda::{DevViewMut, DeviceLens};
        let dev = s1.device().clone();
        let stream = dev.cuda_stream();
        let (xl, wl, bl) = (strided::<3>(l1)?, strided::<2>(l2)?, strided::<1>(l3)?);
        let shape = xl.shape();
        let lens = DeviceLens::new(&stream, self.lens).map_err(wrap)?;
        let storage = with_element!(s1.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            {
                let x = device_view::<T, _>(s1, l1, xl)?;
                let w = device_view::<T, _>(s2, l2, wl)?;
                let b = device_view::<T, _>(s3, l3, bl)?;
                let mut o = DevViewMut::of(&mut out, foveal::Layout::contiguous(shape)).map_err(wrap)?;
                foveal::pos_conv1d::cuda::pos_conv1d(&stream, &x, &lens, &w, &b, &mut o).map_err(wrap)?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }
}

/// VISOR-TR's token packing (foveal token_pack): each `h x w` grid of `x [B,
/// h, w, C]` (channels last, channels contiguous) resized bilinearly to
/// `H' x W'` (`H' = 2 round(h / sqrt(rho))`, half to even) and packed by
/// space-to-depth -> `[B, H'/2, W'/2, 4C]` contiguous.
pub fn token_pack(x: &Tensor, rho: f64) -> Result<Tensor> {
    x.apply_op1_no_bwd(&TokenPack { rho })
}

struct TokenPack {
    rho: f64,
}

impl TokenPack {
    fn out_shape(&self, x: &foveal::Layout<4>) -> Result<[usize; 4]> {
        let [b, h, w, c] = x.shape();
        let [oh, ow] = foveal::token_pack::resized_grid(h, w, self.rho).map_err(wrap)?;
        Ok([b, oh / 2, ow / 2, 4 * c])
    }
}

impl CustomOp1 for TokenPack {
    fn name(&self) -> &'static str {
        "foveal-token-pack"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        let xl = strided::<4>(l)?;
        let shape = self.out_shape(&xl)?;
        let storage = with_element!(s.dtype(), T => {
            let mut out = vec![T::default(); shape.iter().product()];
            {
                let x = host_view::<T, _>(s, l, xl)?;
                let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                foveal::token_pack::cpu::token_pack(x, self.rho, &mut o).map_err(wrap)?;
            }
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
        let shape = self.out_shape(&xl)?;
        let storage = with_element!(s.dtype(), T => {
            let mut out = dev.alloc_zeros::<T>(shape.iter().product::<usize>().max(1))?;
            {
                let x = device_view::<T, _>(s, l, xl)?;
                let mut o = DevViewMut::of(&mut out, foveal::Layout::contiguous(shape)).map_err(wrap)?;
                foveal::token_pack::cuda::token_pack(&stream, &x, self.rho, &mut o).map_err(wrap)?;
            }
            candle_core::CudaStorage::wrap_cuda_slice(out, dev)
        });
        Ok((storage, Shape::from_dims(&shape)))
    }
}
