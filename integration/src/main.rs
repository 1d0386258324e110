//! The main job: every method end to end on the built-in small model (seeded
//! weights, synthetic images or `cargo run --release -- IMAGE`): the dense
//! baseline, GlimpsePrune, FocusLLaVA (on the images, and on images cut
//! into 2 x 2 sub-images beside the dense model over the same stitched map)
//! and Gaze Attention (also on a video and a two-image prompt, with what each
//! decode step attended), CPU by default; built with the feature `cuda`
//! on a machine with a GPU, on the GPU. Then the GlimpsePrune kernel pipeline
//! on a synthetic batch with planted salient tokens (and, on a GPU, its CUDA
//! run checked against the CPU references).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use foveal::{KeepRule, RegionShape};
use foveal_candle::glimpse_pipeline::{self, Batch, Config};
use foveal_candle::images::{load_image, synthetic_images};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::vision_sampler::encode_grid;
use foveal_candle::{
    FocusConfig, FocusLlava, GazeAttention, GazeConfig, GazeRun, GazeSegment, GlimpseConfig,
    GlimpsePrune, LlavaModel, ModelConfig, Prompt,
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

struct Row {
    method: &'static str,
    visual: Vec<usize>,
    /// Tokens after a vision-side sampler (FocusLLaVA), if the method has one.
    sampled: Option<Vec<usize>>,
    kept: Vec<usize>,
    kv_entries: Vec<usize>,
    prefill_ms: f64,
    decode_ms: f64,
    tokens: Vec<Vec<u32>>,
}

/// Dense greedy generation over `prompt`, timed.
fn dense_row(method: &'static str, model: &LlavaModel, prompt: &Prompt) -> Result<Row> {
    let dec = &model.decoder;
    let t = Instant::now();
    let mut cache = dec.new_cache();
    let h = dec.forward_layers(
        &prompt.embeds,
        &prompt.positions,
        Some(&prompt.mask()?),
        0..dec.num_layers(),
        &mut cache,
    )?;
    let first = dec.last_logits(&h)?;
    let prefill = t.elapsed();
    let t = Instant::now();
    let dense = dec.greedy(
        &first,
        &prompt.next_positions(),
        &prompt.starts,
        &mut cache,
        NEW_TOKENS,
    )?;
    let visual: Vec<usize> = prompt.visual.iter().map(Vec::len).collect();
    Ok(Row {
        method,
        sampled: None,
        kept: visual.clone(),
        visual,
        kv_entries: prompt
            .starts
            .iter()
            .map(|s| (prompt.seq() - s) * dec.num_layers())
            .collect(),
        prefill_ms: prefill.as_secs_f64() * 1e3,
        decode_ms: t.elapsed().as_secs_f64() * 1e3,
        tokens: dense.tokens,
    })
}

fn focus_row(
    method: &'static str,
    fl: &FocusLlava,
    model: &LlavaModel,
    pixels: &Tensor,
    grid: (usize, usize),
    system: &[u32],
    questions: &[Vec<u32>],
) -> Result<Row> {
    let run = fl.generate(model, pixels, grid, system, questions, NEW_TOKENS)?;
    Ok(Row {
        method,
        visual: run.visual,
        sampled: Some(run.sampled),
        kept: run.kept.iter().map(Vec::len).collect(),
        kv_entries: run.kv_entries,
        prefill_ms: run.prefill.as_secs_f64() * 1e3,
        decode_ms: run.decode.as_secs_f64() * 1e3,
        tokens: run.generation.tokens,
    })
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
    let pixels = images(cfg.vision.image_size)?;
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

    let mut rows = Vec::new();
    rows.push(dense_row(
        "dense",
        &model,
        &model.build_prompt(&pixels, &system, &questions)?,
    )?);

    // GlimpsePrune (seeded predictor: an untrained importance map, capped at a quarter).
    let mut gcfg = GlimpseConfig::for_model(&cfg);
    gcfg.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    let gp = GlimpsePrune::seeded(&cfg, &gcfg, 2, &dev, DType::F32)?;
    let run = gp.generate(&model, &pixels, &system, &questions, NEW_TOKENS)?;
    rows.push(Row {
        method: "GlimpsePrune",
        visual: run.visual.clone(),
        sampled: None,
        kept: run.kept.iter().map(Vec::len).collect(),
        kv_entries: run.kv_entries.clone(),
        prefill_ms: run.prefill.as_secs_f64() * 1e3,
        decode_ms: run.decode.as_secs_f64() * 1e3,
        tokens: run.generation.tokens,
    });

    // FocusLLaVA (seeded selector), on the same images (one sub-image each),
    // then on images twice the size cut into 2 x 2 sub-images, beside the
    // dense model over the same stitched map.
    let fl = FocusLlava::seeded(&cfg, &FocusConfig::for_model(&cfg), 1, &dev, DType::F32)?;
    rows.push(focus_row(
        "FocusLLaVA",
        &fl,
        &model,
        &pixels,
        (1, 1),
        &system,
        &questions,
    )?);
    let large = images(2 * cfg.vision.image_size)?;
    let (map, _) = encode_grid(&model, &large, (2, 2))?;
    let (b, h, w, c) = map.dims4()?;
    rows.push(dense_row(
        "dense 2x2",
        &model,
        &model.build_prompt_from_embeds(&map.reshape((b, h * w, c))?, &system, &questions)?,
    )?);
    rows.push(focus_row(
        "FocusLLaVA 2x2",
        &fl,
        &model,
        &large,
        (2, 2),
        &system,
        &questions,
    )?);

    // Gaze Attention: context tokens per image, 2 x 2 regions (16 per image), 4 per head.
    let gcfg = GazeConfig {
        context_tokens: 4,
        region: RegionShape {
            frames: 1,
            height: 2,
            width: 2,
        },
        k: 4,
    };
    let gaze = GazeAttention::seeded(&cfg, &gcfg, 3, &dev, DType::F32)?;
    let t = Instant::now();
    let embeds = model.encode_images(&pixels)?.embeds;
    let prompt = gaze.image_prompt(&model, &embeds, &system, &questions)?;
    let encode = t.elapsed();
    let run = gaze.generate(&model, &prompt, NEW_TOKENS)?;
    let lens: Vec<usize> = prompt
        .prompt
        .starts
        .iter()
        .map(|s| prompt.prompt.seq() - s)
        .collect();
    rows.push(Row {
        method: "Gaze Attention",
        visual: run.visual.clone(),
        sampled: None,
        kept: run.visual.clone(),
        kv_entries: lens.iter().map(|n| n * cfg.text.num_layers).collect(),
        prefill_ms: (encode + run.prefill).as_secs_f64() * 1e3,
        decode_ms: run.decode.as_secs_f64() * 1e3,
        tokens: run.generation.tokens.clone(),
    });
    let mut gaze_runs = vec![("images", gcfg, run)];
    // A 4-frame video (regions spanning 2 frames) and a two-image prompt.
    let vcfg = GazeConfig {
        region: RegionShape {
            frames: 2,
            ..gcfg.region
        },
        ..gcfg
    };
    let video_gaze = GazeAttention::seeded(&cfg, &vcfg, 3, &dev, DType::F32)?;
    let (clips, _) = synthetic_images(6, cfg.vision.image_size, 7, &dev)?;
    let clips = model.encode_images(&clips)?.embeds;
    let side = cfg.vision.patches_per_side();
    let image = |i: usize| -> Result<GazeSegment> {
        Ok(GazeSegment::Image {
            embeds: clips.get(i)?,
            height: side,
            width: side,
        })
    };
    let video_rows = vec![
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
    let run = video_gaze.generate(&model, &video_gaze.prompt(&model, &video_rows)?, NEW_TOKENS)?;
    gaze_runs.push(("video | 2 images", vcfg, run));

    println!(
        "\n{:<15} {:>4} {:>10} {:>8} {:>6} {:>11} {:>11} {:>10}  tokens generated",
        "method", "row", "visual in", "sampled", "kept", "KV entries", "prefill ms", "decode ms"
    );
    for r in &rows {
        for b in 0..r.visual.len() {
            let (p, d) = if b == 0 {
                (
                    format!("{:.1}", r.prefill_ms),
                    format!("{:.1}", r.decode_ms),
                )
            } else {
                (String::new(), String::new())
            };
            println!(
                "{:<15} {:>4} {:>10} {:>8} {:>6} {:>11} {:>11} {:>10}  {:?}",
                if b == 0 { r.method } else { "" },
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
        }
    }
    println!("(sampled: after FocusLLaVA's vision-guided sampler; kept: after the pruning / text-guided sampler)");
    print_gaze(&gaze_runs);
    kernel_pipeline().map_err(candle_core::Error::wrap)
}

/// What Gaze Attention attended: per row its units' visual and context
/// tokens, regions, k, and the KV entries a query head read per decode step
/// and layer (mean) against dense attention's.
fn print_gaze(runs: &[(&str, GazeConfig, GazeRun)]) {
    println!("\nGaze Attention: KV entries attended per decode step (mean over steps, layers and query heads) vs dense");
    println!(
        "{:<17} {:>4} {:>7} {:>8} {:>8} {:>7} {:>3} {:>9} {:>7} {:>6} {:>11} {:>10}  tokens generated",
        "prompt", "row", "visual", "context", "region", "regions", "k", "attended", "dense", "%", "prefill ms", "decode ms"
    );
    for (name, gcfg, run) in runs {
        let r = gcfg.region;
        for b in 0..run.visual.len() {
            let (attended, dense) = run.mean_attended(b);
            let (label, p, d) = if b == 0 {
                (
                    *name,
                    format!("{:.1}", run.prefill.as_secs_f64() * 1e3),
                    format!("{:.1}", run.decode.as_secs_f64() * 1e3),
                )
            } else {
                ("", String::new(), String::new())
            };
            println!(
                "{:<17} {:>4} {:>7} {:>8} {:>8} {:>7} {:>3} {:>9.1} {:>7.1} {:>5.0}% {:>11} {:>10}  {:?}",
                label,
                b,
                run.visual[b],
                run.context[b],
                format!("{}x{}x{}", r.frames, r.height, r.width),
                run.regions[b],
                gcfg.k,
                attended,
                dense,
                100.0 * attended / dense,
                p,
                d,
                run.generation.tokens[b]
            );
        }
    }
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
