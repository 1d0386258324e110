//! The main job: every method end to end on the built-in small model (seeded
//! weights, synthetic images or `cargo run --release -- IMAGE`), through the
//! one interface they share ([`ImageMethod`]): the dense baseline,
//! GlimpsePrune, FocusLLaVA, Gaze Attention and Glance2Gaze (the paper's
//! 33%, 22% and 11% schedules scaled) on the images, then the
//! methods that take sub-images on images cut into 2 x 2 (the dense model
//! over the same stitched map beside them), Gaze Attention on a video
//! and a two-image prompt, with what each decode step attended, and
//! Glance2Gaze on a video at the paper's video setting. CPU by
//! default; built with the feature `cuda` on a machine with a GPU, on the GPU. Then the GlimpsePrune kernel pipeline
//! on a synthetic batch with planted salient tokens (and, on a GPU, its CUDA
//! run checked against the CPU references).

use candle_core::{DType, Device, Result, Tensor};
use foveal::{KeepRule, RegionShape};
use foveal_candle::glimpse_pipeline::{self, Batch, Config};
use foveal_candle::images::{load_image, synthetic_images};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    Dense, FocusConfig, FocusLlava, GazeAttention, GazeConfig, GazeSegment, Glance2Gaze,
    Glance2GazeConfig, Glance2GazeInput, GlimpseConfig, GlimpsePrune, ImageMethod, ImageQuestions,
    LlavaModel, Method, ModelConfig, Report,
};

const NEW_TOKENS: usize = 8;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// Every method, seeded: the dense baseline, GlimpsePrune (an untrained
/// importance map, capped at a quarter), FocusLLaVA (the paper's settings),
/// Gaze Attention (4 context tokens per image, 2 x 2 regions, 4 per head).
fn methods(cfg: &ModelConfig, dev: &Device) -> Result<Vec<Box<dyn ImageMethod>>> {
    let mut glimpse = GlimpseConfig::for_model(cfg);
    glimpse.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    let gaze = GazeConfig {
        context_tokens: 4,
        region: RegionShape {
            frames: 1,
            height: 2,
            width: 2,
        },
        k: 4,
    };
    Ok(vec![
        Box::new(Dense),
        Box::new(GlimpsePrune::seeded(cfg, &glimpse, 2, dev, DType::F32)?),
        Box::new(FocusLlava::seeded(
            cfg,
            &FocusConfig::for_model(cfg),
            1,
            dev,
            DType::F32,
        )?),
        Box::new(GazeAttention::seeded(cfg, &gaze, 3, dev, DType::F32)?),
        glance2gaze(cfg, "LLaVA-1.5-7B 33%", dev)?,
        glance2gaze(cfg, "LLaVA-1.5-7B 22%", dev)?,
        glance2gaze(cfg, "LLaVA-1.5-7B 11%", dev)?,
    ])
}

/// Glance2Gaze, seeded, at one of the paper's schedules scaled to `cfg`
/// (the paper's fused ViT layers scaled likewise).
fn glance2gaze(cfg: &ModelConfig, schedule: &str, dev: &Device) -> Result<Box<dyn ImageMethod>> {
    let gcfg = Glance2GazeConfig::for_model(cfg, schedule)?;
    Ok(Box::new(Glance2Gaze::seeded(
        cfg,
        &gcfg,
        5,
        dev,
        DType::F32,
    )?))
}

