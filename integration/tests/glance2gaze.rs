//! Glance2Gaze in the model: with the feature layer alone and nothing
//! compressed it is the dense model; with real schedules every layer holds
//! `U p_l` visual tokens, the prefill equals Glance2Gaze written here in
//! plain candle ops (no foveal op: the literal fusion formula, the
//! compression as projections, softmax attention and output projection,
//! the layouts and position ids by the test's own account), cached decoding
//! equals a full recompute, and decoding continues where the dense layout
//! ends; the schedules are the paper's, scaled; bad settings are refused;
//! the weights round-trip through safetensors.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use foveal_candle::gaze_compression::{pos_embed_2d, query_cell, query_grid};
use foveal_candle::images::synthetic_images;
use foveal_candle::method::Dense;
use foveal_candle::vision_sampler::encode_grid;
use foveal_candle::{
    attention_mask, paper_schedule, GazeSchedule, Glance2Gaze, Glance2GazeConfig, Glance2GazeInput,
    Glance2GazeRun, ImageMethod, ImageQuestions, KvCache, LlavaModel, Method, ModelConfig, Units,
    PAPER_SCHEDULES,
};

mod common;
use common::glance2gaze::{inputs, video, METHOD_SEED, MODEL_SEED, SCHEDULES, STEPS};
use common::{
    assert_decodes_from, assert_row_alone_as_in_batch, assert_steps_close, assert_token_margins,
    max_abs_diff, replay_steps, system_and_questions,
};

const CPU: Device = Device::Cpu;

struct Setup {
    cfg: ModelConfig,
    model: LlavaModel,
    system: Vec<u32>,
    questions: Vec<Vec<u32>>,
}

fn setup() -> Result<Setup> {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, MODEL_SEED, &CPU, DType::F32)?;
    let (system, questions) = system_and_questions();
    Ok(Setup {
        cfg,
        model,
        system,
        questions,
    })
}

fn method(s: &Setup, cfg: &Glance2GazeConfig) -> Result<Glance2Gaze> {
    Glance2Gaze::seeded(&s.cfg, cfg, METHOD_SEED, &CPU, DType::F32)
}

fn paper(s: &Setup, name: &str) -> Result<Glance2GazeConfig> {
    Glance2GazeConfig::for_model(&s.cfg, name)
}

/// A learned tensor of `g` by name.
fn param(g: &Glance2Gaze, name: &str) -> Tensor {
    g.named_tensors()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no parameter {name}"))
        .1
}

/// `x W^T + b` with the parameters `{prefix}.weight`, `{prefix}.bias`.
fn linear(g: &Glance2Gaze, prefix: &str, x: &Tensor) -> Result<Tensor> {
    let w = param(g, &format!("{prefix}.weight"));
    let b = param(g, &format!("{prefix}.bias"));
    x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)
}

/// Where decoding must continue, by the test's own account: after the
/// system prompt, every unit's tokens and the question.
fn dense_ends(s: &Setup, input: &Glance2GazeInput, questions: &[Vec<u32>]) -> Vec<u32> {
    let visual = input.units.count() * s.model.num_patches();
    questions
        .iter()
        .map(|q| (s.system.len() + visual + q.len()) as u32)
        .collect()
}

/// The test's own place of patch `(y, x)` of unit `u` among a row's dense
/// visual tokens: a grid's sub-images stitched into one raster, frames one
/// after another.
fn dense_offset(units: Units, u: usize, (y, x): (usize, usize), side: usize) -> usize {
    match units {
        Units::Grid(_, cols) => {
            let width = cols * side;
            let (tile_row, tile_col) = (u / cols, u % cols);
            (tile_row * side + y) * width + tile_col * side + x
        }
        Units::Frames(_) => u * side * side + y * side + x,
    }
}

/// The test's own grid of `p` queries over `side x side` patches: the
/// smallest `w` with `w^2 >= p` columns, raster order; query `i`'s patch
/// is the one under its cell's centre.
fn own_cell(i: usize, p: usize, side: usize) -> (usize, usize) {
    let w = (1..=p).find(|w| w * w >= p).unwrap();
    let h = p.div_ceil(w);
    let y = ((2 * (i / w) + 1) * side) / (2 * h);
    let x = ((2 * (i % w) + 1) * side) / (2 * w);
    (y, x)
}

