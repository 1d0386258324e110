//! GlimpsePrune in an engine's prefill (SPEC "GlimpsePrune (001)").
//!
//! At layer K of the prefill the engine owns the K/V caches of layers 0..=K,
//! `[B, S, Hkv, D]` f32 here (bf16/f16 work the same), two ragged rows whose
//! last valid position is the glimpse token. It calls:
//! 1. `glimpse_scores`: the glimpse query `[B, Hq, D]` against layer K's keys
//!    gives `a [B, Nv_max, Hq]` f32 (logits, the Qwen2.5-VL mode);
//! 2. a stand-in for the Visual Importance Predictor (foveal-candle has the
//!    real one: here the sum over heads) gives logits `[B, Nv_max]`, and
//!    `select_keep` keeps `sigmoid > 0.5`, at most half of a row, at least 2;
//! 3. `keep_positions` + `compact_kv`: every layer's cache compacted in one
//!    call to text + kept visual tokens (glimpse token dropped), RoPE untouched.
//!
//! `cargo run -p foveal --example glimpse_prune` runs the CPU path; with
//! `--features cuda` the same step runs on cudarc device memory when a GPU is
//! present. The result is checked, then one bad call shows foveal's error.

use foveal::compact_kv::{cpu as compact, KeepPositions};
use foveal::{glimpse_scores as gs, select_keep as sk, KeepRule, KeepSet, Layout, Padding};
use foveal::{RowLayout, RowSpec, ScoreMode, View, ViewMut};

/// Batch, cache capacity, query heads, KV heads, head dim, layers 0..=K.
const B: usize = 2;
const S: usize = 24;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 64;
const L: usize = 3;
const RULE: KeepRule = KeepRule {
    threshold: 0.5,
    max_ratio: Some(0.5),
    min_keep: 2,
};

/// Deterministic stand-in activations in [-1, 1].
fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// The compacted rows and layer caches, on the host.
type Step = (KeepSet, KeepPositions, Vec<Vec<f32>>);

fn cpu_step(rows: &RowLayout, q: &[f32], kv: &[Vec<f32>]) -> foveal::Result<Step> {
    let (cache, nv) = (Layout::bshd(B, S, HKV, D), rows.nv_max());
    let mut a = vec![0.0; B * nv * HQ];
    let q = View::contiguous(q, [B, HQ, D])?;
    let mut a_out = ViewMut::contiguous(&mut a, [B, nv, HQ])?;
    gs::cpu::glimpse_scores(
        q,
        View::new(&kv[L - 1], cache)?,
        rows,
        None,
        ScoreMode::Logits,
        &mut a_out,
    )?;
    let logits: Vec<f32> = a.chunks(HQ).map(|h| h.iter().sum()).collect();
    let mut keep = KeepSet::new(rows);
    sk::cpu::select_keep(View::contiguous(&logits, [B, nv])?, rows, &RULE, &mut keep)?;
    let mut kp = KeepPositions::for_rows(rows, true);
    compact::keep_positions(rows, &keep, true, &mut kp)?;
    // K and V of every layer in one call (the same stand-in data for both).
    let src = kv
        .iter()
        .map(|c| View::new(c, cache))
        .collect::<Result<Vec<_>, _>>()?;
    let dst = Layout::bshd(B, kp.max_len(), HKV, D);
    let (mut k, mut v) = (
        vec![vec![f32::NAN; dst.numel()]; L],
        vec![vec![f32::NAN; dst.numel()]; L],
    );
    let mut k_dst = k
        .iter_mut()
        .map(|c| ViewMut::new(c, dst))
        .collect::<Result<Vec<_>, _>>()?;
    let mut v_dst = v
        .iter_mut()
        .map(|c| ViewMut::new(c, dst))
        .collect::<Result<Vec<_>, _>>()?;
    compact::compact_kv(&src, &src, &kp, Padding::Right, &mut k_dst, &mut v_dst)?;
    drop((k_dst, v_dst));
    Ok((keep, kp, k))
}

#[cfg(feature = "cuda")]
type Stream = std::sync::Arc<foveal::cuda::cudarc::driver::CudaStream>;