fn run() -> Result<()> {
    let dev = device();
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 1, &dev, DType::F32)?;
    // Synthetic images, or the image file given as the first argument (for both rows), of `size` pixels.
    let path = std::env::args().nth(1);
    let images = |size: usize| -> Result<Tensor> {
        match &path {
            Some(path) => {
                let img = load_image(path, size, &dev)?;
                Tensor::cat(&[&img, &img], 0)
            }
            None => Ok(synthetic_images(2, size, 2, &dev)?.0),
        }
    };
    let system = byte_tokens("A chat about an image.");
    let questions = vec![
        byte_tokens("What is in the top left corner?"),
        byte_tokens("How many shapes?"),
    ];
    println!(
        "foveal main job on {} ({}): built-in model (ViT {}x{} patches, decoder {} layers, {} query / {} KV heads, head dim {}), seeded weights, {} images",
        if dev.is_cuda() { "GPU" } else { "CPU" },
        if dev.is_cuda() { "CUDA" } else { "candle CPU + foveal CPU references" },
        cfg.vision.patches_per_side(),
        cfg.vision.patches_per_side(),
        cfg.text.num_layers,
        cfg.text.num_heads,
        cfg.text.num_kv_heads,
        cfg.text.head_dim,
        questions.len(),
    );

    // Every method on the images, then on images twice the size cut into
    // 2 x 2 sub-images (the methods that take them).
    let mut inputs = Vec::new();
    for (suffix, g) in [("", 1), (" 2x2", 2)] {
        let input = ImageQuestions {
            pixels: images(g * cfg.vision.image_size)?,
            grid: (g, g),
            system: system.clone(),
            questions: questions.clone(),
        };
        inputs.push((suffix, input));
    }
    let mut reports = Vec::new();
    let methods = methods(&cfg, &dev)?;
    for (suffix, input) in &inputs {
        for m in methods
            .iter()
            .filter(|m| input.grid == (1, 1) || m.takes_grids())
        {
            reports.push((*suffix, m.run(&model, input, NEW_TOKENS)?));
        }
    }
    reports.push(("", gaze_video(&model, &dev)?));
    reports.push(("", glance2gaze_video(&model, &dev)?));
    print_reports(&reports);
    kernel_pipeline().map_err(candle_core::Error::wrap)
}

/// Gaze Attention on prompts only it takes: a 4-frame video (regions
/// spanning 2 frames) and a two-image prompt.
fn gaze_video(model: &LlavaModel, dev: &Device) -> Result<Report> {
    let cfg = &model.config;
    let gcfg = GazeConfig {
        context_tokens: 4,
        region: RegionShape {
            frames: 2,
            height: 2,
            width: 2,
        },
        k: 4,
    };
    let gaze = GazeAttention::seeded(cfg, &gcfg, 3, dev, DType::F32)?;
    let (clips, _) = synthetic_images(6, cfg.vision.image_size, 7, dev)?;
    let clips = model.encode_images(&clips)?.embeds;
    let side = cfg.vision.patches_per_side();
    let image = |i: usize| -> Result<GazeSegment> {
        Ok(GazeSegment::Image {
            embeds: clips.get(i)?,
            height: side,
            width: side,
        })
    };
    let rows = vec![
        vec![
            GazeSegment::Text(byte_tokens("A video: ")),
            GazeSegment::Video {
                frames: clips.narrow(0, 0, 4)?,
                height: side,
                width: side,
            },
            GazeSegment::Text(byte_tokens("What moves?")),
        ],
        vec![
            GazeSegment::Text(byte_tokens("Compare ")),
            image(4)?,
            GazeSegment::Text(byte_tokens(" with ")),
            image(5)?,
            GazeSegment::Text(byte_tokens(".")),
        ],
    ];
    let run = gaze.generate(model, &gaze.prompt(model, &rows)?, NEW_TOKENS)?;
    Ok(run.report("Gaze video|2 img", &gcfg))
}

/// Glance2Gaze on a 4-frame video per question at the paper's video
/// setting (r = 3, p_r = 10 of 256 tokens per frame, compression per
/// frame), scaled to the model.
fn glance2gaze_video(model: &LlavaModel, dev: &Device) -> Result<Report> {
    let cfg = &model.config;
    let gcfg = Glance2GazeConfig::for_model(cfg, "Video-LLaVA 6%")?;
    let g2g = Glance2Gaze::seeded(cfg, &gcfg, 5, dev, DType::F32)?;
    let s = cfg.vision.image_size;
    let (frames, _) = synthetic_images(8, s, 7, dev)?;
    let questions = vec![byte_tokens("What moves?"), byte_tokens("What changes?")];
    let input = Glance2GazeInput::video(
        &frames.reshape((2, 4, 3, s, s))?,
        &byte_tokens("A video: "),
        &questions,
    )?;
    Ok(g2g.report(g2g.generate(model, &input, NEW_TOKENS)?))
}

