//! The VISOR inputs the CPU tests (tests/visor.rs) and the GPU test
//! (tests/gpu/visor.rs) share: the GPU test repeats, on the GPU, the runs
//! whose decision margins tests/visor.rs asserts.

use candle_core::{DType, Device, Result};
use foveal_candle::images::synthetic_images;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{LlavaModel, Method, ModelConfig, Visor, VisorConfig, VisorInput};

/// Decode steps of the runs.
pub const STEPS: usize = 4;
/// Seeds of VISOR's base model and of VISOR's own weights.
pub const MODEL_SEED: u64 = 11;
pub const VISOR_SEED: u64 = 3;

/// VISOR's 24-layer base model, seeded, on `dev`.
pub fn model(dev: &Device) -> Result<(ModelConfig, LlavaModel)> {
    let cfg = ModelConfig::visor();
    let model = LlavaModel::seeded(&cfg, MODEL_SEED, dev, DType::F32)?;
    Ok((cfg, model))
}

/// The shared runs' VISORs: the router, the costliest configuration for
/// every row, VISOR-TR (rho = 2) with the router.
pub fn visors(cfg: &ModelConfig, dev: &Device) -> Result<Vec<(&'static str, Visor)>> {
    let base = VisorConfig::for_model(cfg);
    [
        ("router", base.clone()),
        ("costliest", base.fixed(base.costliest())),
        ("VISOR-TR", VisorConfig::packed(cfg, 2.0)),
    ]
    .into_iter()
    .map(|(name, c)| Ok((name, Visor::seeded(cfg, &c, VISOR_SEED, dev, DType::F32)?)))
    .collect()
}

/// Two rows: one question; two questions (under the router the second's
/// prediction decides, a tie won by the lower index).
pub fn input(cfg: &ModelConfig, dev: &Device) -> Result<VisorInput> {
    Ok(VisorInput {
        pixels: synthetic_images(2, cfg.vision.image_size, 5, dev)?.0,
        grid: (1, 1),
        system: byte_tokens("You see an image."),
        questions: vec![
            vec![byte_tokens("What is it?")],
            vec![byte_tokens("Any circles?"), byte_tokens("What is left?")],
        ],
    })
}
