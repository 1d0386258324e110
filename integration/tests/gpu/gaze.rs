//! Gaze Attention on the GPU against the CPU: the same seeded weights,
//! context tokens and prompts (single images; a video and two images),
//! generated with foveal's CUDA region_descriptors, route_topk and
//! gaze_decode on candle's stream, and with the CPU references. Skips (and
//! says so) where no GPU is present.

use candle_core::{DType, Device, Result};
use foveal::RegionShape;
use foveal_candle::images::synthetic_images;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    GazeAttention, GazeConfig, GazeRun, GazeSegment, LlavaModel, Method, ModelConfig,
};

use crate::common::{gpu, max_abs_diff};

const STEPS: usize = 4;

/// Both prompts on `dev`: one image per row, then a video and two images.
fn runs(dev: &Device, cfg: &ModelConfig) -> Result<Vec<GazeRun>> {
    let model = LlavaModel::seeded(cfg, 11, dev, DType::F32)?;
    let gcfg = GazeConfig {
        context_tokens: 4,
        region: RegionShape {
            frames: 2,
            height: 3,
            width: 3,
        },
        k: 3,
    };
    let gaze = GazeAttention::seeded(cfg, &gcfg, 3, dev, DType::F32)?;
    let (pixels, _) = synthetic_images(5, cfg.vision.image_size, 5, dev)?;
    let e = model.encode_images(&pixels)?.embeds;
    let side = cfg.vision.patches_per_side();
    let images = gaze.image_prompt(
        &model,
        &e.narrow(0, 0, 2)?,
        &byte_tokens("You see an image."),
        &[
            byte_tokens("Where is the red square?"),
            byte_tokens("Count."),
        ],
    )?;
    let image = |i: usize| -> Result<GazeSegment> {
        Ok(GazeSegment::Image {
            embeds: e.get(i)?,
            height: side,
            width: side,
        })
    };
    let mixed = gaze.prompt(
        &model,
        &[
            vec![
                GazeSegment::Text(byte_tokens("A video: ")),
                GazeSegment::Video {
                    frames: e.narrow(0, 2, 3)?,
                    height: side,
                    width: side,
                },
                GazeSegment::Text(byte_tokens("What moves?")),
            ],
            vec![
                image(0)?,
                GazeSegment::Text(byte_tokens(" or ")),
                image(1)?,
                GazeSegment::Text(byte_tokens("?")),
            ],
        ],
    )?;
    [images, mixed]
        .iter()
        .map(|p| gaze.generate(&model, p, STEPS))
        .collect()
}

#[test]
fn cuda_and_cpu_gaze_generations_agree() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let cfg = ModelConfig::tiny();
    let (cpu, gpu) = (runs(&Device::Cpu, &cfg)?, runs(&gpu, &cfg)?);
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        assert_eq!(c.generation.tokens, g.generation.tokens, "prompt {i}");
        for (step, (a, b)) in c
            .generation
            .logits
            .iter()
            .zip(&g.generation.logits)
            .enumerate()
        {
            let d = max_abs_diff(a, b)?;
            assert!(
                d < 1e-2,
                "prompt {i}, step {step}: CPU and GPU logits differ by {d}"
            );
        }
        assert_eq!(c.steps.len(), g.steps.len());
        // The routes are the regions each head attended: the same on both.
        for (t, (sc, sg)) in c.steps.iter().zip(&g.steps).enumerate() {
            let ids = |s: &foveal_candle::GazeStep| {
                s.routes
                    .iter()
                    .map(|r| r.ids().to_vec())
                    .collect::<Vec<_>>()
            };
            assert_eq!(ids(sc), ids(sg), "prompt {i}, step {t}: routes");
        }
    }
    Ok(())
}
