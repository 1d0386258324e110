//! FocusLLaVA on the GPU against the CPU: the same seeded weights and
//! images (one image and a 2 x 2 grid of sub-images); the sampled cells, the
//! kept tokens, the generated tokens and the logits agree. Skips (and says
//! so) where no GPU is present.
//!
//! The cells, kept sets and tokens are compared exactly: these are the runs
//! of tests/focus.rs's `real_selection_equals_masking_the_dropped_tokens`,
//! which asserts on the CPU that every window's scale, every kept set and
//! every greedy token wins by far more than the two devices' f32 rounding
//! differences (`common::DECISION_MARGIN`, twice `common::GPU_LOGIT_TOL`
//! for tokens), so the decisions cannot differ between them.

use candle_core::{DType, Device, Result};
use foveal_candle::{FocusConfig, FocusLlava, LlavaModel, Method, ModelConfig};

use crate::common::focus::{images, MODEL_SEED, SELECTOR_SEED, STEPS};
use crate::common::{gpu, max_abs_diff, system_and_questions, GPU_LOGIT_TOL};

#[test]
fn cuda_and_cpu_focus_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cfg = ModelConfig::tiny();
    let (system, questions) = system_and_questions();
    let fcfg = FocusConfig::for_model(&cfg);
    for g in [1, 2] {
        let mut runs = Vec::new();
        for dev in [Device::Cpu, gpu.clone()] {
            let model = LlavaModel::seeded(&cfg, MODEL_SEED, &dev, DType::F32)?;
            let pixels = images(&cfg, g, &dev)?;
            let fl = FocusLlava::seeded(&cfg, &fcfg, SELECTOR_SEED, &dev, DType::F32)?;
            let sample = fl.sample_vision(&model, &pixels, (g, g))?;
            runs.push((
                sample,
                fl.generate(&model, &pixels, (g, g), &system, &questions, STEPS)?,
            ));
        }
        let ((s_cpu, cpu), (s_gpu, gpu_run)) = (&runs[0], &runs[1]);
        assert_eq!(s_cpu.cells, s_gpu.cells, "grid {g}: the sampled cells");
        assert_eq!(cpu.kept, gpu_run.kept, "grid {g}: the kept visual tokens");
        assert_eq!(cpu.kv_entries, gpu_run.kv_entries);
        assert_eq!(cpu.generation.tokens, gpu_run.generation.tokens, "grid {g}");
        for (a, b) in cpu.generation.logits.iter().zip(&gpu_run.generation.logits) {
            let d = max_abs_diff(a, b)?;
            assert!(
                d < GPU_LOGIT_TOL,
                "grid {g}: CPU and GPU logits differ by {d}"
            );
        }
    }
    Ok(())
}
