//! VISOR on the GPU against the CPU: the same seeded weights and images,
//! generated with foveal's CUDA cross_attention, pos_conv1d and token_pack
//! on candle's stream, and with the CPU references, under the router (two
//! rows that choose different configurations, one with two questions), a
//! fixed configuration and VISOR-TR. Skips (and says so) where no GPU is
//! present.
//!
//! Only what is stable across devices is compared: the generated tokens,
//! the logits within 1e-2, and the router's choice, which is stable because
//! every routing token's logit margin (largest minus second largest) is
//! asserted on the CPU, before the GPU is looked for, to be at least 1e-2,
//! far above the f32 difference of two devices (~1e-5 on these sizes); the
//! GPU's choice is also checked against the argmax of the GPU's own router
//! logits.

use candle_core::{DType, Device, Result};
use foveal_candle::images::synthetic_images;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{LlavaModel, Method, ModelConfig, Visor, VisorConfig, VisorInput, VisorRun};

use crate::common::{gpu, max_abs_diff};

const STEPS: usize = 4;

fn run(dev: &Device, cfg: &ModelConfig, vcfg: &VisorConfig) -> Result<VisorRun> {
    let model = LlavaModel::seeded(cfg, 11, dev, DType::F32)?;
    let visor = Visor::seeded(cfg, vcfg, 3, dev, DType::F32)?;
    let (pixels, _) = synthetic_images(2, cfg.vision.image_size, 5, dev)?;
    let input = VisorInput {
        pixels,
        grid: (1, 1),
        system: byte_tokens("You see an image."),
        questions: vec![
            vec![byte_tokens("Where is the red square?")],
            vec![byte_tokens("Any circles?"), byte_tokens("What is left?")],
        ],
    };
    visor.generate(&model, &input, STEPS)
}

/// The index of the largest value, ties to the lower index.
fn host_argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

/// The largest value minus the second largest.
fn margin(v: &[f32]) -> f32 {
    let top = host_argmax(v);
    let second = (0..v.len())
        .filter(|&i| i != top)
        .map(|i| v[i])
        .fold(f32::NEG_INFINITY, f32::max);
    v[top] - second
}

#[test]
fn cuda_and_cpu_visor_generations_agree() -> Result<()> {
    let cfg = ModelConfig::visor();
    let base = VisorConfig::for_model(&cfg);
    let configs = [
        base.clone(),
        base.fixed(base.costliest()),
        VisorConfig::packed(&cfg, 2.0),
    ];
    // The CPU runs first: the router margins the comparison relies on.
    let mut cpu_runs = Vec::new();
    for vcfg in &configs {
        let cpu = run(&Device::Cpu, &cfg, vcfg)?;
        for (row, logits) in cpu.router_logits.iter().enumerate() {
            for l in logits {
                let m = margin(l);
                assert!(
                    m >= 1e-2,
                    "{:?}: row {row}: router margin {m} too small to compare devices",
                    vcfg.route
                );
            }
        }
        cpu_runs.push(cpu);
    }
    let Some(gpu) = gpu() else { return Ok(()) };
    for (vcfg, cpu) in configs.iter().zip(&cpu_runs) {
        let what = format!("{:?}, packing {:?}", vcfg.route, vcfg.pack_ratio);
        let gpu_run = run(&gpu, &cfg, vcfg)?;
        for (row, logits) in gpu_run.router_logits.iter().enumerate() {
            let own: Vec<usize> = logits.iter().map(|l| host_argmax(l)).collect();
            assert_eq!(
                gpu_run.predictions[row], own,
                "{what}: row {row}: the GPU's argmax"
            );
        }
        assert_eq!(cpu.predictions, gpu_run.predictions, "{what}");
        assert_eq!(cpu.configuration, gpu_run.configuration, "{what}");
        assert_eq!(cpu.packed, gpu_run.packed, "{what}");
        assert_eq!(cpu.kv_entries, gpu_run.kv_entries, "{what}");
        assert_eq!(cpu.generation.tokens, gpu_run.generation.tokens, "{what}");
        assert_eq!(
            cpu.generation.positions, gpu_run.generation.positions,
            "{what}"
        );
        for (step, (a, b)) in cpu
            .generation
            .logits
            .iter()
            .zip(&gpu_run.generation.logits)
            .enumerate()
        {
            let d = max_abs_diff(a, b)?;
            assert!(
                d < 1e-2,
                "{what}, step {step}: CPU and GPU logits differ by {d}"
            );
        }
    }
    Ok(())
}
