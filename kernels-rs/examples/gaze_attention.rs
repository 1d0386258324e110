//! Gaze Attention in an engine's decode step (SPEC "Gaze Attention (003)").
//!
//! The engine owns one layer's K/V cache `[B, S, Hkv, D]` f32 (bf16/f16 work
//! the same) holding a prompt: system text, a 12 x 12 image cut into regions
//! of 6 x 6 (4 of them), a question. After the prefill it computes each region's mean key
//! once (`region_descriptors`, `desc [B, Hkv, R, D]` f32). Each decode step
//! appends the new token's K/V, makes it visible (`GazeLayout::extend_visible`)
//! and calls `gaze_route_decode`: every query head of `q [B, Hq, D]` routes to
//! its `TOP_K` best regions and attends exactly over the text and those
//! regions only, giving `o [B, Hq, D]` and the routes `[B, 1, Hq, TOP_K]`.
//!
//! `cargo run -p foveal --example gaze_attention` runs the CPU path; with
//! `--features cuda` the same step runs on cudarc device memory when a GPU is
//! present. The result is checked, then one bad call shows foveal's error.

use foveal::{gaze_route_decode as grd, region_descriptors as rd};
use foveal::{GazeLayout, GazeRow, Layout, RegionShape, Routes, View, ViewMut};

/// Batch, cache capacity, query heads, KV heads, head dim, regions routed to.
const B: usize = 1;
const S: usize = 160;
const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 64;
const TOP_K: usize = 2;