/// The test's own 2D sin-cos embedding of the `p` query cells: `[p, dt]`,
/// x in the first half, y in the second, `[sin, cos]` each.
fn own_pos_embed(p: usize, side: usize, dt: usize) -> Result<Tensor> {
    let w = (1..=p).find(|w| w * w >= p).unwrap();
    let h = p.div_ceil(w);
    let q = dt / 4;
    let mut v = Vec::new();
    for i in 0..p {
        let y = (i / w) as f64 + 0.5;
        let x = (i % w) as f64 + 0.5;
        let coords = [
            x * side as f64 / w as f64 - 0.5,
            y * side as f64 / h as f64 - 0.5,
        ];
        for c in coords {
            for f in [f64::sin, f64::cos] {
                for k in 0..q {
                    v.push(f(c / 10000f64.powf(k as f64 / q as f64)) as f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (p, dt), &CPU)
}

/// One row's instruction as the paper's Glance Fusion reads it: the
/// question, or the system prompt where the image ends the row.
fn instruction<'a>(system: &'a [u32], question: &'a [u32]) -> &'a [u32] {
    if question.is_empty() {
        system
    } else {
        question
    }
}

/// Glance Fusion of one row's units `[U, 3, s, s]` by the literal formula
/// in candle ops: per layer `S x N x M` dot products `Vq_s E_s^T`, their
/// mean over the instruction over `sqrt(dt)`, a softmax over the layers,
/// the weighted sum. `[U, N, dt]`, and the weights `[S, U, N]` (none with
/// one layer).
fn literal_fusion(
    s: &Setup,
    g: &Glance2Gaze,
    gcfg: &Glance2GazeConfig,
    pixels: &Tensor,
    instruction: &[u32],
) -> Result<(Tensor, Option<Tensor>)> {
    let layers = &gcfg.glance_layers;
    let states = s
        .model
        .vision
        .forward_upto(pixels, *layers.last().unwrap())?;
    let feature = s.cfg.feature_layer_index();
    let vq = layers
        .iter()
        .map(|&l| {
            if l == feature {
                return s.model.projector.forward(&states[l]);
            }
            let h = linear(g, &format!("glance.projectors.{l}.linear_1"), &states[l])?;
            let h = s.cfg.projector_act.forward(&h)?;
            linear(g, &format!("glance.projectors.{l}.linear_2"), &h)
        })
        .collect::<Result<Vec<_>>>()?;
    if layers.len() == 1 {
        return Ok((vq[0].clone(), None));
    }
    let dec = &s.model.decoder;
    let emb = dec.embed(&Tensor::from_slice(instruction, instruction.len(), &CPU)?)?;
    let dt = s.cfg.text.hidden_size as f64;
    let scores = layers
        .iter()
        .zip(&vq)
        .map(|(l, v)| {
            let e = linear(g, &format!("glance.instruction.{l}"), &emb)?;
            v.broadcast_matmul(&e.t()?)?.mean(D::Minus1)? / dt.sqrt()
        })
        .collect::<Result<Vec<_>>>()?;
    let w = candle_nn::ops::softmax(&Tensor::stack(&scores, 0)?, 0)?;
    let mut out = vq[0].zeros_like()?;
    for (s_, v) in vq.iter().enumerate() {
        out = (out + v.broadcast_mul(&w.get(s_)?.unsqueeze(D::Minus1)?)?)?;
    }
    Ok((out, Some(w)))
}

/// One Gaze Compression step written out: `units [U, n, dt]` -> `[U, p,
/// dt]` with the pool's first `p` rows plus the test's own PE, the four
/// projections, per-head softmax attention (scale 1/sqrt(D)) and no foveal
/// op; and the softmax's mean over heads and queries, `[U, n]`.
fn literal_compression(
    s: &Setup,
    g: &Glance2Gaze,
    units: &Tensor,
    p: usize,
    side: usize,
) -> Result<(Tensor, Tensor)> {
    let (u, n, dt) = units.dims3()?;
    let (h, d) = (s.cfg.text.num_heads, s.cfg.text.head_dim);
    let pool = param(g, "gaze_compression.query_pool").narrow(0, 0, p)?;
    let q = linear(
        g,
        "gaze_compression.q_proj",
        &(pool + own_pos_embed(p, side, dt)?)?,
    )?;
    let q = q.reshape((p, h, d))?.transpose(0, 1)?.contiguous()?; // [H, p, D]
    let (mut out, mut attended) = (Vec::new(), Vec::new());
    for unit in 0..u {
        let x = units.get(unit)?;
        let heads = |t: Tensor| t.reshape((n, h, d))?.transpose(0, 1)?.contiguous();
        let k = heads(linear(g, "gaze_compression.k_proj", &x)?)?;
        let v = heads(linear(g, "gaze_compression.v_proj", &x)?)?;
        let att = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? / (d as f64).sqrt())?, D::Minus1)?;
        attended.push(att.mean(0)?.mean(0)?);
        let o = att.matmul(&v)?.transpose(0, 1)?.reshape((p, h * d))?;
        out.push(linear(g, "gaze_compression.o_proj", &o)?);
    }
    Ok((Tensor::stack(&out, 0)?, Tensor::stack(&attended, 0)?))
}

/// What the plain-candle Glance2Gaze gives for one row alone.
struct RowReference {
    /// The logits `[S_L, vocab]` of every position of the last layer.
    logits: Tensor,
    /// Its caches (no padding), for replaying decode steps.
    cache: KvCache,
    /// Per layer, the visual tokens of its input.
    visual: Vec<usize>,
    /// The first compression's softmax over the dense visual tokens (in
    /// the dense order), mean over heads and queries (empty without one).
    attention: Vec<f32>,
    /// Per fused layer, its fusion weight per dense visual token.
    glance_weights: Vec<Vec<f32>>,
}

/// Glance2Gaze on row `row` of `input` alone, in plain candle ops: the
/// literal fusion, the dense sequence `[system][visual][question]` in the
/// dense order (the test's offsets), the dense layers, then before each
/// compressed layer the literal compression of every unit, the compressed
/// tokens ordered and positioned by the patches under their cells,
/// between the same text hidden states.
fn reference_row(
    s: &Setup,
    g: &Glance2Gaze,
    gcfg: &Glance2GazeConfig,
    input: &Glance2GazeInput,
    questions: &[Vec<u32>],
    row: usize,
) -> Result<RowReference> {
    let dec = &s.model.decoder;
    let side = s.cfg.vision.patches_per_side();
    let n = side * side;
    let units = input.units;
    let u = units.count();
    let layers = s.cfg.text.num_layers;
    let question = &questions[row];
    let pixels = input.pixels.narrow(0, row * u, u)?;
    let (fused, weights) = literal_fusion(s, g, gcfg, &pixels, instruction(&s.system, question))?;

    // Each visual token as (offset, unit, index in its unit), in layout order.
    let layout = |p: usize, cell: &dyn Fn(usize) -> (usize, usize)| {
        let mut v: Vec<(usize, usize, usize)> = (0..u)
            .flat_map(|unit| (0..p).map(move |i| (unit, i)))
            .map(|(unit, i)| (dense_offset(units, unit, cell(i), side), unit, i))
            .collect();
        v.sort();
        v
    };
    let text = |ids: &[u32]| dec.embed(&Tensor::from_slice(ids, ids.len(), &CPU)?);
    let mut tokens = layout(n, &|i| (i / side, i % side));
    // Per-unit values `[U, n]` in the dense order.
    let dense = |t: &Tensor, tokens: &[(usize, usize, usize)]| -> Result<Vec<f32>> {
        let t = t.to_vec2::<f32>()?;
        Ok(tokens.iter().map(|&(_, unit, i)| t[unit][i]).collect())
    };
    let glance_weights = match &weights {
        Some(w) => (0..w.dim(0)?)
            .map(|l| dense(&w.get(l)?, &tokens))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let mut attention = Vec::new();
    let visual_rows = tokens
        .iter()
        .map(|&(_, unit, i)| fused.get(unit)?.get(i))
        .collect::<Result<Vec<_>>>()?;
    let (sys, q_len) = (s.system.len(), question.len());
    let mut pieces = vec![Tensor::stack(&visual_rows, 0)?];
    if sys > 0 {
        pieces.insert(0, text(&s.system)?);
    }
    if q_len > 0 {
        pieces.push(text(question)?);
    }
    let seq = Tensor::cat(&pieces, 0)?.unsqueeze(0)?;
    let positions = |visual: &[(usize, usize, usize)]| -> Result<Tensor> {
        let ids: Vec<u32> = (0..sys as u32)
            .chain(visual.iter().map(|&(o, _, _)| (sys + o) as u32))
            .chain((0..q_len).map(|j| (sys + u * n + j) as u32))
            .collect();
        let len = ids.len();
        Tensor::from_vec(ids, (1, len), &CPU)
    };
    let first = gcfg.schedule.r - 1;
    let mut cache = dec.new_cache();
    let mut h = dec.forward_layers(&seq, &positions(&tokens)?, None, 0..first, &mut cache)?;
    let mut visual = vec![u * n; first.min(layers)];
    for (i, &p) in gcfg.schedule.tokens.iter().enumerate() {
        let l = first + i;
        let count = tokens.len();
        let vis = h.get(0)?.narrow(0, sys, count)?;
        // The units' tokens, each unit's in its own order.
        let mut grouped = vec![Vec::new(); u];
        let mut in_layout: Vec<(usize, usize, usize)> = tokens
            .iter()
            .enumerate()
            .map(|(j, &(_, unit, i))| (unit, i, j))
            .collect();
        in_layout.sort();
        for (unit, _, j) in in_layout {
            grouped[unit].push(vis.get(j)?);
        }
        let grouped = grouped
            .iter()
            .map(|t| Tensor::stack(t, 0))
            .collect::<Result<Vec<_>>>()?;
        let (squeezed, attended) =
            literal_compression(s, g, &Tensor::stack(&grouped, 0)?, p, side)?;
        if i == 0 {
            attention = dense(&attended, &tokens)?;
        }
        tokens = layout(p, &|i| own_cell(i, p, side));
        let compressed = tokens
            .iter()
            .map(|&(_, unit, i)| squeezed.get(unit)?.get(i))
            .collect::<Result<Vec<_>>>()?;
        let hs = h.get(0)?;
        let mut pieces = vec![Tensor::stack(&compressed, 0)?];
        if sys > 0 {
            pieces.insert(0, hs.narrow(0, 0, sys)?);
        }
        if q_len > 0 {
            pieces.push(hs.narrow(0, sys + count, q_len)?);
        }
        let seq = Tensor::cat(&pieces, 0)?.unsqueeze(0)?;
        h = dec.forward_layers(&seq, &positions(&tokens)?, None, l..l + 1, &mut cache)?;
        visual.push(u * p);
    }
    Ok(RowReference {
        logits: dec.logits(&h)?.squeeze(0)?,
        cache,
        visual,
        attention,
        glance_weights,
    })
}

/// Every step's logits of the reference of row `row`: the prefill's last
/// position, then the generated tokens replayed at `next, next + 1, ...`
/// over the reference's own caches (one range per compressed layer).
fn reference_steps(
    s: &Setup,
    gcfg: &Glance2GazeConfig,
    mut reference: RowReference,
    tokens: &[u32],
    next: u32,
) -> Result<Vec<Tensor>> {
    let dec = &s.model.decoder;
    let last = reference.logits.dim(0)? - 1;
    let mut steps = vec![reference.logits.narrow(0, last, 1)?];
    let splits: Vec<usize> = (gcfg.schedule.r - 1..s.cfg.text.num_layers).collect();
    steps.extend(replay_steps(
        dec,
        &[tokens.to_vec()],
        &[next],
        &mut reference.cache,
        &splits,
        |_, kv_len| attention_mask(&[0], 1, kv_len, &CPU),
    )?);
    Ok(steps)
}

/// Row `b` of each step's logits `[B, vocab]`.
fn row_steps(logits: &[Tensor], b: usize) -> Result<Vec<Tensor>> {
    logits.iter().map(|l| l.narrow(0, b, 1)).collect()
}

/// Checks a run against the plain-candle reference of every row: the
/// visual tokens of every layer, every position's logits of the prefill's
/// last layer, the KV entries, and every decode step at the dense end.
fn check_against_reference(
    s: &Setup,
    g: &Glance2Gaze,
    gcfg: &Glance2GazeConfig,
    input: &Glance2GazeInput,
    run: &Glance2GazeRun,
    what: &str,
) -> Result<()> {
    let prefilled = {
        let visual = g.fuse(&s.model, input)?;
        g.prefill(
            &s.model,
            &visual,
            input.units,
            &input.system,
            &input.questions,
        )?
    };
    let next = dense_ends(s, input, &input.questions);
    assert_decodes_from(&run.generation, &next, what);
    let u = input.units.count();
    // The schedule, by the test's own account: every unit's tokens before
    // layer r, P after.
    let first = gcfg.schedule.r - 1;
    let want: Vec<usize> = (0..s.cfg.text.num_layers)
        .map(|l| match l < first {
            true => u * s.model.num_patches(),
            false => u * gcfg.schedule.tokens[l - first],
        })
        .collect();
    for (b, &next_b) in next.iter().enumerate() {
        let reference = reference_row(s, g, gcfg, input, &input.questions, b)?;
        assert_eq!(
            reference.visual, want,
            "{what}, row {b}: the reference's own count"
        );
        assert_eq!(
            run.visual_per_layer[b], want,
            "{what}, row {b}: visual tokens per layer"
        );
        // The caches: each layer's valid entries are its layout's, and
        // layers of another size hold another number of entries.
        let mut kv = 0;
        for (l, &want_l) in want.iter().enumerate() {
            let layout = prefilled.layout(l);
            let valid = prefilled.cache.seq_len(l) - layout.starts[b];
            assert_eq!(
                valid,
                reference.cache.seq_len(l),
                "{what}, row {b}, layer {l}: cached entries"
            );
            assert_eq!(layout.visual[b].len(), want_l, "{what}, row {b}, layer {l}");
            kv += valid;
        }
        assert_eq!(run.kv_entries[b], kv, "{what}, row {b}: KV entries");
        let last = prefilled.layout(s.cfg.text.num_layers - 1);
        let got = s
            .model
            .decoder
            .logits(
                &prefilled
                    .hidden
                    .get(b)?
                    .narrow(0, last.starts[b], last.seq() - last.starts[b])?
                    .unsqueeze(0)?,
            )?
            .squeeze(0)?;
        let d = max_abs_diff(&got, &reference.logits)?;
        assert!(d < 1e-4, "{what}, row {b}: prefill logits differ by {d}");
        let steps = reference_steps(s, gcfg, reference, &run.generation.tokens[b], next_b)?;
        assert_steps_close(
            &row_steps(&run.generation.logits, b)?,
            &steps,
            1e-4,
            &format!("{what}, row {b}"),
        )?;
    }
    Ok(())
}

#[test]
fn the_feature_layer_alone_without_compression_is_the_dense_model() -> Result<()> {
    let s = setup()?;
    let gcfg = Glance2GazeConfig::dense(&s.cfg);
    assert_eq!(gcfg.glance_layers, [3], "LLaVA's penultimate layer of 4");
    let g = method(&s, &gcfg)?;
    assert!(
        g.named_tensors().is_empty(),
        "nothing to learn: LLaVA's projector, no pool"
    );
    for grid in [1, 2] {
        let pixels = synthetic_images(2, grid * s.cfg.vision.image_size, 3, &CPU)?.0;
        let input = ImageQuestions {
            pixels: pixels.clone(),
            grid: (grid, grid),
            system: s.system.clone(),
            questions: s.questions.clone(),
        };
        let run = g.generate(&s.model, &Glance2GazeInput::from_images(&input, 64)?, STEPS)?;
        let (map, _) = encode_grid(&s.model, &pixels, (grid, grid))?;
        let (b, h, w, c) = map.dims4()?;
        let prompt = s.model.build_prompt_from_embeds(
            &map.reshape((b, h * w, c))?,
            &s.system,
            &s.questions,
        )?;
        let dense = s.model.generate_dense(&prompt, STEPS)?;
        assert_eq!(run.generation.tokens, dense.tokens, "grid {grid}");
        assert_eq!(run.generation.positions, dense.positions, "grid {grid}");
        assert_steps_close(
            &run.generation.logits,
            &dense.logits,
            1e-4,
            &format!("grid {grid}"),
        )?;
        assert_eq!(run.visual_per_layer, vec![vec![h * w; 6]; 2]);
        let report = Dense.run(&s.model, &input, STEPS)?;
        assert_eq!(run.kv_entries, report.kv_entries, "grid {grid}");
        assert!(run
            .flops
            .iter()
            .all(|f| f.total() == f.dense && f.compression == 0.0));
    }
    Ok(())
}

/// The paper's schedules scaled to the tiny model: the images, the 2 x 2
/// grid and the video of the GPU test, at r = 2 (33%) and r = 1 (11%):
/// every layer's visual tokens are the schedule's, the prefill and every
/// decode step equal Glance2Gaze in plain candle ops, and every greedy
/// token wins by more than the devices' rounding (the GPU test compares
/// tokens exactly).
#[test]
fn real_schedules_equal_glance2gaze_in_plain_candle() -> Result<()> {
    let s = setup()?;
    for name in SCHEDULES {
        let gcfg = paper(&s, name)?;
        let g = method(&s, &gcfg)?;
        for (what, input) in inputs(&s.cfg, &CPU)? {
            let what = format!("{name}, {what}");
            let run = g.generate(&s.model, &input, STEPS)?;
            assert_token_margins(&run.generation.logits, &what)?;
            check_against_reference(&s, &g, &gcfg, &input, &run, &what)?;
            let u = input.units.count();
            assert!(
                run.flops.iter().all(|f| f.total() < f.dense),
                "{what}: cheaper than dense"
            );
            assert_eq!(run.visual, vec![u * 64; 2]);
        }
    }
    Ok(())
}

/// What the pictures show: the first compression's attention over the
/// dense visual tokens (from the op's lse and q . k) and Glance Fusion's
/// layer weights (the op's) equal the plain-candle softmaxes, each unit's
/// attention and each token's weights sum to 1, and recording changes
/// nothing the run decides.
#[test]
fn the_recorded_attention_and_fusion_weights_equal_plain_candle() -> Result<()> {
    let s = setup()?;
    let gcfg = paper(&s, SCHEDULES[0])?;
    let g = method(&s, &gcfg)?;
    let fused = gcfg.glance_layers.len();
    for (what, input) in inputs(&s.cfg, &CPU)? {
        let plain = g.generate(&s.model, &input, 2)?;
        let run = g.generate_recording(&s.model, &input, 2)?;
        assert!(
            plain.attention.iter().all(Vec::is_empty)
                && plain.glance_weights.iter().all(Vec::is_empty)
        );
        assert_eq!(run.generation.tokens, plain.generation.tokens, "{what}");
        let u = input.units.count();
        for b in 0..2 {
            let want = reference_row(&s, &g, &gcfg, &input, &input.questions, b)?;
            let got = &run.attention[b];
            assert_eq!(got.len(), u * 64, "{what}: row {b}");
            let d = got
                .iter()
                .zip(&want.attention)
                .map(|(a, w)| (a - w).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{what}: row {b}: attention differs by {d}");
            let total: f32 = got.iter().sum();
            assert!(
                (total - u as f32).abs() < 1e-4,
                "{what}: row {b}: {total} over {u} units"
            );
            let w = &run.glance_weights[b];
            assert_eq!(w.len(), fused);
            for (l, (gw, ww)) in w.iter().zip(&want.glance_weights).enumerate() {
                let d = gw
                    .iter()
                    .zip(ww)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-5,
                    "{what}: row {b}, fused layer {l}: weights differ by {d}"
                );
            }
            for t in 0..u * 64 {
                let sum: f32 = w.iter().map(|l| l[t]).sum();
                assert!(
                    (sum - 1.0).abs() < 1e-5,
                    "{what}: row {b}, token {t}: {sum}"
                );
            }
        }
        let side = s.cfg.vision.patches_per_side();
        let grid = match input.units {
            Units::Grid(r, c) => Some((r * side, c * side)),
            Units::Frames(_) => None,
        };
        assert_eq!(run.grid, grid, "{what}");
    }
    Ok(())
}

/// Decoding from the caches equals recomputing the whole prefill with the
/// generated tokens appended after the question (the fused visual tokens
/// kept: the instruction is the question).
#[test]
fn cached_decoding_equals_a_full_recompute() -> Result<()> {
    let s = setup()?;
    let gcfg = paper(&s, SCHEDULES[0])?;
    let g = method(&s, &gcfg)?;
    for (what, input) in inputs(&s.cfg, &CPU)? {
        let run = g.generate(&s.model, &input, STEPS)?;
        let visual = g.fuse(&s.model, &input)?;
        let extended: Vec<Vec<u32>> = input
            .questions
            .iter()
            .zip(&run.generation.tokens)
            .map(|(q, t)| q.iter().chain(&t[..STEPS - 1]).copied().collect())
            .collect();
        let full = g.prefill(&s.model, &visual, input.units, &input.system, &extended)?;
        let logits = s.model.decoder.logits(&full.hidden)?;
        let seq = logits.dim(1)?;
        for (step, got) in run.generation.logits.iter().enumerate() {
            let want = logits.narrow(1, seq - STEPS + step, 1)?.squeeze(1)?;
            let d = max_abs_diff(got, &want)?;
            assert!(
                d < 1e-4,
                "{what}, step {step}: cached and recomputed logits differ by {d}"
            );
        }
    }
    Ok(())
}

#[test]
fn glance_fusion_in_the_model_equals_the_literal_formula() -> Result<()> {
    let s = setup()?;
    let gcfg = paper(&s, SCHEDULES[0])?;
    assert_eq!(
        gcfg.glance_layers,
        [1, 2, 3],
        "the paper's {{7, 13, 19, 23}} of 24, scaled"
    );
    let g = method(&s, &gcfg)?;
    let side = s.cfg.vision.patches_per_side();
    for (what, input) in inputs(&s.cfg, &CPU)? {
        let fused = g.fuse(&s.model, &input)?;
        let u = input.units.count();
        for b in 0..input.batch() {
            let pixels = input.pixels.narrow(0, b * u, u)?;
            let (want, _) = literal_fusion(&s, &g, &gcfg, &pixels, &input.questions[b])?;
            for unit in 0..u {
                let idx: Vec<u32> = (0..side * side)
                    .map(|i| dense_offset(input.units, unit, (i / side, i % side), side) as u32)
                    .collect();
                let got = fused.get(b)?.index_select(&Tensor::new(idx, &CPU)?, 0)?;
                let d = max_abs_diff(&got, &want.get(unit)?)?;
                assert!(
                    d < 1e-4,
                    "{what}, row {b}, unit {unit}: fused tokens differ by {d}"
                );
            }
        }
    }
    // The layers really are weighed: the fusion is none of them alone.
    let input = &inputs(&s.cfg, &CPU)?[0].1;
    let vq = g.glance().project(&s.model, &input.pixels)?;
    let fused = g.fuse(&s.model, input)?;
    for l in 0..3 {
        let d = max_abs_diff(&fused, &vq.get(l)?.reshape(fused.shape())?)?;
        assert!(d > 1e-2, "the fusion equals layer {l}");
    }
    Ok(())
}

/// One compression step equals projections, per-head softmax attention
/// and the output projection written in candle ops, on random tokens, for
/// square and ragged query grids.
#[test]
fn a_compression_step_equals_candle_ops_on_random_inputs() -> Result<()> {
    let s = setup()?;
    let g = method(&s, &paper(&s, SCHEDULES[0])?)?;
    let gc = g.compression().expect("a compressing schedule");
    assert_eq!(gc.pool_size(), 28, "p_r = 256 of 576 scaled to 64 tokens");
    let units = Tensor::randn(0f32, 1.0, (3, 25, 256), &CPU)?;
    for p in [1, 7, 16, 25] {
        let got = gc.forward(&units, p, 5)?;
        let (want, _) = literal_compression(&s, &g, &units, p, 5)?;
        assert_eq!(got.dims(), [3, p, 256]);
        let d = max_abs_diff(&got, &want)?;
        assert!(d < 1e-4, "p = {p}: the step differs by {d}");
    }
    assert!(
        gc.forward(&units.narrow(1, 0, 6)?, 7, 5).is_err(),
        "more tokens out than in"
    );
    assert!(
        gc.forward(&Tensor::randn(0f32, 1.0, (1, 40, 256), &CPU)?, 29, 7)
            .is_err(),
        "past the pool"
    );
    Ok(())
}

/// The query grid and PE2D: with `side^2` queries the cells are the
/// patches and PE2D is the sin-cos embedding of the integer grid (x first);
/// fewer queries spread over the unit, each on a distinct patch, ascending.
#[test]
fn the_query_grid_covers_the_unit() -> Result<()> {
    assert_eq!(query_grid(28), (5, 6));
    assert_eq!(query_grid(25), (5, 5));
    assert_eq!(query_grid(10), (3, 4));
    for (p, side) in [(64, 8), (28, 8), (10, 8), (7, 5), (1, 8), (2, 8)] {
        let mut last = None;
        for i in 0..p {
            let (_, cell) = query_cell(i, p, side);
            assert_eq!(cell, own_cell(i, p, side), "p {p}, query {i}");
            let at = cell.0 * side + cell.1;
            assert!(last.is_none_or(|l| at > l), "p {p}: cells ascend");
            last = Some(at);
        }
        let d = max_abs_diff(
            &pos_embed_2d(p, side, 256, &CPU)?,
            &own_pos_embed(p, side, 256)?,
        )?;
        assert!(d < 1e-6, "p {p}: PE2D differs by {d}");
    }
    // p = side^2: the integer patch grid.
    let pe = pos_embed_2d(64, 8, 8, &CPU)?.to_vec2::<f32>()?;
    let (x, y) = (5.0f64, 2.0f64);
    let want = [
        x.sin(),
        (x / 100.0).sin(),
        x.cos(),
        (x / 100.0).cos(),
        y.sin(),
        (y / 100.0).sin(),
        y.cos(),
        (y / 100.0).cos(),
    ];
    for (a, b) in pe[2 * 8 + 5].iter().zip(want) {
        assert!((f64::from(*a) - b).abs() < 1e-6);
    }
    assert_eq!(
        query_cell(0, 1, 8).1,
        (4, 4),
        "one query sits at the centre"
    );
    Ok(())
}

/// Sub-images and video frames are fused and compressed one by one: the
/// 2 x 2 grid's fused tokens are each sub-image's alone; every layer holds
/// `U p_l` visual tokens; the 4-frame video runs at the video setting.
#[test]
fn sub_images_and_video_frames_run_unit_by_unit() -> Result<()> {
    let s = setup()?;
    let gcfg = paper(&s, SCHEDULES[0])?;
    let g = method(&s, &gcfg)?;
    let inputs = inputs(&s.cfg, &CPU)?;
    let grid = &inputs[1].1;
    let fused = g.fuse(&s.model, grid)?;
    let side = s.cfg.vision.patches_per_side();
    for unit in 0..4 {
        let alone = Glance2GazeInput {
            pixels: Tensor::stack(&[grid.pixels.get(unit)?, grid.pixels.get(4 + unit)?], 0)?,
            units: Units::Grid(1, 1),
            system: grid.system.clone(),
            questions: grid.questions.clone(),
        };
        let want = g.fuse(&s.model, &alone)?;
        let idx: Vec<u32> = (0..side * side)
            .map(|i| dense_offset(grid.units, unit, (i / side, i % side), side) as u32)
            .collect();
        let got = fused.index_select(&Tensor::new(idx, &CPU)?, 1)?;
        assert_eq!(max_abs_diff(&got, &want)?, 0.0, "sub-image {unit}");
    }

    let vcfg = paper(&s, "Video-LLaVA 6%")?;
    assert_eq!(
        vcfg.schedule,
        GazeSchedule::new(1, vec![3, 3, 3, 2, 2, 2]),
        "r = 3, p_r = 10 of 256, scaled"
    );
    let g = method(&s, &vcfg)?;
    let clip = video(&s.cfg, 4, &s.system, &s.questions, &CPU)?;
    let run = g.generate(&s.model, &clip, STEPS)?;
    assert_eq!(run.visual, [256, 256]);
    assert_eq!(run.visual_per_layer[0], [12, 12, 12, 8, 8, 8]);
    assert_decodes_from(
        &run.generation,
        &dense_ends(&s, &clip, &s.questions),
        "video",
    );
    check_against_reference(&s, &g, &vcfg, &clip, &run, "4-frame video")
}

/// The two rules after a reduction: with the image last in a row, beside
/// a row with text after it, with no compression, the 33% and the 11%
/// schedule (and the 2 x 2 grid and the video at the strongest, r = 1),
/// decoding starts at the dense layout's end and every step equals the
/// plain-candle reference decoding there.
#[test]
fn decoding_continues_at_the_end_of_the_dense_layout() -> Result<()> {
    let s = setup()?;
    let mut settings = vec![Glance2GazeConfig {
        schedule: GazeSchedule::none(6),
        ..paper(&s, SCHEDULES[0])?
    }];
    for name in SCHEDULES {
        settings.push(paper(&s, name)?);
    }
    for questions in [vec![vec![], vec![]], vec![vec![], s.questions[1].clone()]] {
        for gcfg in &settings {
            let g = method(&s, gcfg)?;
            let strongest = gcfg.schedule.r == 1;
            for (what, mut input) in inputs(&s.cfg, &CPU)?
                .into_iter()
                .filter(|(_, i)| strongest || i.units == Units::Grid(1, 1))
            {
                input.questions = questions.clone();
                let what = format!(
                    "{what}, r = {}, question lengths {:?}",
                    gcfg.schedule.r,
                    questions.iter().map(Vec::len).collect::<Vec<_>>()
                );
                let run = g.generate(&s.model, &input, STEPS)?;
                check_against_reference(&s, &g, gcfg, &input, &run, &what)?;
            }
        }
    }
    Ok(())
}

/// No row is left with nothing to attend: a schedule keeps at least one
/// token per unit (p = 0 is refused with the schedules); a row that is
/// only its image has no instruction, which fusing several layers needs
/// (refused, naming the row, alone and in a batch), while the feature
/// layer alone decodes it the same alone and in a batch.
#[test]
fn a_row_that_is_only_its_image() -> Result<()> {
    let s = setup()?;
    let pixels = synthetic_images(2, 64, 3, &CPU)?.0;
    let input = |rows: usize, questions: Vec<Vec<u32>>| Glance2GazeInput {
        pixels: pixels.narrow(0, 0, rows).unwrap(),
        units: Units::Grid(1, 1),
        system: vec![],
        questions,
    };
    let fused = method(&s, &paper(&s, SCHEDULES[1])?)?;
    for (rows, questions) in [(1, vec![vec![]]), (2, vec![s.questions[0].clone(), vec![]])] {
        let err = fused
            .generate(&s.model, &input(rows, questions), STEPS)
            .unwrap_err()
            .to_string();
        let row = rows - 1;
        assert!(err.contains(&format!("row {row} has no text")), "{err}");
    }
    let one = Glance2GazeConfig {
        glance_layers: vec![3],
        ..paper(&s, SCHEDULES[1])?
    };
    let g = method(&s, &one)?;
    let alone = g.generate(&s.model, &input(1, vec![vec![]]), STEPS)?;
    let batch = g.generate(
        &s.model,
        &input(2, vec![vec![], s.questions[1].clone()]),
        STEPS,
    )?;
    assert_eq!(alone.visual_per_layer[0], [11, 8, 6, 4, 3, 2]);
    assert_eq!(alone.generation.positions[0][0], 64);
    assert_row_alone_as_in_batch(&alone.generation, &batch.generation)
}

#[test]
fn the_paper_schedules_load_by_name_and_scale() -> Result<()> {
    let s = setup()?;
    let t7 = paper_schedule("llava-1.5-7b 33%")?.schedule();
    assert_eq!(
        (t7.r, t7.tokens.len(), t7.tokens[0], t7.tokens[23]),
        (9, 24, 256, 2)
    );
    let t8 = paper_schedule("LLaVA-NeXT-7B 5%")?.schedule();
    assert_eq!((t8.r, t8.tokens.len(), t8.tokens[0]), (2, 31, 25));
    let v = paper_schedule("Video-LLaVA 6%")?.schedule();
    assert_eq!(
        (v.r, v.tokens.len(), v.tokens[0], v.tokens[29]),
        (3, 30, 10, 2)
    );
    assert!(v.tokens.windows(2).all(|w| w[1] <= w[0]));
    let err = paper_schedule("LLaVA-1.5-7B 50%").unwrap_err().to_string();
    assert!(err.contains("LLaVA-NeXT-7B 5%"), "{err}");

    // Each paper schedule as given fits its 32-layer model (576 tokens per
    // image, 256 per frame), and its share of the dense visual
    // token-layers is the FLOPs it is named by.
    for p in PAPER_SCHEDULES {
        let sch = p.schedule();
        sch.check(32, p.unit_tokens)?;
        assert!(
            sch.check(6, 64).is_err(),
            "{}: not for the tiny model",
            p.name
        );
        let share = ((sch.r - 1) * p.unit_tokens + sch.tokens.iter().sum::<usize>()) as f64
            / (32 * p.unit_tokens) as f64;
        let named: f64 = p
            .name
            .rsplit(' ')
            .next()
            .unwrap()
            .trim_end_matches('%')
            .parse()
            .unwrap();
        if p.unit_tokens == 576 {
            assert!((100.0 * share - named).abs() < 1.5, "{}: {share}", p.name);
        }
        // A 32-layer model with LLaVA-1.5's 24 x 24 patches takes them.
        let mut big = ModelConfig::tiny();
        big.text.num_layers = 32;
        big.text.hidden_size = 64;
        big.text.num_heads = 4;
        big.text.num_kv_heads = 2;
        big.text.head_dim = 16;
        big.vision.image_size = if p.unit_tokens == 576 { 192 } else { 128 };
        let cfg = Glance2GazeConfig {
            glance_layers: Glance2GazeConfig::glance_layers_for(&big),
            schedule: sch,
            label: p.label,
        };
        Glance2Gaze::seeded(&big, &cfg, 1, &CPU, DType::F32)?;
    }

    // Scaled to the tiny model: the same shape, and about the named share.
    let shares = [
        ("LLaVA-1.5-7B 33%", 2, vec![28, 14, 7, 4, 2], 0.31),
        ("LLaVA-1.5-7B 22%", 2, vec![13, 8, 5, 3, 2], 0.25),
        ("LLaVA-1.5-7B 11%", 1, vec![11, 8, 6, 4, 3, 2], 0.09),
    ];
    for (name, r, tokens, share) in shares {
        let c = paper(&s, name)?;
        assert_eq!(c.schedule, GazeSchedule::new(r, tokens.clone()), "{name}");
        let got = ((r - 1) * 64 + tokens.iter().sum::<usize>()) as f64 / (6 * 64) as f64;
        assert!((got - share).abs() < 0.005, "{name}: {got}");
    }
    Ok(())
}

#[test]
fn bad_schedules_and_settings_are_refused() -> Result<()> {
    let s = setup()?;
    let base = paper(&s, SCHEDULES[0])?;
    let refused = |schedule: GazeSchedule, why: &str| {
        let cfg = Glance2GazeConfig {
            schedule,
            ..base.clone()
        };
        let err = method(&s, &cfg).expect_err(why).to_string();
        assert!(err.contains("GazeSchedule"), "{why}: {err}");
        err
    };
    let err = refused(GazeSchedule::new(2, vec![28, 14, 20, 4, 2]), "P grows");
    assert!(err.contains("grows from p_3 = 14 to p_4 = 20"), "{err}");
    let err = refused(GazeSchedule::new(2, vec![28, 14, 7, 4]), "one layer short");
    assert!(err.contains("need 5"), "{err}");
    refused(
        GazeSchedule::new(2, vec![28, 14, 7, 4, 2, 1]),
        "one layer too many",
    );
    let err = refused(
        GazeSchedule::new(2, vec![28, 14, 7, 4, 0]),
        "a unit emptied",
    );
    assert!(err.contains("at least 1"), "{err}");
    let err = refused(
        GazeSchedule::new(2, vec![65, 14, 7, 4, 2]),
        "more than the image's tokens",
    );
    assert!(err.contains("exceeds the 64"), "{err}");
    refused(GazeSchedule::new(0, vec![28, 14, 7, 4, 2, 1, 1]), "r = 0");
    refused(GazeSchedule::new(8, vec![]), "r past L + 1");
    refused(
        paper_schedule("LLaVA-1.5-7B 33%")?.schedule(),
        "a 32-layer schedule on 6 layers",
    );
    // Any (r, P) that fits is accepted, r = L + 1 (nothing) and r = L too.
    for schedule in [
        GazeSchedule::none(6),
        GazeSchedule::new(6, vec![1]),
        GazeSchedule::new(1, vec![64, 64, 9, 9, 9, 1]),
    ] {
        method(
            &s,
            &Glance2GazeConfig {
                schedule,
                ..base.clone()
            },
        )?;
    }
    for layers in [vec![], vec![2, 1], vec![1, 1], vec![3, 5]] {
        let cfg = Glance2GazeConfig {
            glance_layers: layers.clone(),
            ..base.clone()
        };
        assert!(method(&s, &cfg).is_err(), "glance layers {layers:?}");
    }
    let g = method(&s, &base)?;
    let grid = &inputs(&s.cfg, &CPU)?[1].1;
    let wrong = Glance2GazeInput {
        units: Units::Grid(1, 1),
        ..grid.clone()
    };
    assert!(
        g.generate(&s.model, &wrong, 1).is_err(),
        "8 images for 2 rows of one"
    );
    Ok(())
}

#[test]
fn weights_round_trip_through_safetensors() -> Result<()> {
    let s = setup()?;
    let gcfg = paper(&s, SCHEDULES[0])?;
    let g = method(&s, &gcfg)?;
    let names: Vec<String> = g.named_tensors().into_iter().map(|(n, _)| n).collect();
    let mut want: Vec<String> = Vec::new();
    for l in [1, 2] {
        for p in ["linear_1", "linear_2"] {
            for t in ["weight", "bias"] {
                want.push(format!("glance.projectors.{l}.{p}.{t}"));
            }
        }
    }
    for l in [1, 2, 3] {
        for t in ["weight", "bias"] {
            want.push(format!("glance.instruction.{l}.{t}"));
        }
    }
    want.push("gaze_compression.query_pool".into());
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        for t in ["weight", "bias"] {
            want.push(format!("gaze_compression.{p}.{t}"));
        }
    }
    assert_eq!(names, want);
    assert_eq!(param(&g, "gaze_compression.query_pool").dims(), [28, 256]);
    let path = std::env::temp_dir().join(format!("foveal-g2g-{}.safetensors", std::process::id()));
    g.save_safetensors(&path)?;
    let loaded = Glance2Gaze::load_safetensors(&path, &s.cfg, &gcfg, &CPU, DType::F32)?;
    std::fs::remove_file(&path).ok();
    for ((n, a), (m, b)) in g.named_tensors().iter().zip(loaded.named_tensors().iter()) {
        assert_eq!(n, m);
        assert_eq!(max_abs_diff(a, b)?, 0.0, "{n}");
    }
    let input = &inputs(&s.cfg, &CPU)?[0].1;
    let a = g.generate(&s.model, input, STEPS)?;
    let b = loaded.generate(&s.model, input, STEPS)?;
    assert_steps_close(&a.generation.logits, &b.generation.logits, 1e-7, "loaded")?;
    let other = Glance2Gaze::seeded(&s.cfg, &gcfg, METHOD_SEED + 1, &CPU, DType::F32)?
        .generate(&s.model, input, STEPS)?;
    let d = max_abs_diff(&a.generation.logits[0], &other.generation.logits[0])?;
    assert!(
        d > 1e-3,
        "another seed must differ (the round trip would otherwise prove nothing)"
    );
    Ok(())
}

/// The method in the main job's list: a report in the shared terms.
#[test]
fn the_report_counts_layers_entries_and_flops() -> Result<()> {
    let s = setup()?;
    let g = method(&s, &paper(&s, SCHEDULES[0])?)?;
    let input = ImageQuestions {
        pixels: synthetic_images(2, 64, 3, &CPU)?.0,
        grid: (1, 1),
        system: s.system.clone(),
        questions: s.questions.clone(),
    };
    let report = g.run(&s.model, &input, STEPS)?;
    assert_eq!(report.method, "G2G 33%");
    assert_eq!(report.visual, [64, 64]);
    assert_eq!(report.kept, [2, 2], "the last layer's tokens");
    let (sys, q) = (s.system.len(), s.questions[0].len());
    let dense = sys + 64 + q;
    let kv: usize = dense + [28, 14, 7, 4, 2].iter().map(|p| sys + p + q).sum::<usize>();
    assert_eq!(report.kv_entries[0], kv);
    // Attention FLOPs by hand: 4 Hq D = 1,024 per query-key pair, causal.
    let causal = |n: usize| (n * (n + 1) / 2) as f64;
    let att = 1024.0
        * (causal(dense)
            + [28, 14, 7, 4, 2]
                .iter()
                .map(|p| causal(sys + p + q))
                .sum::<f64>());
    let comp = 1024.0 * (28 * 64 + 14 * 28 + 7 * 14 + 4 * 7 + 2 * 4) as f64;
    let want = format!(
        "attention MFLOP {:.2} + compression {:.2}",
        att / 1e6,
        comp / 1e6
    );
    assert!(
        report.detail[0].contains(&want),
        "{} vs {want}",
        report.detail[0]
    );
    assert!(report.detail[0].contains("visual tokens per layer [64, 28, 14, 7, 4, 2]"));
    Ok(())
}
