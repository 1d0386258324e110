//! The main job: every method end to end on the built-in small models
//! (seeded weights, synthetic images or `cargo run --release -- IMAGE`),
//! through the one interface they share ([`ImageMethod`]): the dense
//! baseline, GlimpsePrune, FocusLLaVA, Gaze Attention and Glance2Gaze (the
//! paper's 33%, 22% and 11% schedules scaled) on the tiny model, and VISOR
//! (the router's configuration, the costliest configuration, and VISOR-TR)
//! beside the dense model on VISOR's 24-layer base, on the images, then the
//! methods that take sub-images on images cut into 2 x 2 (the dense model
//! over the same stitched map beside them), Gaze Attention on a video and a
//! two-image prompt, with what each decode step attended, and Glance2Gaze on
//! a video at the paper's video setting. CPU by
//! default; built with the feature `cuda` on a machine with a GPU, on the GPU. Then the GlimpsePrune kernel pipeline
//! on a synthetic batch with planted salient tokens (and, on a GPU, its CUDA
//! run checked against the CPU references).
//!
//! `--model DIR` runs a Hugging Face model folder instead ([`HfFolder`]:
//! config.json, safetensors shards, tokenizer.json) on `--image FILE` (or a
//! synthetic image) and `--prompt TEXT`: the dense model and every method,
//! each with its weights from the folder where it has them and seeded on
//! top of the loaded base model otherwise (the output says which).
//!
//! Pictures: per input image and method, a PNG of what the method kept or
//! attended ([`foveal_candle::pictures`]) in `--out DIR` (default
//! `foveal-pictures` in the build folder, beside `release/`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use clap::{value_parser, Arg, ArgMatches, Command};
use foveal::{KeepRule, RegionShape};
use foveal_candle::glimpse_pipeline::{self, Batch, Config};
use foveal_candle::images::{load_image, synthetic_images};
use foveal_candle::pictures;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    Dense, FocusConfig, FocusLlava, GazeAttention, GazeConfig, GazeSegment, Glance2Gaze,
    Glance2GazeConfig, Glance2GazeInput, GlimpseConfig, GlimpsePrune, HfFolder, ImageMethod,
    ImageQuestions, LlavaModel, Method, ModelConfig, Report, Visor, VisorConfig,
};

const NEW_TOKENS: usize = 8;