/// Deterministic stand-in activations in [-1, 1].
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn cpu_step(
    gl: &GazeLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> foveal::Result<(Vec<f32>, Routes)> {
    let cache = Layout::bshd(B, S, HKV, D);
    let (k, v) = (View::new(k, cache)?, View::new(v, cache)?);
    let mut desc = vec![0.0; B * HKV * gl.max_regions() * D];
    let mut desc_out = ViewMut::contiguous(&mut desc, [B, HKV, gl.max_regions(), D])?;
    rd::cpu::region_descriptors(k, gl, 0..gl.max_regions(), &mut desc_out)?;
    let (mut o, mut routes) = (vec![f32::NAN; B * HQ * D], Routes::new(gl, 1, HQ, TOP_K));
    let desc = View::contiguous(&desc, [B, HKV, gl.max_regions(), D])?;
    let q = View::contiguous(q, [B, HQ, D])?;
    let mut o_out = ViewMut::contiguous(&mut o, [B, HQ, D])?;
    grd::cpu::gaze_route_decode(
        q,
        k,
        v,
        desc,
        gl,
        TOP_K,
        None,
        &mut o_out,
        None,
        &mut routes,
    )?;
    Ok((o, routes))
}

#[cfg(feature = "cuda")]
type Stream = std::sync::Arc<foveal::cuda::cudarc::driver::CudaStream>;

#[cfg(feature = "cuda")]
fn gpu_step(
    st: &Stream,
    gl: &GazeLayout,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(Vec<f32>, Routes), Box<dyn std::error::Error>> {
    use foveal::cuda::{DevView, DevViewMut, Workspace};
    use foveal::gaze_layout::cuda::{DeviceGazeLayout, DeviceRoutes};
    let (cache, r) = (Layout::bshd(B, S, HKV, D), gl.max_regions());
    let (q, k, v) = (st.clone_htod(q)?, st.clone_htod(k)?, st.clone_htod(v)?);
    let (q, k, v) = (
        DevView::of(&q, Layout::contiguous([B, HQ, D]))?,
        DevView::of(&k, cache)?,
        DevView::of(&v, cache)?,
    );
    let (gl_d, mut ws) = (DeviceGazeLayout::new(st, gl)?, Workspace::new());
    let mut desc = st.alloc_zeros::<f32>(B * HKV * r * D)?;
    rd::cuda::region_descriptors(
        st,
        &k,
        &gl_d,
        0..r,
        &mut DevViewMut::of(&mut desc, Layout::contiguous([B, HKV, r, D]))?,
    )?;
    let (mut o, mut routes) = (
        st.alloc_zeros::<f32>(B * HQ * D)?,
        DeviceRoutes::new(st, &gl_d, 1, HQ, TOP_K)?,
    );
    let desc = DevView::of(&desc, Layout::contiguous([B, HKV, r, D]))?;
    let mut o_out = DevViewMut::of(&mut o, Layout::contiguous([B, HQ, D]))?;
    grd::cuda::gaze_route_decode(
        st,
        &q,
        &k,
        &v,
        &desc,
        &gl_d,
        TOP_K,
        None,
        &mut o_out,
        None,
        &mut routes,
        &mut ws,
    )?;
    Ok((st.clone_dtoh(&o)?, routes.to_host(st)?))
}

/// A stream on device 0, or `None` (saying so) where there is no usable GPU.
#[cfg(feature = "cuda")]
fn gpu() -> Option<Stream> {
    use foveal::cuda::cudarc::driver::{sys, CudaContext};
    // SAFETY: only looks for the driver library (dlopen); calls nothing in it.
    let ctx = unsafe { sys::is_culib_present() }.then(|| CudaContext::new(0).ok());
    let stream = ctx.flatten().map(|c| c.default_stream());
    if stream.is_none() {
        println!("built with `cuda` but no CUDA GPU here: running the CPU path");
    }
    stream
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The prompt: system text 0..4, a 12 x 12 image at 4..148 (4 regions of
    // 6 x 6), a question 148..156. The decode token's K/V go to position 156.
    let mut row = GazeRow::new();
    row.push_visible(0..4);
    let regions = row.push_units(&[4], 12, 12, RegionShape::default())?;
    row.push_visible(148..156);
    let mut gl = GazeLayout::new(S, &[row])?;
    gl.extend_visible(0, 157)?;
    let (q, k, v) = (
        fill(B * HQ * D, 1),
        fill(B * S * HKV * D, 2),
        fill(B * S * HKV * D, 3),
    );
    #[cfg(feature = "cuda")]
    let (o, routes) = match gpu() {
        Some(st) => gpu_step(&st, &gl, &q, &k, &v)?,
        None => cpu_step(&gl, &q, &k, &v)?,
    };
    #[cfg(not(feature = "cuda"))]
    let (o, routes) = cpu_step(&gl, &q, &k, &v)?;

    for h in 0..HQ {
        let ids = routes.get(0, 0, h);
        assert!(
            ids.windows(2).all(|w| w[0] < w[1])
                && ids.iter().all(|&r| regions.contains(&(r as usize)))
        );
        // Softmax attention is a convex combination of the values it reads.
        for d in 0..D {
            let vals = (0..157).map(|p| v[(p * HKV + h / (HQ / HKV)) * D + d]);
            let (lo, hi) = vals.fold((f32::MAX, f32::MIN), |(l, u), x| (l.min(x), u.max(x)));
            assert!(
                (lo - 1e-5..=hi + 1e-5).contains(&o[h * D + d]),
                "head {h} dim {d}"
            );
        }
        println!("head {h}: routed to regions {ids:?} of {}", gl.regions(0));
    }

    // A deliberate bad call: a query head dim of 32 on a cache of head dim 64.
    let (q32, mut o32) = (fill(B * HQ * 32, 4), vec![0.0; B * HQ * 32]);
    let cache = Layout::bshd(B, S, HKV, D);
    let desc = vec![0.0; B * HKV * gl.max_regions() * D];
    let err = grd::cpu::gaze_route_decode(
        View::contiguous(&q32, [B, HQ, 32])?,
        View::new(&k, cache)?,
        View::new(&v, cache)?,
        View::contiguous(&desc, [B, HKV, gl.max_regions(), D])?,
        &gl,
        TOP_K,
        None,
        &mut ViewMut::contiguous(&mut o32, [B, HQ, 32])?,
        None,
        &mut Routes::new(&gl, 1, HQ, TOP_K),
    )
    .unwrap_err();
    println!("bad call, refused before any work: {err}");
    assert!(matches!(err, foveal::Error::Shape { .. }));
    Ok(())
}
