//! The Glance2Gaze inputs the CPU tests (tests/glance2gaze.rs) and the GPU
//! test (tests/gpu/glance2gaze.rs) share: the GPU test repeats, on the GPU,
//! the runs whose token margins tests/glance2gaze.rs asserts.

use candle_core::{Device, Result, Tensor};
use foveal_candle::images::synthetic_images;
use foveal_candle::{Glance2GazeInput, ImageQuestions, ModelConfig};

use super::system_and_questions;

/// Decode steps of the runs.
pub const STEPS: usize = 4;
/// Seeds of the tiny model and of Glance2Gaze's parts.
pub const MODEL_SEED: u64 = 11;
pub const METHOD_SEED: u64 = 5;
/// The paper schedules the shared runs use (scaled to the tiny model: r =
/// 2 and r = 1).
pub const SCHEDULES: [&str; 2] = ["LLaVA-1.5-7B 33%", "LLaVA-1.5-7B 11%"];

/// The shared inputs: two rows of one image, of a 2 x 2 grid of
/// sub-images, and of a 3-frame video, each with the shared system prompt
/// and questions.
pub fn inputs(cfg: &ModelConfig, dev: &Device) -> Result<Vec<(&'static str, Glance2GazeInput)>> {
    let (system, questions) = system_and_questions();
    let s = cfg.vision.image_size;
    let mut out = Vec::new();
    for (what, g) in [("one image", 1), ("2 x 2 grid", 2)] {
        let input = ImageQuestions {
            pixels: synthetic_images(2, g * s, 5, dev)?.0,
            grid: (g, g),
            system: system.clone(),
            questions: questions.clone(),
        };
        out.push((what, Glance2GazeInput::from_images(&input, s)?));
    }
    out.push(("3-frame video", video(cfg, 3, &system, &questions, dev)?));
    Ok(out)
}

/// A video of `frames` frames per question: `[B, F, 3, s, s]` synthetic frames.
pub fn video(
    cfg: &ModelConfig,
    frames: usize,
    system: &[u32],
    questions: &[Vec<u32>],
    dev: &Device,
) -> Result<Glance2GazeInput> {
    let s = cfg.vision.image_size;
    let b = questions.len();
    let (clips, _) = synthetic_images(b * frames, s, 9, dev)?;
    let clips: Tensor = clips.reshape((b, frames, 3, s, s))?;
    Glance2GazeInput::video(&clips, system, questions)
}