/// One line per method (its name, a suffix naming the input) and row:
/// visual tokens in, after a vision-side sampler, kept; KV entries; times;
/// the tokens; the method's own detail.
fn print_reports(reports: &[(&str, Report)]) {
    println!(
        "\n{:<18} {:>4} {:>10} {:>8} {:>6} {:>11} {:>11} {:>10}  tokens generated",
        "method", "row", "visual in", "sampled", "kept", "KV entries", "prefill ms", "decode ms"
    );
    for (suffix, r) in reports {
        for b in 0..r.visual.len() {
            let (p, d) = if b == 0 {
                (
                    format!("{:.1}", r.prefill.as_secs_f64() * 1e3),
                    format!("{:.1}", r.decode.as_secs_f64() * 1e3),
                )
            } else {
                (String::new(), String::new())
            };
            println!(
                "{:<18} {:>4} {:>10} {:>8} {:>6} {:>11} {:>11} {:>10}  {:?}",
                if b == 0 {
                    format!("{}{suffix}", r.method)
                } else {
                    String::new()
                },
                b,
                r.visual[b],
                r.sampled
                    .as_ref()
                    .map_or("-".to_string(), |s| s[b].to_string()),
                r.kept[b],
                r.kv_entries[b],
                p,
                d,
                r.tokens[b]
            );
            if let Some(detail) = r.detail.get(b) {
                println!("{:<23} {detail}", "");
            }
        }
    }
    println!("(sampled: after FocusLLaVA's vision-guided sampler; kept: after the pruning / text-guided sampler; Gaze Attention: KV entries a query head attended per decode step and layer, mean, against dense attention's)");
}

/// The GlimpsePrune kernels on a synthetic batch whose salient tokens are known.
fn kernel_pipeline() -> foveal::Result<()> {
    let batch = Batch::new(Config::default())?;
    let rule = glimpse_pipeline::keep_rule();
    let out = glimpse_pipeline::run_cpu(&batch, &rule)?;
    println!("\nGlimpsePrune kernels on a synthetic batch with planted salient visual tokens (CPU references):");
    println!(
        "{:>4} {:>8} {:>7} {:>6} {:>14}",
        "row", "valid", "visual", "kept", "salient kept"
    );
    for b in 0..batch.batch() {
        let kept: Vec<i32> = out
            .keep
            .kept(b)
            .iter()
            .map(|&i| batch.rows.visual(b)[i as usize])
            .collect();
        let hit = batch.salient[b]
            .iter()
            .filter(|&&p| kept.contains(&(p as i32)))
            .count();
        println!(
            "{:>4} {:>8} {:>7} {:>6} {:>8}/{:<5}",
            b,
            batch.rows.len(b),
            batch.rows.nv(b),
            kept.len(),
            hit,
            batch.salient[b].len()
        );
    }
    #[cfg(feature = "cuda")]
    if let Some(stream) = glimpse_pipeline::cuda::stream() {
        let gpu = glimpse_pipeline::cuda::run(&stream, &batch, &rule)?;
        let max_diff = out
            .scores
            .iter()
            .zip(&gpu.scores)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let same = out.keep == gpu.keep
            && out.positions == gpu.positions
            && out.k == gpu.k
            && out.v == gpu.v
            && out.hidden == gpu.hidden
            && out.position_ids == gpu.position_ids;
        println!("GPU vs CPU: max |score difference| {max_diff:.2e}; kept sets and compacted caches identical: {same}");
        if !same || max_diff > 1e-3 {
            return Err(foveal::Error::Cuda {
                op: "main",
                msg: "the GPU run disagrees with the CPU reference".into(),
            });
        }
    }
    Ok(())
}
