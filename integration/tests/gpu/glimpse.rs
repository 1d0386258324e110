//! The whole model on the GPU against the CPU: the same seeded weights and
//! images, dense and GlimpsePrune generation (the predictor; the baseline
//! map with anchors, whose kept set is rebuilt on the device). Skips (and
//! says so) where no GPU is present.

use candle_core::{DType, Device, Result};
use foveal::KeepRule;
use foveal_candle::images::synthetic_images;
use foveal_candle::{
    Anchor, GlimpseConfig, GlimpsePrune, LlavaModel, Method, ModelConfig, Predictor,
};

use crate::common::{gpu, max_abs_diff, system_and_questions};

#[test]
fn cuda_and_cpu_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cfg = ModelConfig::tiny();
    let (system, questions) = system_and_questions();
    let mut gcfg = GlimpseConfig::for_model(&cfg);
    gcfg.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.4),
        min_keep: 3,
    };
    let mut runs = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let model = LlavaModel::seeded(&cfg, 11, &dev, DType::F32)?;
        let (pixels, _) = synthetic_images(2, cfg.vision.image_size, 5, &dev)?;
        let dense = model.generate_dense(&model.build_prompt(&pixels, &system, &questions)?, 4)?;
        let gp = GlimpsePrune::seeded(&cfg, &gcfg, 3, &dev, DType::F32)?;
        runs.push((dense, gp.generate(&model, &pixels, &system, &questions, 4)?));
    }
    let ((dense_cpu, gp_cpu), (dense_gpu, gp_gpu)) = (&runs[0], &runs[1]);
    assert_eq!(dense_cpu.tokens, dense_gpu.tokens);
    assert_eq!(gp_cpu.kept, gp_gpu.kept, "the kept visual tokens");
    assert_eq!(gp_cpu.generation.tokens, gp_gpu.generation.tokens);
    for (a, b) in dense_cpu.logits.iter().zip(&dense_gpu.logits).chain(
        gp_cpu
            .generation
            .logits
            .iter()
            .zip(&gp_gpu.generation.logits),
    ) {
        let d = max_abs_diff(a, b)?;
        assert!(d < 1e-2, "CPU and GPU logits differ by {d}");
    }
    Ok(())
}

#[test]
fn cuda_and_cpu_agree_on_the_baseline_map_with_anchors() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cfg = ModelConfig::tiny();
    let (system, questions) = system_and_questions();
    let mut gcfg = GlimpseConfig::for_model(&cfg);
    gcfg.predictor = Predictor::Baseline;
    gcfg.anchors = vec![Anchor::TopRight, Anchor::BottomLeft];
    gcfg.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    let mut runs = Vec::new();
    for dev in [Device::Cpu, gpu] {
        let model = LlavaModel::seeded(&cfg, 11, &dev, DType::F32)?;
        let (pixels, _) = synthetic_images(2, cfg.vision.image_size, 5, &dev)?;
        let gp = GlimpsePrune::seeded(&cfg, &gcfg, 3, &dev, DType::F32)?;
        runs.push(gp.generate(&model, &pixels, &system, &questions, 4)?);
    }
    let (cpu, gpu) = (&runs[0], &runs[1]);
    assert_eq!(cpu.kept, gpu.kept, "the kept visual tokens");
    for kept in &gpu.kept {
        assert!(kept.contains(&7) && kept.contains(&56), "{kept:?}");
    }
    assert_eq!(cpu.generation.tokens, gpu.generation.tokens);
    for (a, b) in cpu.generation.logits.iter().zip(&gpu.generation.logits) {
        let d = max_abs_diff(a, b)?;
        assert!(d < 1e-2, "CPU and GPU logits differ by {d}");
    }
    Ok(())
}