fn main() {
    // Bad flags: clap prints what is wrong and exits with code 2.
    let args = cli().get_matches();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn cli() -> Command {
    Command::new("foveal")
        .about("Every token-reduction method end to end: on the built-in small models (seeded weights), or on a Hugging Face model folder; writes pictures of what each method kept")
        .arg(
            Arg::new("IMAGE")
                .help("An image file (PNG or JPEG) for the built-in models' rows (as --image)")
                .value_parser(value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("image")
                .long("image")
                .value_name("FILE")
                .help("An image file (PNG or JPEG); without it, synthetic images")
                .value_parser(value_parser!(PathBuf))
                .conflicts_with("IMAGE"),
        )
        .arg(
            Arg::new("model")
                .long("model")
                .value_name("DIR")
                .help("A Hugging Face LLaVA model folder (config.json, model.safetensors or shards with model.safetensors.index.json, tokenizer.json)")
                .value_parser(value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("prompt")
                .long("prompt")
                .value_name("TEXT")
                .help("The question (with --model; the built-in models ask their two own)")
                .requires("model"),
        )
        .arg(
            Arg::new("out")
                .long("out")
                .value_name("DIR")
                .help("Where the pictures go (default: foveal-pictures in the build folder)")
                .value_parser(value_parser!(PathBuf)),
        )
}

/// `--out`, or `foveal-pictures` in the build folder (`target/` when the
/// binary is `target/release/foveal`).
fn out_dir(args: &ArgMatches) -> Result<PathBuf> {
    let dir = match args.get_one::<PathBuf>("out") {
        Some(d) => d.clone(),
        None => {
            let exe = std::env::current_exe()?;
            exe.parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."))
                .join("foveal-pictures")
        }
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| candle_core::Error::Msg(format!("--out {}: {e}", dir.display())))?;
    Ok(dir)
}

/// Writes the pictures of `report` (rows of `pixels`) into `out`, named
/// `{input}-row{b}-{method}{label}.png`; returns the lines that say where.
fn write_pictures(
    out: &Path,
    input: &str,
    label: &str,
    pixels: &Tensor,
    report: &Report,
) -> Result<Vec<String>> {
    let safe = |s: &str| -> String {
        s.trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut lines = Vec::new();
    for (b, maps) in report.maps.iter().enumerate() {
        if maps.panels.is_empty() {
            continue;
        }
        let name = format!("{input}-row{b}-{}{}.png", safe(report.method), safe(label));
        let path = out.join(&name);
        pictures::write(pixels, b, maps, &path)?;
        let titles: Vec<&str> = maps.panels.iter().map(|p| p.title.as_str()).collect();
        lines.push(format!("  {name}: {}", titles.join(" | ")));
    }
    Ok(lines)
}

fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// A base model and the methods that run on it, labelled in the table.
struct Bench {
    label: &'static str,
    model: LlavaModel,
    methods: Vec<Box<dyn ImageMethod>>,
}

/// Every method, seeded, with its base model: on the tiny model the dense
/// baseline, GlimpsePrune, FocusLLaVA and Gaze Attention ([`methods`]); on
/// VISOR's 24-layer base the dense baseline and VISOR ([`visor_methods`]).
fn benches(dev: &Device) -> Result<Vec<Bench>> {
    let tiny = ModelConfig::tiny();
    let visor = ModelConfig::visor();
    Ok(vec![
        Bench {
            label: "",
            methods: methods(&tiny, dev)?,
            model: LlavaModel::seeded(&tiny, 1, dev, DType::F32)?,
        },
        Bench {
            label: " 24L",
            methods: visor_methods(&visor, dev)?,
            model: LlavaModel::seeded(&visor, 1, dev, DType::F32)?,
        },
    ])
}

/// The dense baseline and VISOR (the paper's schedule: 8 cross-attention
/// layers, Appendix A's configurations) with the router, with the
/// costliest configuration for every row, and VISOR-TR (packing ratio 2)
/// with the router.
fn visor_methods(cfg: &ModelConfig, dev: &Device) -> Result<Vec<Box<dyn ImageMethod>>> {
    let routed = VisorConfig::for_model(cfg);
    let costliest = routed.fixed(routed.costliest());
    Ok(vec![
        Box::new(Dense),
        Box::new(Visor::seeded(cfg, &routed, 4, dev, DType::F32)?),
        Box::new(Visor::seeded(cfg, &costliest, 4, dev, DType::F32)?),
        Box::new(Visor::seeded(
            cfg,
            &VisorConfig::packed(cfg, 2.0),
            4,
            dev,
            DType::F32,
        )?),
    ])
}

/// The tiny model's methods, seeded: the dense baseline, GlimpsePrune (an
/// untrained importance map, capped at a quarter), FocusLLaVA (the paper's
/// settings), Gaze Attention (4 context tokens per image, 2 x 2 regions, 4
/// per head).
fn methods(cfg: &ModelConfig, dev: &Device) -> Result<Vec<Box<dyn ImageMethod>>> {
    let (glimpse, gaze) = (glimpse_config(cfg), gaze_config());
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

/// GlimpsePrune's scaled setting (an untrained importance map: capped at a quarter).
fn glimpse_config(cfg: &ModelConfig) -> GlimpseConfig {
    let mut glimpse = GlimpseConfig::for_model(cfg);
    glimpse.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    glimpse
}

/// Gaze Attention on images: 4 context tokens, 2 x 2 regions, 4 per head.
fn gaze_config() -> GazeConfig {
    GazeConfig {
        context_tokens: 4,
        region: RegionShape {
            frames: 1,
            height: 2,
            width: 2,
        },
        k: 4,
    }
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

fn run(args: &ArgMatches) -> Result<()> {
    let dev = device();
    let out = out_dir(args)?;
    let path = args
        .get_one::<PathBuf>("image")
        .or(args.get_one::<PathBuf>("IMAGE"));
    if let Some(dir) = args.get_one::<PathBuf>("model") {
        let prompt = args
            .get_one::<String>("prompt")
            .map_or("Describe the image.", String::as_str);
        return run_folder(dir, path, prompt, &out, &dev);
    }
    let benches = benches(&dev)?;
    let cfg = &benches[0].model.config;
    let visor = &benches[1].model.config.text;
    // Synthetic images, or the image file given (for both rows), of `size` pixels.
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
        "foveal main job on {} ({}): built-in model (ViT {}x{} patches, decoder {} layers, {} query / {} KV heads, head dim {}; VISOR's base 24L: decoder {} layers of width {}, {} / {} heads of dim {}), seeded weights, {} images",
        if dev.is_cuda() { "GPU" } else { "CPU" },
        if dev.is_cuda() { "CUDA" } else { "candle CPU + foveal CPU references" },
        cfg.vision.patches_per_side(),
        cfg.vision.patches_per_side(),
        cfg.text.num_layers,
        cfg.text.num_heads,
        cfg.text.num_kv_heads,
        cfg.text.head_dim,
        visor.num_layers,
        visor.hidden_size,
        visor.num_heads,
        visor.num_kv_heads,
        visor.head_dim,
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
    let mut written = Vec::new();
    for (suffix, input) in &inputs {
        let name = if input.grid == (1, 1) {
            "image"
        } else {
            "grid2x2"
        };
        for bench in &benches {
            for m in bench
                .methods
                .iter()
                .filter(|m| input.grid == (1, 1) || m.takes_grids())
            {
                let label = format!("{}{suffix}", bench.label);
                let report = m.run(&bench.model, input, NEW_TOKENS)?;
                written.extend(write_pictures(
                    &out,
                    name,
                    bench.label,
                    &input.pixels,
                    &report,
                )?);
                reports.push((label, report));
            }
        }
    }
    reports.push((String::new(), gaze_video(&benches[0].model, &dev)?));
    reports.push((String::new(), glance2gaze_video(&benches[0].model, &dev)?));
    print_reports(&reports);
    print_pictures(&out, &written);
    kernel_pipeline().map_err(candle_core::Error::wrap)
}

fn print_pictures(out: &Path, written: &[String]) {
    println!(
        "\nPictures of what each method kept or attended ({} files, panels left to right; dimmed: dropped or little attended; outlined: pooled cells, regions): {}",
        written.len(),
        out.display()
    );
    for line in written {
        println!("{line}");
    }
}

/// The main job on a Hugging Face model folder: the dense model and every
/// method on one image and question.
fn run_folder(
    dir: &Path,
    image: Option<&PathBuf>,
    question: &str,
    out: &Path,
    dev: &Device,
) -> Result<()> {
    let folder = HfFolder::open(dir)?;
    let model = folder.load_model(DType::F32, dev)?;
    let cfg = model.config.clone();
    let size = cfg.vision.image_size;
    let pixels = match image {
        Some(p) => load_image(p, size, dev)?,
        None => synthetic_images(1, size, 2, dev)?.0,
    };
    let encode = |text: &str| -> Result<Vec<u32>> {
        match &folder.tokenizer {
            Some(_) => folder.encode(text),
            None if cfg.text.vocab_size >= 256 => Ok(byte_tokens(text)),
            None => candle_core::bail!(
                "{}: no tokenizer.json, and a vocabulary of {} is too small for byte tokens",
                dir.display(),
                cfg.text.vocab_size
            ),
        }
    };
    let input = ImageQuestions {
        pixels: pixels.clone(),
        grid: (1, 1),
        system: encode("A chat about an image.")?,
        questions: vec![encode(question)?],
    };
    let t = &cfg.text;
    println!(
        "foveal main job on {} ({}): model folder {} (ViT {}x{} patches of {} px, decoder {} layers of width {}, {} query / {} KV heads of dim {}, vocabulary {}; {} safetensors file(s), {}), image {}, question {question:?}",
        if dev.is_cuda() { "GPU" } else { "CPU" },
        if dev.is_cuda() { "CUDA" } else { "candle CPU + foveal CPU references" },
        dir.display(),
        cfg.vision.patches_per_side(),
        cfg.vision.patches_per_side(),
        cfg.vision.patch_size,
        t.num_layers,
        t.hidden_size,
        t.num_heads,
        t.num_kv_heads,
        t.head_dim,
        t.vocab_size,
        folder.shards.len(),
        if folder.tokenizer.is_some() { "tokenizer.json" } else { "no tokenizer.json: byte tokens" },
        image.map_or("synthetic".to_string(), |p| p.display().to_string()),
    );
    let vb = folder.var_builder(DType::F32, dev)?;
    let mut reports = Vec::new();
    let mut written = Vec::new();
    for (m, source) in folder_methods(&cfg, &vb, dev) {
        let report = match m.run(&model, &input, NEW_TOKENS) {
            Ok(r) => r,
            Err(e) => {
                println!("{}: not run on this model: {}", m.name(), first_line(&e));
                continue;
            }
        };
        println!("{}: {source}", m.name());
        if let Some(text) = folder.decode(&report.tokens[0])? {
            println!("  answer: {text:?}");
        }
        written.extend(write_pictures(out, "image", "", &pixels, &report)?);
        reports.push((String::new(), report));
    }
    print_reports(&reports);
    print_pictures(out, &written);
    Ok(())
}

/// An error's message without the backtrace candle adds under RUST_BACKTRACE.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Every method for a loaded model, each with where its learned parts
/// came from: the folder (`vb`) where it has them, else seeded on top of
/// the loaded base model. A method whose settings do not fit the model is
/// left out, saying why.
fn folder_methods(
    cfg: &ModelConfig,
    vb: &VarBuilder<'static>,
    dev: &Device,
) -> Vec<(Box<dyn ImageMethod>, String)> {
    fn load<M: Method + 'static>(
        cfg: &ModelConfig,
        mcfg: Result<M::Config>,
        vb: &VarBuilder<'static>,
        seed: u64,
        dev: &Device,
    ) -> Option<(Box<dyn ImageMethod>, String)> {
        let mcfg = match mcfg {
            Ok(c) => c,
            Err(e) => {
                println!("{}: not run on this model: {}", M::NAME, first_line(&e));
                return None;
            }
        };
        match M::new(vb.clone(), cfg, &mcfg) {
            Ok(m) => {
                let n = m.named_tensors().len();
                let source = if n == 0 {
                    "no learned parts".to_string()
                } else {
                    format!("{n} learned tensor(s) from the folder")
                };
                Some((Box::new(m), source))
            }
            Err(missing) => match M::seeded(cfg, &mcfg, seed, dev, DType::F32) {
                Ok(m) => Some((
                    Box::new(m),
                    format!(
                        "learned parts SEEDED (seed {seed}) on top of the loaded base model: the folder has none ({})",
                        first_line(&missing)
                    ),
                )),
                Err(e) => {
                    println!("{}: not run on this model: {}", M::NAME, first_line(&e));
                    None
                }
            },
        }
    }
    [
        load::<Dense>(cfg, Ok(()), vb, 0, dev),
        load::<GlimpsePrune>(cfg, Ok(glimpse_config(cfg)), vb, 2, dev),
        load::<FocusLlava>(cfg, Ok(FocusConfig::for_model(cfg)), vb, 1, dev),
        load::<GazeAttention>(cfg, Ok(gaze_config()), vb, 3, dev),
        load::<Glance2Gaze>(
            cfg,
            Glance2GazeConfig::for_model(cfg, "LLaVA-1.5-7B 33%"),
            vb,
            5,
            dev,
        ),
        load::<Visor>(cfg, Ok(VisorConfig::for_model(cfg)), vb, 4, dev),
    ]
    .into_iter()
    .flatten()
    .collect()
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
fn print_reports(reports: &[(String, Report)]) {
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
    println!("(sampled: after FocusLLaVA's vision-guided sampler or VISOR-TR's packing; kept: after the pruning / text-guided sampler; Gaze Attention: KV entries a query head attended per decode step and layer, mean, against dense attention's; 24L: VISOR's 24-layer base, where the dense model runs beside VISOR with the router's configuration, VISOR fixed to the costliest configuration, and VISOR-TR; its attention MFLOP are the prefill's per layer type against the dense model's on the same image and question)");
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
