//! Gaze Attention on the GPU against the CPU: the same seeded weights,
//! context tokens and prompts (two single images; two images and a video),
//! generated with foveal's CUDA region_descriptors, route_topk and
//! gaze_decode on candle's stream, and with the CPU references. Skips (and
//! says so) where no GPU is present.
//!
//! The routes and tokens are compared exactly: these are the inputs of
//! tests/gaze.rs's `routed_decoding_equals_dense_attention_with_unrouted_regions_masked`,
//! which asserts on the CPU that every routing decision and greedy token
//! wins by `common::DECISION_MARGIN` (each greedy token by twice
//! `common::GPU_LOGIT_TOL`), far above the two devices' f32 rounding
//! differences, so the decisions cannot differ between them.

use candle_core::{DType, Device, Result};
use foveal_candle::{GazeAttention, GazeRun, GazeStep, Method};

use crate::common::gaze::{config, model, BATCHES, ROUTED_K, STEPS};
use crate::common::{gpu, max_abs_diff, GPU_LOGIT_TOL};

/// Every routed run of the shared inputs on `dev`.
fn runs(dev: &Device) -> Result<Vec<GazeRun>> {
    let (cfg, model) = model(dev)?;
    BATCHES
        .iter()
        .map(|&(_, frames, batch, _)| {
            let gaze = GazeAttention::seeded(&cfg, &config(ROUTED_K, frames), 3, dev, DType::F32)?;
            gaze.generate(&model, &batch(&gaze, &model)?, STEPS)
        })
        .collect()
}

#[test]
fn cuda_and_cpu_gaze_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let (cpu, gpu) = (runs(&Device::Cpu)?, runs(&gpu)?);
    for ((name, ..), (c, g)) in BATCHES.iter().zip(cpu.iter().zip(&gpu)) {
        assert_eq!(c.generation.tokens, g.generation.tokens, "{name}");
        for (step, (a, b)) in c
            .generation
            .logits
            .iter()
            .zip(&g.generation.logits)
            .enumerate()
        {
            let d = max_abs_diff(a, b)?;
            assert!(
                d < GPU_LOGIT_TOL,
                "{name}, step {step}: CPU and GPU logits differ by {d}"
            );
        }
        assert_eq!(c.steps.len(), g.steps.len());
        // The routes are the regions each head attended: the same on both.
        let ids = |s: &GazeStep| {
            s.routes
                .iter()
                .map(|r| r.ids().to_vec())
                .collect::<Vec<_>>()
        };
        for (t, (sc, sg)) in c.steps.iter().zip(&g.steps).enumerate() {
            assert_eq!(ids(sc), ids(sg), "{name}, step {t}: routes");
        }
    }
    Ok(())
}
