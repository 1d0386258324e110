//! VISOR on the GPU against the CPU: the same seeded weights and images,
//! generated with foveal's CUDA cross_attention, pos_conv1d and token_pack
//! on candle's stream, and with the CPU references, under the router (two
//! rows that choose different configurations, one with two questions), the
//! costliest configuration and VISOR-TR. Skips (and says so) where no GPU
//! is present.
//!
//! The router's predictions and choices and the tokens are compared
//! exactly: these are the runs of tests/visor.rs's
//! `the_runs_the_gpu_test_repeats_decide_by_far_more_than_rounding`, which
//! asserts on the CPU that every routing token's prediction wins by
//! `common::DECISION_MARGIN` and every greedy token by twice
//! `common::GPU_LOGIT_TOL`, far above the two devices' f32 rounding
//! differences, so the decisions cannot differ between them. The GPU's
//! predictions are also checked against the argmax of its own router logits.
//! The recorded cross-attention (the pictures' weights: the CUDA op's
//! log-sum-exp under candle's softmax numerators) agrees within
//! `GPU_LOGIT_TOL` per weight.

use candle_core::{Device, Result};
use foveal_candle::VisorRun;

use crate::common::visor::{input, model, visors, STEPS};
use crate::common::{assert_close, gpu, max_abs_diff, GPU_LOGIT_TOL};

/// Every shared run on `dev`.
fn runs(dev: &Device) -> Result<Vec<(&'static str, VisorRun)>> {
    let (cfg, model) = model(dev)?;
    let inp = input(&cfg, dev)?;
    visors(&cfg, dev)?
        .into_iter()
        .map(|(name, v)| Ok((name, v.generate_recording(&model, &inp, STEPS)?)))
        .collect()
}

/// The index of the largest value, ties to the lower index.
fn host_argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
}

#[test]
fn cuda_and_cpu_visor_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let (cpu, gpu) = (runs(&Device::Cpu)?, runs(&gpu)?);
    for ((name, c), (_, g)) in cpu.iter().zip(&gpu) {
        for (row, logits) in g.router_logits.iter().enumerate() {
            let own: Vec<usize> = logits.iter().map(|l| host_argmax(l)).collect();
            assert_eq!(
                g.predictions[row], own,
                "{name}: row {row}: the GPU's argmax"
            );
        }
        assert_eq!(c.predictions, g.predictions, "{name}");
        assert_eq!(c.configuration, g.configuration, "{name}");
        assert_eq!(c.packed, g.packed, "{name}");
        assert_eq!(c.kv_entries, g.kv_entries, "{name}");
        assert_eq!(c.generation.tokens, g.generation.tokens, "{name}");
        assert_eq!(c.generation.positions, g.generation.positions, "{name}");
        assert_eq!(c.attention.len(), g.attention.len(), "{name}: rows");
        for (row, (a, b)) in c.attention.iter().zip(&g.attention).enumerate() {
            assert_eq!(a.len(), b.len(), "{name}: row {row}: layers");
            for ((la, wa), (lb, wb)) in a.iter().zip(b) {
                assert_eq!(la, lb, "{name}: row {row}: layer");
                assert_close(wa, wb, &format!("{name}: row {row}, layer {la}: attention"));
            }
        }
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
    }
    Ok(())
}
