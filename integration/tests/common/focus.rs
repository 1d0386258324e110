//! The FocusLLaVA inputs the CPU tests (tests/focus.rs) and the GPU test
//! (tests/gpu/focus.rs) share: the GPU test repeats, on the GPU, the runs
//! whose decision margins tests/focus.rs asserts.

use candle_core::{Device, Result, Tensor};
use foveal_candle::images::synthetic_images;
use foveal_candle::ModelConfig;

/// Decode steps of the runs.
pub const STEPS: usize = 5;
/// Seeds of the tiny model and of FocusLLaVA's selector (this one mixes two
/// scales on the 2 x 2 grid).
pub const MODEL_SEED: u64 = 11;
pub const SELECTOR_SEED: u64 = 1;

/// Two synthetic images for a `g x g` grid of the tower's image size.
pub fn images(cfg: &ModelConfig, g: usize, dev: &Device) -> Result<Tensor> {
    Ok(synthetic_images(2, g * cfg.vision.image_size, 5, dev)?.0)
}
