//! GlimpsePrune on candle tensors through foveal-candle's ops (SPEC
//! "GlimpsePrune (001)"): what a candle-based engine calls at layer K of its
//! prefill.
//!
//! The engine's caches are candle tensors in the Hugging Face order
//! `[B, Hkv, S, D]` (f32 here; bf16/f16 work the same), one (K, V) pair per
//! layer 0..=K, read by foveal in place. `ops::glimpse_scores` gives the
//! glimpse token's scores `[B, Nv_max, Hq]` f32; a stand-in predictor (the sum
//! over heads; foveal-candle's GlimpsePrune runs the real one) gives logits
//! `[B, Nv_max]`; `ops::plan_keep` keeps `sigmoid > 0.5`, at most half a row;
//! `ops::compact_kv` compacts every layer in one call to `[B, Hkv, max_len, D]`
//! and `ops::gather_rows` the hidden states `[B, S, W]` and position ids
//! alike. On a CUDA device (feature `cuda`) the same calls run foveal's
//! kernels on candle's stream.
//!
//! `cargo run -p foveal-candle --example glimpse_candle`

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use foveal::{KeepRule, Padding, RowLayout, RowSpec, ScoreMode};
use foveal_candle::ops;

/// Batch, cache capacity, query heads, KV heads, head dim, layers 0..=K, hidden width.
const B: usize = 2;
const S: usize = 24;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 64;
const LAYERS: usize = 3;
const W: usize = 32;

/// Deterministic stand-in activations: `sin` of a spread of the element index.
fn fill(shape: &[usize], seed: f64, dev: &Device) -> Result<Tensor> {
    let n = shape.iter().product::<usize>() as f32;
    Tensor::arange(0f32, n, dev)?
        .affine(0.7549, seed)?
        .sin()?
        .reshape(shape)
}

fn main() -> Result<()> {
    #[cfg(feature = "cuda")]
    let dev = Device::cuda_if_available(0)?;
    #[cfg(not(feature = "cuda"))]
    let dev = Device::Cpu;
    println!("device: {dev:?}");
    // Row 0: text 0..4, an image at 4..20, text, glimpse token 23; row 1
    // (ragged): an image at 2..14, glimpse token 17.
    let row = |end, visual: std::ops::Range<usize>| RowSpec {
        start: 0,
        end,
        visual: visual.collect(),
    };
    let rows =
        RowLayout::new(S, &[row(24, 4..20), row(18, 2..14)]).map_err(candle_core::Error::wrap)?;
    let caches = (0..LAYERS)
        .map(|l| {
            Ok((
                fill(&[B, HKV, S, D], l as f64, &dev)?,
                fill(&[B, HKV, S, D], l as f64 + 0.5, &dev)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let q = fill(&[B, HQ, D], 7.0, &dev)?;
    let hidden = fill(&[B, S, W], 9.0, &dev)?;
    let position_ids = Tensor::arange(0u32, S as u32, &dev)?
        .reshape((1, S, 1))?
        .repeat((B, 1, 1))?;

    let scores = ops::glimpse_scores(&q, &caches[LAYERS - 1].0, &rows, None, ScoreMode::Logits)?;
    let logits = scores.sum(2)?;
    let rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.5),
        min_keep: 1,
    };
    let mut plan = ops::plan_keep(&logits, &rows, &rule, true)?;
    plan.fetch_max_len()?; // on a GPU: read the new length back, to size the caches
    let compacted = ops::compact_kv(&caches, &plan, Padding::Right)?;
    let hidden_kept = ops::gather_rows(&hidden, &plan, Padding::Right)?;
    let ids_kept = ops::gather_rows(&position_ids, &plan, Padding::Right)?;

    // Checks: the rule, and every compacted entry is its source entry.
    let (kept, positions) = (plan.kept_visual()?, plan.positions()?);
    for (b, kept) in kept.iter().enumerate() {
        let nv = rows.visual(b).len();
        assert!(
            (1..=nv / 2).contains(&kept.len()),
            "row {b}: {} kept of {nv}",
            kept.len()
        );
        let pos: Vec<u32> = positions.row(b).iter().map(|&p| p as u32).collect();
        let idx = Tensor::new(pos.as_slice(), &dev)?;
        let n = pos.len();
        for ((k, v), (k2, v2)) in caches.iter().zip(&compacted) {
            let want = k.i(b)?.index_select(&idx, 1)?;
            assert_eq!(
                k2.i(b)?.narrow(1, 0, n)?.to_vec3::<f32>()?,
                want.to_vec3::<f32>()?
            );
            let want = v.i(b)?.index_select(&idx, 1)?;
            assert_eq!(
                v2.i(b)?.narrow(1, 0, n)?.to_vec3::<f32>()?,
                want.to_vec3::<f32>()?
            );
        }
        let want = hidden.i(b)?.index_select(&idx, 0)?;
        assert_eq!(
            hidden_kept.i(b)?.narrow(0, 0, n)?.to_vec2::<f32>()?,
            want.to_vec2::<f32>()?
        );
        assert_eq!(
            ids_kept
                .i(b)?
                .narrow(0, 0, n)?
                .squeeze(1)?
                .to_vec1::<u32>()?,
            pos,
            "RoPE positions are kept, not recomputed"
        );
        println!(
            "row {b}: kept {} of {nv} visual tokens, cache {} -> {n} entries",
            kept.len(),
            rows.end(b)
        );
    }
    println!("compacted cache: {:?}", compacted[0].0.shape());

    // A deliberate bad call: the cache of another batch size. foveal's error
    // arrives wrapped in candle's.
    let wrong = Tensor::zeros((1, HKV, S, D), DType::F32, &dev)?;
    let err = ops::glimpse_scores(&q, &wrong, &rows, None, ScoreMode::Logits).unwrap_err();
    println!("bad call, refused before any work: {err}");
    assert!(err.to_string().contains("glimpse_scores"));
    Ok(())
}