#[cfg(feature = "cuda")]
fn gpu_step(
    st: &Stream,
    rows: &RowLayout,
    q: &[f32],
    kv: &[Vec<f32>],
) -> Result<Step, Box<dyn std::error::Error>> {
    use foveal::compact_kv::cuda as compact;
    use foveal::cuda::{
        DevView, DevViewMut, DeviceKeepPositions, DeviceKeepSet, DeviceRowLayout, Workspace,
    };
    let (cache, nv) = (Layout::bshd(B, S, HKV, D), rows.nv_max());
    let (q, rows_d, mut ws) = (
        st.clone_htod(q)?,
        DeviceRowLayout::new(st, rows)?,
        Workspace::new(),
    );
    let kv = kv
        .iter()
        .map(|c| st.clone_htod(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut a = st.alloc_zeros::<f32>(B * nv * HQ)?;
    let (q, k_layer) = (
        DevView::of(&q, Layout::contiguous([B, HQ, D]))?,
        DevView::of(&kv[L - 1], cache)?,
    );
    let mut a_out = DevViewMut::of(&mut a, Layout::contiguous([B, nv, HQ]))?;
    gs::cuda::glimpse_scores(
        st,
        &q,
        &k_layer,
        &rows_d,
        None,
        ScoreMode::Logits,
        &mut a_out,
        &mut ws,
    )?;
    // The stand-in predictor runs on the host; an engine keeps it on the GPU.
    let logits: Vec<f32> = st
        .clone_dtoh(&a)?
        .chunks(HQ)
        .map(|h| h.iter().sum())
        .collect();
    let logits = st.clone_htod(&logits)?;
    let mut keep = DeviceKeepSet::new(st, &rows_d)?;
    sk::cuda::select_keep(
        st,
        &DevView::of(&logits, Layout::contiguous([B, nv]))?,
        &rows_d,
        &RULE,
        &mut keep,
    )?;
    let mut kp = DeviceKeepPositions::for_rows(st, &rows_d, true)?;
    compact::keep_positions(st, &rows_d, &keep, true, &mut kp)?;
    // Reading the new length back is the engine's choice: it sizes the caches.
    let dst = Layout::bshd(B, kp.fetch_max_len(st)?, HKV, D);
    let src = kv
        .iter()
        .map(|c| DevView::of(c, cache))
        .collect::<Result<Vec<_>, _>>()?;
    let mut k = (0..2 * L)
        .map(|_| st.alloc_zeros::<f32>(dst.numel()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut views = k
        .iter_mut()
        .map(|c| DevViewMut::of(c, dst))
        .collect::<Result<Vec<_>, _>>()?;
    let (k_dst, v_dst) = views.split_at_mut(L);
    compact::compact_kv(st, &src, &src, &kp, Padding::Right, k_dst, v_dst)?;
    drop(views);
    let k = k[..L]
        .iter()
        .map(|c| st.clone_dtoh(c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((keep.to_host(st)?, kp.to_host(st)?, k))
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
    // Row 0: text 0..4, an image at 4..20, text 20..23, glimpse token 23.
    // Row 1 (ragged): text 0..2, an image at 2..14, text, glimpse token 17.
    let row = |end, visual: std::ops::Range<usize>| RowSpec {
        start: 0,
        end,
        visual: visual.collect(),
    };
    let rows = RowLayout::new(S, &[row(24, 4..20), row(18, 2..14)])?;
    let q = fill(B * HQ * D, 1);
    let kv: Vec<Vec<f32>> = (0..L).map(|l| fill(B * S * HKV * D, 2 + l)).collect();
    #[cfg(feature = "cuda")]
    let (keep, kp, k) = match gpu() {
        Some(st) => gpu_step(&st, &rows, &q, &kv)?,
        None => cpu_step(&rows, &q, &kv)?,
    };
    #[cfg(not(feature = "cuda"))]
    let (keep, kp, k) = cpu_step(&rows, &q, &kv)?;

    for b in 0..B {
        let (nv, kept) = (rows.visual(b).len(), keep.kept(b).len());
        let cap = (0.5 * nv as f64).floor() as usize;
        assert!(
            (2..=cap).contains(&kept),
            "row {b}: kept {kept} of {nv}, the rule allows 2..={cap}"
        );
        assert_eq!(
            kp.row(b).len(),
            rows.end(b) - 1 - nv + kept,
            "row {b}: all text + kept visual"
        );
        for (l, cache) in k.iter().enumerate() {
            for (j, &p) in kp.row(b).iter().enumerate() {
                let (dst, src) = (
                    (b * kp.max_len() + j) * HKV * D,
                    (b * S + p as usize) * HKV * D,
                );
                assert_eq!(
                    cache[dst..][..HKV * D],
                    kv[l][src..][..HKV * D],
                    "layer {l} row {b} slot {j}"
                );
            }
        }
        println!(
            "row {b}: kept {kept} of {nv} visual tokens, cache {} -> {} entries",
            rows.end(b),
            kp.row(b).len()
        );
    }

    // A deliberate bad call: a ratio outside [0, 1].
    let bad = KeepRule {
        max_ratio: Some(1.5),
        ..RULE
    };
    let logits = vec![0.0; B * rows.nv_max()];
    let err = sk::cpu::select_keep(
        View::contiguous(&logits, [B, rows.nv_max()])?,
        &rows,
        &bad,
        &mut KeepSet::new(&rows),
    )
    .unwrap_err();
    println!("bad call, refused before any work: {err}");
    assert!(matches!(
        err,
        foveal::Error::Value {
            arg: "max_ratio",
            ..
        }
    ));
    Ok(())
}
