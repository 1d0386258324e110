//! Glance2Gaze's Glance Fusion in an engine's prefill (SPEC "Glance2Gaze
//! (000) / glance_fusion").
//!
//! Before the decoder sees the image, the engine holds the visual tokens of
//! `L` ViT layers after their projections, `vq [L, B, N, dt]`, and the
//! instruction's embeddings after each layer's linear map, `e [L, B, M, dt]`
//! (f32 here; bf16/f16 work the same), with ragged token counts per row.
//! `glance_fusion` weighs the layers per token by their agreement with the
//! instruction (a softmax over the layers) in one pass, giving the fused tokens
//! `[B, N, dt]` that enter the decoder and the weights `[B, N, L]` f32. Gaze
//! Compression later shrinks the visual tokens with cross_attention of learned
//! queries over them (see the visor example for that op).
//!
//! `cargo run -p foveal --example glance2gaze` runs the CPU path; with
//! `--features cuda` the same step runs on cudarc device memory when a GPU is
//! present. The result is checked, then one bad call shows foveal's error.

use foveal::glance_fusion::{cpu::glance_fusion, Lengths};
use foveal::{View, ViewMut};

/// ViT layers fused, batch, visual tokens, instruction tokens, decoder width.
const L: usize = 4;
const B: usize = 2;
const N: usize = 64;
const M: usize = 12;
const DT: usize = 128;

/// Deterministic stand-in activations in [-1, 1].
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn cpu_step(lens: &Lengths, vq: &[f32], e: &[f32]) -> foveal::Result<(Vec<f32>, Vec<f32>)> {
    let (mut out, mut w) = (vec![f32::NAN; B * N * DT], vec![f32::NAN; B * N * L]);
    let (vq, e) = (
        View::contiguous(vq, [L, B, N, DT])?,
        View::contiguous(e, [L, B, M, DT])?,
    );
    let mut out_v = ViewMut::contiguous(&mut out, [B, N, DT])?;
    let mut w_v = ViewMut::contiguous(&mut w, [B, N, L])?;
    glance_fusion(vq, e, lens, &mut out_v, Some(&mut w_v))?;
    Ok((out, w))
}

#[cfg(feature = "cuda")]
type Stream = std::sync::Arc<foveal::cuda::cudarc::driver::CudaStream>;

#[cfg(feature = "cuda")]
fn gpu_step(
    st: &Stream,
    lens: &Lengths,
    vq: &[f32],
    e: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), Box<dyn std::error::Error>> {
    use foveal::cuda::{cudarc::driver::CudaSlice, DevView, DevViewMut, Workspace};
    use foveal::glance_fusion::cuda::{glance_fusion, DeviceLengths};
    use foveal::Layout;
    let (vq, e): (CudaSlice<f32>, _) = (st.clone_htod(vq)?, st.clone_htod(e)?);
    let (vq, e) = (
        DevView::of(&vq, Layout::contiguous([L, B, N, DT]))?,
        DevView::of(&e, Layout::contiguous([L, B, M, DT]))?,
    );
    let (lens, mut ws) = (DeviceLengths::new(st, lens)?, Workspace::new());
    let (mut out, mut w) = (
        st.alloc_zeros::<f32>(B * N * DT)?,
        st.alloc_zeros::<f32>(B * N * L)?,
    );
    let mut out_v = DevViewMut::of(&mut out, Layout::contiguous([B, N, DT]))?;
    let mut w_v = DevViewMut::of(&mut w, Layout::contiguous([B, N, L]))?;
    glance_fusion(st, &vq, &e, &lens, &mut out_v, Some(&mut w_v), &mut ws)?;
    Ok((st.clone_dtoh(&out)?, st.clone_dtoh(&w)?))
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
    // Row 0: 64 visual tokens and a 12-token instruction; row 1: 40 and 7.
    let lens = Lengths::new(&[N, 40], &[M, 7])?;
    let (vq, e) = (fill(L * B * N * DT, 1), fill(L * B * M * DT, 2));
    #[cfg(feature = "cuda")]
    let (out, w) = match gpu() {
        Some(st) => gpu_step(&st, &lens, &vq, &e)?,
        None => cpu_step(&lens, &vq, &e)?,
    };
    #[cfg(not(feature = "cuda"))]
    let (out, w) = cpu_step(&lens, &vq, &e)?;

    for b in 0..B {
        for n in 0..N {
            let (w_n, out_n) = (&w[(b * N + n) * L..][..L], &out[(b * N + n) * DT..][..DT]);
            if n >= lens.n_len()[b] {
                assert!(
                    w_n.iter().chain(out_n).all(|&x| x == 0.0),
                    "padding is written as 0"
                );
                continue;
            }
            assert!(
                (w_n.iter().sum::<f32>() - 1.0).abs() < 1e-5,
                "row {b} token {n}: weights sum to 1"
            );
            // Each fused token is the weighted sum of its layers' tokens.
            for (d, &o) in out_n.iter().enumerate() {
                let want: f32 = (0..L)
                    .map(|s| w_n[s] * vq[((s * B + b) * N + n) * DT + d])
                    .sum();
                assert!(
                    (o - want).abs() < 1e-5,
                    "row {b} token {n} dim {d}: {o} vs {want}"
                );
            }
        }
        println!(
            "row {b}: token 0's layer weights {:?}",
            &w[b * N * L..][..L]
        );
    }

    // A deliberate bad call: a row with no instruction token (nothing to weigh by).
    let bad = Lengths::new(&[N, 40], &[M, 0])?;
    let mut out = vec![0.0; B * N * DT];
    let err = glance_fusion(
        View::contiguous(&vq, [L, B, N, DT])?,
        View::contiguous(&e, [L, B, M, DT])?,
        &bad,
        &mut ViewMut::contiguous(&mut out, [B, N, DT])?,
        None,
    )
    .unwrap_err();
    println!("bad call, refused before any work: {err}");
    assert!(matches!(err, foveal::Error::Value { arg: "m_len", .. }));
    Ok(())
}
