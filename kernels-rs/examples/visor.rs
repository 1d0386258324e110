//! VISOR's cross-attention layers in an engine's decode step (SPEC "VISOR
//! (002) / cross_attention").
//!
//! In VISOR most decoder layers never put the visual tokens in self-attention:
//! the text attends to them through cross-attention. The engine computes the
//! visual tokens' K and V once per image and keeps them as a cache, here in the
//! candle/Hugging Face order `[B, Hkv, Nk, D]` f32 (read in place; the
//! flash/vLLM order `[B, Nk, Hkv, D]` works too; bf16/f16 the same), with a
//! ragged number of visual tokens per row. Each decode step, the new token's
//! query `q [B, 1, Hq, D]` attends to that cache with `cross_attention`
//! (not causal), giving `o [B, 1, Hq, D]` and the log-sum-exp `[B, Hq, 1]` f32.
//!
//! `cargo run -p foveal --example visor` runs the CPU path; with
//! `--features cuda` the same step runs on cudarc device memory when a GPU is
//! present. The result is checked, then one bad call shows foveal's error.

use foveal::cross_attention::cpu::cross_attention;
use foveal::{Layout, SeqLens, View, ViewMut};

/// Batch, visual tokens (capacity), query heads, KV heads, head dim.
const B: usize = 2;
const NK: usize = 729;
const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 64;

/// Deterministic stand-in activations in [-1, 1].
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn cpu_step(
    lens: &SeqLens,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> foveal::Result<(Vec<f32>, Vec<f32>)> {
    let cache = Layout::bhsd(B, NK, HKV, D);
    let (mut o, mut lse) = (vec![f32::NAN; B * HQ * D], vec![f32::NAN; B * HQ]);
    let (q, k, v) = (
        View::contiguous(q, [B, 1, HQ, D])?,
        View::new(k, cache)?,
        View::new(v, cache)?,
    );
    let mut o_out = ViewMut::contiguous(&mut o, [B, 1, HQ, D])?;
    let mut lse_out = ViewMut::contiguous(&mut lse, [B, HQ, 1])?;
    cross_attention(q, k, v, lens, None, &mut o_out, Some(&mut lse_out))?;
    Ok((o, lse))
}

#[cfg(feature = "cuda")]
type Stream = std::sync::Arc<foveal::cuda::cudarc::driver::CudaStream>;

#[cfg(feature = "cuda")]
fn gpu_step(
    st: &Stream,
    lens: &SeqLens,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), Box<dyn std::error::Error>> {
    use foveal::cross_attention::cuda::{cross_attention, DeviceSeqLens};
    use foveal::cuda::{DevView, DevViewMut, Workspace};
    let cache = Layout::bhsd(B, NK, HKV, D);
    let (q, k, v) = (st.clone_htod(q)?, st.clone_htod(k)?, st.clone_htod(v)?);
    let (q, k, v) = (
        DevView::of(&q, Layout::contiguous([B, 1, HQ, D]))?,
        DevView::of(&k, cache)?,
        DevView::of(&v, cache)?,
    );
    let (lens, mut ws) = (DeviceSeqLens::new(st, lens)?, Workspace::new());
    let (mut o, mut lse) = (
        st.alloc_zeros::<f32>(B * HQ * D)?,
        st.alloc_zeros::<f32>(B * HQ)?,
    );
    let mut o_out = DevViewMut::of(&mut o, Layout::contiguous([B, 1, HQ, D]))?;
    let mut lse_out = DevViewMut::of(&mut lse, Layout::contiguous([B, HQ, 1]))?;
    cross_attention(
        st,
        &q,
        &k,
        &v,
        &lens,
        None,
        &mut o_out,
        Some(&mut lse_out),
        &mut ws,
    )?;
    Ok((st.clone_dtoh(&o)?, st.clone_dtoh(&lse)?))
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
    // One query per row (the decode token); 729 visual tokens (a 384 px crop)
    // in row 0, 300 in row 1.
    let lens = SeqLens::new(&[1, 1], &[NK, 300])?;
    let (q, k, v) = (
        fill(B * HQ * D, 1),
        fill(B * HKV * NK * D, 2),
        fill(B * HKV * NK * D, 3),
    );
    #[cfg(feature = "cuda")]
    let (o, lse) = match gpu() {
        Some(st) => gpu_step(&st, &lens, &q, &k, &v)?,
        None => cpu_step(&lens, &q, &k, &v)?,
    };
    #[cfg(not(feature = "cuda"))]
    let (o, lse) = cpu_step(&lens, &q, &k, &v)?;

    for b in 0..B {
        for h in 0..HQ {
            // Softmax attention is a convex combination of the values it reads:
            // those of the row's valid tokens, in KV head h / G.
            let kv_row = &v[(b * HKV + h / (HQ / HKV)) * NK * D..][..lens.kv()[b] * D];
            for d in 0..D {
                let (lo, hi) = kv_row
                    .iter()
                    .skip(d)
                    .step_by(D)
                    .fold((f32::MAX, f32::MIN), |(l, u), x| (l.min(*x), u.max(*x)));
                assert!(
                    (lo - 1e-5..=hi + 1e-5).contains(&o[(b * HQ + h) * D + d]),
                    "row {b} head {h} dim {d}"
                );
            }
            // ln sum exp(s) >= ln(n) + the mean score > -inf.
            assert!(lse[b * HQ + h].is_finite(), "row {b} head {h}");
        }
        println!(
            "row {b}: {} visual tokens, lse of head 0 = {:.3}",
            lens.kv()[b],
            lse[b * HQ]
        );
    }

    // A deliberate bad call: a row claiming more visual tokens than the cache holds.
    let bad = SeqLens::new(&[1, 1], &[NK + 1, 300])?;
    let cache = Layout::bhsd(B, NK, HKV, D);
    let mut o = vec![0.0; B * HQ * D];
    let err = cross_attention(
        View::contiguous(&q, [B, 1, HQ, D])?,
        View::new(&k, cache)?,
        View::new(&v, cache)?,
        &bad,
        None,
        &mut ViewMut::contiguous(&mut o, [B, 1, HQ, D])?,
        None,
    )
    .unwrap_err();
    println!("bad call, refused before any work: {err}");
    assert!(matches!(
        err,
        foveal::Error::Index { .. } | foveal::Error::Shape { .. }
    ));
    Ok(())
}
