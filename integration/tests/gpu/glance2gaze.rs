//! Glance2Gaze on the GPU against the CPU: the same seeded model and
//! Glance2Gaze weights, one image, a 2 x 2 grid of sub-images and a 3-frame
//! video, at the 33% (r = 2) and 11% (r = 1) schedules scaled to the tiny
//! model, generated with foveal's CUDA glance_fusion and cross_attention on
//! candle's stream, and with the CPU references. Skips (and says so) where
//! no GPU is present.
//!
//! The tokens are compared exactly: these are the runs of
//! tests/glance2gaze.rs's `real_schedules_equal_glance2gaze_in_plain_candle`,
//! which asserts on the CPU that every greedy token wins by more than twice
//! `common::GPU_LOGIT_TOL`, far above the two devices' f32 rounding
//! differences, so the tokens cannot differ between them. Nothing else in
//! a run is a decision: the layouts follow from the schedule alone.

use candle_core::{DType, Device, Result};
use foveal_candle::{
    Glance2Gaze, Glance2GazeConfig, Glance2GazeRun, LlavaModel, Method, ModelConfig,
};

use crate::common::glance2gaze::{inputs, METHOD_SEED, MODEL_SEED, SCHEDULES, STEPS};
use crate::common::{assert_close, gpu, max_abs_diff, GPU_LOGIT_TOL};

/// Every shared run on `dev`: per schedule, per input.
fn runs(dev: &Device) -> Result<Vec<(String, Glance2GazeRun)>> {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, MODEL_SEED, dev, DType::F32)?;
    let mut out = Vec::new();
    for name in SCHEDULES {
        let gcfg = Glance2GazeConfig::for_model(&cfg, name)?;
        let g = Glance2Gaze::seeded(&cfg, &gcfg, METHOD_SEED, dev, DType::F32)?;
        for (what, input) in inputs(&cfg, dev)? {
            out.push((
                format!("{name}, {what}"),
                g.generate_recording(&model, &input, STEPS)?,
            ));
        }
    }
    Ok(out)
}

#[test]
fn cuda_and_cpu_glance2gaze_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cpu = runs(&Device::Cpu)?;
    let cuda = runs(&gpu)?;
    for ((what, a), (_, b)) in cpu.iter().zip(&cuda) {
        assert_eq!(a.visual_per_layer, b.visual_per_layer, "{what}");
        assert_eq!(a.kv_entries, b.kv_entries, "{what}");
        assert_eq!(a.generation.tokens, b.generation.tokens, "{what}");
        assert_eq!(a.generation.positions, b.generation.positions, "{what}");
        assert_eq!(a.attention.len(), b.attention.len(), "{what}: rows");
        for (row, (x, y)) in a.attention.iter().zip(&b.attention).enumerate() {
            assert_close(x, y, &format!("{what}: row {row}: compression attention"));
        }
        assert_eq!(
            a.glance_weights.len(),
            b.glance_weights.len(),
            "{what}: rows"
        );
        for (row, (x, y)) in a.glance_weights.iter().zip(&b.glance_weights).enumerate() {
            assert_eq!(x.len(), y.len(), "{what}: row {row}: fused layers");
            for (layer, (u, v)) in x.iter().zip(y).enumerate() {
                assert_close(
                    u,
                    v,
                    &format!("{what}: row {row}, fused layer {layer}: weights"),
                );
            }
        }
        for (step, (x, y)) in a
            .generation
            .logits
            .iter()
            .zip(&b.generation.logits)
            .enumerate()
        {
            let d = max_abs_diff(x, y)?;
            assert!(
                d < GPU_LOGIT_TOL,
                "{what}, step {step}: CPU and GPU logits differ by {d}"
            );
        }
    }
    Ok(())
}
