//! foveal's Gaze Attention ops on candle tensors: region descriptors from a
//! layer's cached keys, per-head routing of a query to its top-k regions,
//! and the sparse decode attention over the routed regions and the
//! always-visible keys. CPU tensors go to foveal's CPU references, CUDA
//! tensors to its CUDA paths on candle's stream, in place. Caches are
//! candle/HF `[B, Hkv, S, D]`; queries are the decoder's `[B, Hq, Sq, D]`.

use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use foveal::{GazeLayout, Layout, Routes, ViewMut};

#[cfg(feature = "cuda")]
use super::device_view;
use super::{host_view, kv_layout, strided, tensor_from_cpu, wrap};

/// A [`GazeLayout`] placed where the tensors it indexes live: the host
/// layout, and on a GPU its upload (made once, shared by every layer).
pub struct GazeIndex {
    layout: GazeLayout,
    placed: Placed,
}

enum Placed {
    Host,
    #[cfg(feature = "cuda")]
    Device {
        stream: std::sync::Arc<cudarc::driver::CudaStream>,
        layout: foveal::gaze_layout::cuda::DeviceGazeLayout,
    },
}

impl GazeIndex {
    /// Places `layout` on `device` (uploads it to a GPU).
    pub fn new(layout: GazeLayout, device: &Device) -> Result<Self> {
        let placed = match device {
            Device::Cpu => Placed::Host,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let stream = d.cuda_stream();
                let dev_layout = foveal::gaze_layout::cuda::DeviceGazeLayout::new(&stream, &layout)
                    .map_err(wrap)?;
                Placed::Device {
                    stream,
                    layout: dev_layout,
                }
            }
            d => bail!("foveal: Gaze Attention runs on CPU or CUDA tensors, not {d:?}"),
        };
        Ok(GazeIndex { layout, placed })
    }

    pub fn layout(&self) -> &GazeLayout {
        &self.layout
    }

    /// Every row's keys up to `end` become visible, and the capacity grows
    /// to `end` (a decode step appended one entry per row); on a GPU the
    /// visible ranges are uploaded again. Region ids stay, so descriptors
    /// and routes made for this index remain valid.
    pub fn extend_visible(&mut self, end: usize) -> Result<()> {
        for b in 0..self.layout.batch() {
            self.layout.extend_visible(b, end).map_err(wrap)?;
        }
        match &mut self.placed {
            Placed::Host => Ok(()),
            #[cfg(feature = "cuda")]
            Placed::Device { stream, layout } => {
                layout.refresh_visible(stream, &self.layout).map_err(wrap)
            }
        }
    }
}

/// route_topk's result, where it was computed.
pub struct GazeRoutes {
    inner: RoutesOn,
}

enum RoutesOn {
    Host(Routes),
    #[cfg(feature = "cuda")]
    Device {
        stream: std::sync::Arc<cudarc::driver::CudaStream>,
        routes: foveal::gaze_layout::cuda::DeviceRoutes,
    },
}

impl GazeRoutes {
    /// The routes on the host (read back from the GPU when computed there:
    /// a synchronisation, the caller's choice).
    pub fn to_host(&self) -> Result<Routes> {
        match &self.inner {
            RoutesOn::Host(r) => Ok(r.clone()),
            #[cfg(feature = "cuda")]
            RoutesOn::Device { stream, routes } => routes.to_host(stream).map_err(wrap),
        }
    }
}

/// The decoder's queries `[B, Hq, Nq, D]` as foveal's logical `[B, Nq, Hq, D]`.
fn query_layout(l: &candle_core::Layout) -> Result<Layout<4>> {
    let [b, h, n, d] = strided::<4>(l)?.shape();
    let st = l.stride();
    Layout::strided([b, n, h, d], [st[0], st[2], st[1], st[3]]).map_err(wrap)
}

fn same_dtype(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!("{op}: {:?} and {:?} tensors", a.dtype(), b.dtype())
    }
    Ok(())
}

/// The mean key of every region of `index` (foveal region_descriptors):
/// `k [B, Hkv, S, D]` (a layer's cache, keys after RoPE) -> desc
/// `[B, Hkv, R_max, D]` f32, zero past each row's regions.
pub fn region_descriptors(k: &Tensor, index: &GazeIndex) -> Result<Tensor> {
    let layout = &index.layout;
    let r = layout.max_regions();
    if r == 0 {
        bail!("region_descriptors: the layout has no regions");
    }
    let [b, hkv, _, d] = <[usize; 4]>::try_from(k.dims())
        .map_err(|_| candle_core::Error::msg("region_descriptors: k must be [B, Hkv, S, D]"))?;
    let shape = [b, hkv, r, d];
    let (storage, l) = k.storage_and_layout();
    let kl = kv_layout(l)?;
    match (&*storage, &index.placed) {
        (Storage::Cpu(s), Placed::Host) => {
            let mut out = vec![0f32; shape.iter().product()];
            with_element!(k.dtype(), T => {
                let kv = host_view::<T, _>(s, l, kl)?;
                let mut desc = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                foveal::region_descriptors::cpu::region_descriptors(kv, layout, 0..r, &mut desc).map_err(wrap)?
            });
            Ok(tensor_from_cpu(out, &shape))
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(s), Placed::Device { stream, layout: dl }) => {
            use foveal::cuda::DevViewMut;
            let dev = s.device.clone();
            let mut out = dev.alloc_zeros::<f32>(shape.iter().product())?;
            with_element!(k.dtype(), T => {
                let kv = device_view::<T, _>(s, l, kl)?;
                let mut desc = DevViewMut::of(&mut out, Layout::contiguous(shape)).map_err(wrap)?;
                foveal::region_descriptors::cuda::region_descriptors(stream, &kv, dl, 0..r, &mut desc).map_err(wrap)?
            });
            Ok(Tensor::from_storage(
                Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev)),
                &shape,
                candle_core::op::BackpropOp::none(),
                false,
            ))
        }
        _ => bail!("region_descriptors: the keys and the layout must be on one device"),
    }
}

