//! The main job: every method end to end on the built-in small model (seeded
//! weights, synthetic images or `cargo run --release -- IMAGE`), CPU by default; built with the feature `cuda`
//! on a machine with a GPU, on the GPU: the dense baseline, GlimpsePrune and
//! Gaze Attention (also on a video and a two-image prompt, with what each
//! decode step attended). Then the GlimpsePrune kernel pipeline
//! on a synthetic batch with planted salient tokens (and, on a GPU, its CUDA
//! run checked against the CPU references).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use foveal::{KeepRule, RegionShape};
use foveal_candle::glimpse_pipeline::{self, Batch, Config};
use foveal_candle::images::{load_image, synthetic_images};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    GazeAttention, GazeConfig, GazeRun, GazeSegment, GlimpseConfig, GlimpsePrune, LlavaModel,
    ModelConfig,
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
    kept: Vec<usize>,
    kv_entries: Vec<usize>,
    prefill_ms: f64,
    decode_ms: f64,
    tokens: Vec<Vec<u32>>,
}

fn run() -> Result<()> {
    let dev = device();
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 1, &dev, DType::F32)?;
    // Synthetic images, or the image file given as the first argument (for both rows).
    let pixels = match std::env::args().nth(1) {
        Some(path) => {
            let img = load_image(&path, cfg.vision.image_size, &dev)?;
            Tensor::cat(&[&img, &img], 0)?
        }
        None => synthetic_images(2, cfg.vision.image_size, 2, &dev)?.0,
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

    let mut rows = Vec::new();
    // Dense baseline.
    let dec = &model.decoder;
    let t = Instant::now();
    let prompt = model.build_prompt(&pixels, &system, &questions)?;
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
    let lens: Vec<usize> = prompt.starts.iter().map(|s| prompt.seq() - s).collect();
    rows.push(Row {
        method: "dense",
        visual: prompt.visual.iter().map(Vec::len).collect(),
        kept: prompt.visual.iter().map(Vec::len).collect(),
        kv_entries: lens.iter().map(|n| n * dec.num_layers()).collect(),
        prefill_ms: prefill.as_secs_f64() * 1e3,
        decode_ms: t.elapsed().as_secs_f64() * 1e3,
        tokens: dense.tokens,
    });

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
        kept: run.kept.iter().map(Vec::len).collect(),
        kv_entries: run.kv_entries.clone(),
        prefill_ms: run.prefill.as_secs_f64() * 1e3,
        decode_ms: run.decode.as_secs_f64() * 1e3,
        tokens: run.generation.tokens,
    });

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
        kept: run.visual.clone(),
        kv_entries: lens.iter().map(|n| n * dec.num_layers()).collect(),
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
        "\n{:<15} {:>4} {:>10} {:>6} {:>11} {:>11} {:>10}  tokens generated",
        "method", "row", "visual in", "kept", "KV entries", "prefill ms", "decode ms"
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
                "{:<15} {:>4} {:>10} {:>6} {:>11} {:>11} {:>10}  {:?}",
                if b == 0 { r.method } else { "" },
                b,
                r.visual[b],
                r.kept[b],
                r.kv_entries[b],
                p,
                d,
                r.tokens[b]
            );
        }
    }
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
