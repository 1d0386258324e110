//! The GlimpsePrune runs the GPU test (tests/gpu/glimpse.rs) repeats on the
//! GPU, shared with the CPU test (tests/glimpse.rs) that asserts their
//! decision margins.

use candle_core::{DType, Device, Result, Tensor};
use foveal::KeepRule;
use foveal_candle::images::synthetic_images;
use foveal_candle::{
    Anchor, GlimpseConfig, GlimpsePrune, LlavaModel, Method, ModelConfig, Predictor,
};

/// Decode steps of the runs.
pub const STEPS: usize = 4;

/// The tiny model (seed 11) and two synthetic images (seed 5) on `dev`.
pub fn model_and_images(dev: &Device) -> Result<(ModelConfig, LlavaModel, Tensor)> {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 11, dev, DType::F32)?;
    let (pixels, _) = synthetic_images(2, cfg.vision.image_size, 5, dev)?;
    Ok((cfg, model, pixels))
}

/// The two GlimpsePrune settings (predictor seed 3): the learned predictor
/// under a 0.4 cap, and the baseline map with two anchors under a 0.25 cap.
pub fn settings(cfg: &ModelConfig) -> [(&'static str, GlimpseConfig); 2] {
    let mut vip = GlimpseConfig::for_model(cfg);
    vip.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.4),
        min_keep: 3,
    };
    let mut baseline = GlimpseConfig::for_model(cfg);
    baseline.predictor = Predictor::Baseline;
    baseline.anchors = vec![Anchor::TopRight, Anchor::BottomLeft];
    baseline.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    [("predictor", vip), ("baseline map", baseline)]
}

/// GlimpsePrune with `gcfg` (predictor seed 3) on `dev`.
pub fn method(cfg: &ModelConfig, gcfg: &GlimpseConfig, dev: &Device) -> Result<GlimpsePrune> {
    GlimpsePrune::seeded(cfg, gcfg, 3, dev, DType::F32)
}