/// Each query head's `k` best regions (foveal route_topk): `q [B, Hq, Nq,
/// D]` (after RoPE), `desc [B, Hkv, R, D]` f32 from [`region_descriptors`].
pub fn route_topk(q: &Tensor, desc: &Tensor, index: &GazeIndex, k: usize) -> Result<GazeRoutes> {
    if desc.dtype() != DType::F32 {
        bail!(
            "route_topk: descriptors must be f32, got {:?}",
            desc.dtype()
        )
    }
    let layout = &index.layout;
    let (sq, lq) = q.storage_and_layout();
    let (sd, ld) = desc.storage_and_layout();
    let (ql, dl) = (query_layout(lq)?, strided::<4>(ld)?);
    let [_, nq, hq, _] = ql.shape();
    let inner = match (&*sq, &*sd, &index.placed) {
        (Storage::Cpu(qs), Storage::Cpu(ds), Placed::Host) => {
            let mut routes = Routes::new(layout, nq, hq, k);
            let dv = host_view::<f32, _>(ds, ld, dl)?;
            with_element!(q.dtype(), T => {
                let qv = host_view::<T, _>(qs, lq, ql)?;
                foveal::route_topk::cpu::route_topk(qv, dv, layout, k, &mut routes).map_err(wrap)?
            });
            RoutesOn::Host(routes)
        }
        #[cfg(feature = "cuda")]
        (
            Storage::Cuda(qs),
            Storage::Cuda(ds),
            Placed::Device {
                stream,
                layout: dev_layout,
            },
        ) => {
            use foveal::cuda::Workspace;
            use foveal::gaze_layout::cuda::DeviceRoutes;
            let mut routes = DeviceRoutes::new(stream, dev_layout, nq, hq, k).map_err(wrap)?;
            let dv = device_view::<f32, _>(ds, ld, dl)?;
            let mut workspace = Workspace::new();
            with_element!(q.dtype(), T => {
                let qv = device_view::<T, _>(qs, lq, ql)?;
                foveal::route_topk::cuda::route_topk(stream, &qv, &dv, dev_layout, k, &mut routes, &mut workspace).map_err(wrap)?
            });
            RoutesOn::Device {
                stream: stream.clone(),
                routes,
            }
        }
        _ => bail!("route_topk: the query, the descriptors and the layout must be on one device"),
    };
    Ok(GazeRoutes { inner })
}

/// Sparse decode attention (foveal gaze_decode): `q [B, Hq, D]` of the new
/// token, a layer's cache `k`, `v` `[B, Hkv, S, D]`, each query head
/// attending its row's visible keys and its routed regions -> `[B, Hq, D]`
/// in q's dtype. `scale` defaults to `1/sqrt(D)`.
pub fn gaze_decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    index: &GazeIndex,
    routes: &GazeRoutes,
    scale: Option<f32>,
) -> Result<Tensor> {
    same_dtype("gaze_decode", q, k)?;
    same_dtype("gaze_decode", k, v)?;
    let layout = &index.layout;
    let (sq, lq) = q.storage_and_layout();
    let (sk, lk) = k.storage_and_layout();
    let (sv, lv) = v.storage_and_layout();
    let (ql, kl, vl) = (strided::<3>(lq)?, kv_layout(lk)?, kv_layout(lv)?);
    let shape = ql.shape();
    match (&*sq, &*sk, &*sv, &index.placed, &routes.inner) {
        (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Placed::Host, RoutesOn::Host(r)) => {
            with_element!(q.dtype(), T => {
                let mut out = vec![T::default(); shape.iter().product()];
                {
                    let qv = host_view::<T, _>(qs, lq, ql)?;
                    let kv = host_view::<T, _>(ks, lk, kl)?;
                    let vv = host_view::<T, _>(vs, lv, vl)?;
                    let mut o = ViewMut::contiguous(&mut out, shape).map_err(wrap)?;
                    foveal::gaze_decode::cpu::gaze_decode(qv, kv, vv, layout, r, scale, &mut o, None).map_err(wrap)?;
                }
                Ok(tensor_from_cpu(out, &shape))
            })
        }
        #[cfg(feature = "cuda")]
        (
            Storage::Cuda(qs),
            Storage::Cuda(ks),
            Storage::Cuda(vs),
            Placed::Device {
                stream,
                layout: dev_layout,
            },
            RoutesOn::Device { routes: r, .. },
        ) => {
            use foveal::cuda::{DevViewMut, Workspace};
            let dev = qs.device.clone();
            let mut workspace = Workspace::new();
            with_element!(q.dtype(), T => {
                let mut out = dev.alloc_zeros::<T>(shape.iter().product())?;
                {
                    let qv = device_view::<T, _>(qs, lq, ql)?;
                    let kv = device_view::<T, _>(ks, lk, kl)?;
                    let vv = device_view::<T, _>(vs, lv, vl)?;
                    let mut o = DevViewMut::of(&mut out, Layout::contiguous(shape)).map_err(wrap)?;
                    foveal::gaze_decode::cuda::gaze_decode(stream, &qv, &kv, &vv, dev_layout, r, scale, &mut o, None, &mut workspace)
                        .map_err(wrap)?;
                }
                Ok(Tensor::from_storage(
                    Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(out, dev)),
                    &shape,
                    candle_core::op::BackpropOp::none(),
                    false,
                ))
            })
        }
        _ => bail!(
            "gaze_decode: the query, the caches, the layout and the routes must be on one device"
        ),
    }
}
