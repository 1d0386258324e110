//! The Gaze Attention test inputs the CPU tests (tests/gaze.rs) and the GPU
//! test (tests/gpu/gaze.rs) share: the tiny model, the configuration and the
//! prompts, on any device.

use candle_core::{DType, Device, Result, Tensor};
use foveal::RegionShape;
use foveal_candle::images::synthetic_images;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{GazeAttention, GazeConfig, GazePrompt, GazeSegment, LlavaModel, ModelConfig};

/// Decode steps of the routed runs.
pub const STEPS: usize = 5;
/// Regions per head of the routed runs (fewer than any row has).
pub const ROUTED_K: usize = 2;

/// Grid side of the tiny model's images.
pub const SIDE: usize = 8;

pub fn model(dev: &Device) -> Result<(ModelConfig, LlavaModel)> {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 11, dev, DType::F32)?;
    Ok((cfg, model))
}

/// 3 x 3 regions of one frame (9 per 8 x 8 image, border ones smaller), or
/// spanning `frames` video frames.
pub fn config(k: usize, frames: usize) -> GazeConfig {
    GazeConfig {
        context_tokens: 4,
        region: RegionShape {
            frames,
            height: 3,
            width: 3,
        },
        k,
    }
}

/// Projected embeddings `[n, 64, Dm]` of `n` synthetic images, on the
/// model's device.
pub fn image_embeds(model: &LlavaModel, n: usize, seed: u64) -> Result<Tensor> {
    let (pixels, _) = synthetic_images(n, 64, seed, model.decoder.device())?;
    Ok(model.encode_images(&pixels)?.embeds)
}

pub fn image(embeds: Tensor) -> GazeSegment {
    GazeSegment::Image {
        embeds,
        height: SIDE,
        width: SIDE,
    }
}

/// Two rows of one image each, questions of different lengths (left padding).
pub fn image_batch(gaze: &GazeAttention, model: &LlavaModel) -> Result<GazePrompt> {
    let e = image_embeds(model, 2, 5)?;
    gaze.image_prompt(
        model,
        &e,
        &byte_tokens("You see an image."),
        &[
            byte_tokens("Where is the red square?"),
            byte_tokens("Count."),
        ],
    )
}

/// Row 0: two images with text between; row 1: a video of three frames.
pub fn mixed_batch(gaze: &GazeAttention, model: &LlavaModel) -> Result<GazePrompt> {
    let e = image_embeds(model, 5, 7)?;
    let rows = vec![
        vec![
            GazeSegment::Text(byte_tokens("Compare ")),
            image(e.get(0)?),
            GazeSegment::Text(byte_tokens(" with ")),
            image(e.get(1)?),
            GazeSegment::Text(byte_tokens(": which is brighter?")),
        ],
        vec![
            GazeSegment::Text(byte_tokens("A video: ")),
            GazeSegment::Video {
                frames: e.narrow(0, 2, 3)?,
                height: SIDE,
                width: SIDE,
            },
            GazeSegment::Text(byte_tokens("What moves?")),
        ],
    ];
    gaze.prompt(model, &rows)
}

/// The routed runs the tests compare (k = [`ROUTED_K`]): `(name, frames per
/// region, prompt builder, units per image or video of each row)`.
pub type Batch = fn(&GazeAttention, &LlavaModel) -> Result<GazePrompt>;
pub const BATCHES: [(&str, usize, Batch, &[&[usize]]); 2] = [
    ("images", 1, image_batch, &[&[1], &[1]]),
    ("mixed", 2, mixed_batch, &[&[1, 1], &[3]]),
];
