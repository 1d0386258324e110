//! The whole model on the GPU against the CPU: the same seeded weights and
//! images, dense and GlimpsePrune generation (the predictor; the baseline
//! map with anchors, whose kept set is rebuilt on the device). Skips (and
//! says so) where no GPU is present.
//!
//! The kept sets and tokens are compared exactly: these are the runs of
//! `common::glimpse`, whose decision margins tests/glimpse.rs's
//! `gpu_test_runs_decide_with_margins` asserts on the CPU (every keep
//! decision by `common::DECISION_MARGIN`, every greedy token by twice
//! `common::GPU_LOGIT_TOL`), far above the two devices' f32 rounding
//! differences, so the decisions cannot differ between them.

use candle_core::{Device, Result};

use crate::common::glimpse::{method, model_and_images, settings, STEPS};
use crate::common::{gpu, max_abs_diff, system_and_questions, GPU_LOGIT_TOL};

#[test]
fn cuda_and_cpu_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let (system, questions) = system_and_questions();
    let mut runs = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let (cfg, model, pixels) = model_and_images(&dev)?;
        let dense =
            model.generate_dense(&model.build_prompt(&pixels, &system, &questions)?, STEPS)?;
        let gp = settings(&cfg)
            .into_iter()
            .map(|(name, gcfg)| {
                let run = method(&cfg, &gcfg, &dev)?
                    .generate(&model, &pixels, &system, &questions, STEPS)?;
                Ok((name, run))
            })
            .collect::<Result<Vec<_>>>()?;
        runs.push((dense, gp));
    }
    let ((dense_cpu, gp_cpu), (dense_gpu, gp_gpu)) = (&runs[0], &runs[1]);
    assert_eq!(dense_cpu.tokens, dense_gpu.tokens, "dense");
    for (a, b) in dense_cpu.logits.iter().zip(&dense_gpu.logits) {
        let d = max_abs_diff(a, b)?;
        assert!(d < GPU_LOGIT_TOL, "dense: CPU and GPU logits differ by {d}");
    }
    for ((name, c), (_, g)) in gp_cpu.iter().zip(gp_gpu) {
        assert_eq!(c.kept, g.kept, "{name}: the kept visual tokens");
        assert_eq!(c.generation.tokens, g.generation.tokens, "{name}");
        for (a, b) in c.generation.logits.iter().zip(&g.generation.logits) {
            let d = max_abs_diff(a, b)?;
            assert!(
                d < GPU_LOGIT_TOL,
                "{name}: CPU and GPU logits differ by {d}"
            );
        }
    }
    // The anchors (the top-right and bottom-left corners) are kept on the GPU.
    for kept in &gp_gpu[1].1.kept {
        assert!(kept.contains(&7) && kept.contains(&56), "{kept:?}");
    }
    Ok(())
}
