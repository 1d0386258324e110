//! FocusLLaVA's text-guided sampler in an engine's prefill (SPEC "FocusLLaVA
//! (004) / text_guided_select").
//!
//! At the chosen layer the engine owns the K cache `[B, S, Hkv, D]` f32
//! (bf16/f16 work the same) of two ragged rows: system text 0..2, the image's
//! visual tokens from position 2, then the question. `text_guided_select`
//! reads the question's queries `q_text [B, T, Hq, D]` and the visual keys in
//! place: a strided view `[B, N, Hkv, D]` of the cache at the image's offset,
//! no copy. It returns the kept visual indices `[B, N]` i32 (ascending, -1
//! padded), their count `[B]` and the scores `S [B, N]` f32: the smallest set
//! of tokens holding more than `GAMMA` of the text's attention. The engine
//! then drops the others from the cache (as compact_kv does). The
//! vision-guided sampler (window_mean, multiscale_gather) runs on the vision
//! tower's feature map before the decoder, not on a cache.
//!
//! `cargo run -p foveal --example focus_llava` runs the CPU path; with
//! `--features cuda` the same step runs on cudarc device memory when a GPU is
//! present. The result is checked, then one bad call shows foveal's error.

use foveal::text_guided_select::{cpu::text_guided_select, Lengths};
use foveal::{Layout, View, ViewMut};

/// Batch, cache capacity, text queries, query heads, KV heads, head dim, visual tokens.
const B: usize = 2;
const S: usize = 48;
const T: usize = 6;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 64;
const N: usize = 36;
const GAMMA: f32 = 0.85;
/// The visual keys: `[B, N, Hkv, D]` inside the `[B, S, Hkv, D]` cache, from position 2.
const VIS_OFFSET: usize = 2 * HKV * D;

fn vis_layout() -> Layout<4> {
    Layout::strided([B, N, HKV, D], [S * HKV * D, HKV * D, D, 1]).expect("valid strides")
}

/// Deterministic stand-in activations in [-1, 1].
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Kept indices, counts and scores, on the host.
type Step = (Vec<i32>, Vec<i32>, Vec<f32>);

fn cpu_step(lens: &Lengths, q: &[f32], k: &[f32]) -> foveal::Result<Step> {
    let (mut keep, mut count, mut scores) = (vec![0; B * N], vec![0; B], vec![0.0; B * N]);
    let q = View::contiguous(q, [B, T, HQ, D])?;
    let k_vis = View::new(&k[VIS_OFFSET..], vis_layout())?;
    let mut keep_out = ViewMut::contiguous(&mut keep, [B, N])?;
    let mut count_out = ViewMut::contiguous(&mut count, [B])?;
    let mut s_out = ViewMut::contiguous(&mut scores, [B, N])?;
    text_guided_select(
        q,
        k_vis,
        lens,
        GAMMA,
        &mut keep_out,
        &mut count_out,
        Some(&mut s_out),
    )?;
    Ok((keep, count, scores))
}

#[cfg(feature = "cuda")]
type Stream = std::sync::Arc<foveal::cuda::cudarc::driver::CudaStream>;

#[cfg(feature = "cuda")]
fn gpu_step(
    st: &Stream,
    lens: &Lengths,
    q: &[f32],
    k: &[f32],
) -> Result<Step, Box<dyn std::error::Error>> {
    use foveal::cuda::{DevView, DevViewMut, Workspace};
    use foveal::text_guided_select::cuda::{text_guided_select, DeviceLengths};
    let (q, k, lens) = (
        st.clone_htod(q)?,
        st.clone_htod(k)?,
        DeviceLengths::new(st, lens)?,
    );
    let q = DevView::of(&q, Layout::contiguous([B, T, HQ, D]))?;
    let k_vis = DevView::new(k.slice(VIS_OFFSET..), vis_layout())?;
    let (mut keep, mut count) = (st.alloc_zeros::<i32>(B * N)?, st.alloc_zeros::<i32>(B)?);
    let (mut scores, mut ws) = (st.alloc_zeros::<f32>(B * N)?, Workspace::new());
    let mut keep_out = DevViewMut::of(&mut keep, Layout::contiguous([B, N]))?;
    let mut count_out = DevViewMut::of(&mut count, Layout::contiguous([B]))?;
    let mut s_out = DevViewMut::of(&mut scores, Layout::contiguous([B, N]))?;
    text_guided_select(
        st,
        &q,
        &k_vis,
        &lens,
        GAMMA,
        &mut keep_out,
        &mut count_out,
        Some(&mut s_out),
        &mut ws,
    )?;
    Ok((
        st.clone_dtoh(&keep)?,
        st.clone_dtoh(&count)?,
        st.clone_dtoh(&scores)?,
    ))
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
    // Row 0: a 36-token image and a 6-token question; row 1: 20 and 4.
    let lens = Lengths::new(&[T, 4], &[N, 20])?;
    let (q, k) = (fill(B * T * HQ * D, 1), fill(B * S * HKV * D, 2));
    #[cfg(feature = "cuda")]
    let (keep, count, scores) = match gpu() {
        Some(st) => gpu_step(&st, &lens, &q, &k)?,
        None => cpu_step(&lens, &q, &k)?,
    };
    #[cfg(not(feature = "cuda"))]
    let (keep, count, scores) = cpu_step(&lens, &q, &k)?;

    for b in 0..B {
        let (n, kept) = (lens.n_len()[b], count[b] as usize);
        let (row, s) = (&keep[b * N..][..kept], &scores[b * N..][..n]);
        assert!((1..=n).contains(&kept) && row.windows(2).all(|w| w[0] < w[1]));
        assert!(keep[b * N + kept..(b + 1) * N].iter().all(|&i| i == -1));
        // The kept tokens hold more than GAMMA of the scores (to rounding).
        let (mass, total) = (
            row.iter().map(|&i| s[i as usize]).sum::<f32>(),
            s.iter().sum::<f32>(),
        );
        assert!(
            mass >= GAMMA * total * (1.0 - 1e-5),
            "row {b}: {mass} of {total}"
        );
        println!(
            "row {b}: kept {kept} of {n} visual tokens, {:.1}% of the text's attention",
            100.0 * mass / total
        );
    }

    // A deliberate bad call: gamma outside (0, 1].
    let (mut keep, mut count) = (vec![0; B * N], vec![0; B]);
    let err = text_guided_select(
        View::contiguous(&q, [B, T, HQ, D])?,
        View::new(&k[VIS_OFFSET..], vis_layout())?,
        &lens,
        1.5,
        &mut ViewMut::contiguous(&mut keep, [B, N])?,
        &mut ViewMut::contiguous(&mut count, [B])?,
        None,
    )
    .unwrap_err();
    println!("bad call, refused before any work: {err}");
    assert!(matches!(err, foveal::Error::Value { arg: "gamma", .. }));
    Ok(())
}
