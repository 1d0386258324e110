//! FocusLLaVA in the model: with every window at the 1 x 1 scale and gamma = 1
//! it is the dense model; with real selection, the vision-guided sampler's
//! tokens are the max-pooled cells of the scales the selector chose, the
//! text-guided sampler keeps what the paper's Eqs. 7-9 say, and decoding on
//! the shorter sequence is decoding with the dropped tokens masked out after
//! layer K, continuing where the dense layout ends; no row is left empty.

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};
use foveal::text_guided_select::select_from_scores;
use foveal_candle::focus::LayerK;
use foveal_candle::{
    attention_mask, FocusConfig, FocusLlava, FocusRun, LlavaModel, Method, ModelConfig, Prompt,
    VisionSample,
};

mod common;
use common::focus::{MODEL_SEED, SELECTOR_SEED, STEPS};
use common::{
    assert_decodes_from, assert_row_alone_as_in_batch, assert_steps_close, assert_token_margins,
    mask_columns, max_abs_diff, replay_steps, system_and_questions, DECISION_MARGIN,
};

struct Setup {
    cfg: ModelConfig,
    model: LlavaModel,
    system: Vec<u32>,
    questions: Vec<Vec<u32>>,
}

fn setup() -> Result<Setup> {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, MODEL_SEED, &Device::Cpu, DType::F32)?;
    let (system, questions) = system_and_questions();
    Ok(Setup {
        system,
        questions,
        model,
        cfg,
    })
}

/// Two images for a `g x g` grid of the tower's image size.
fn images(s: &Setup, g: usize) -> Result<Tensor> {
    common::focus::images(&s.cfg, g, &Device::Cpu)
}

#[test]
fn the_1x1_scale_and_gamma_1_give_the_dense_model() -> Result<()> {
    let s = setup()?;
    for g in [1, 2] {
        let mut fcfg = FocusConfig::for_model(&s.cfg);
        fcfg.vision.force_scale = Some(2); // (1, 1) in the 3-branch set
        fcfg.gamma = 1.0;
        let fl = FocusLlava::seeded(&s.cfg, &fcfg, 3, &Device::Cpu, DType::F32)?;
        let pixels = images(&s, g)?;
        let run = fl.generate(&s.model, &pixels, (g, g), &s.system, &s.questions, STEPS)?;
        let cells = g * g * s.model.num_patches();
        assert_eq!(run.visual, vec![cells; 2]);
        assert_eq!(run.sampled, vec![cells; 2], "grid {g}: every cell sampled");
        assert_eq!(
            run.kept,
            vec![(0..cells).collect::<Vec<_>>(); 2],
            "grid {g}: every token kept"
        );

        // The dense model over the stitched map in raster order.
        let sample = fl.sample_vision(&s.model, &pixels, (g, g))?;
        let prompt =
            s.model
                .build_prompt_from_embeds(&sample.dense_tokens()?, &s.system, &s.questions)?;
        if g == 1 {
            let plain = s.model.build_prompt(&pixels, &s.system, &s.questions)?;
            assert_eq!(
                max_abs_diff(&plain.embeds, &prompt.embeds)?,
                0.0,
                "one sub-image: the map is the image's features"
            );
        }
        let dense = s.model.generate_dense(&prompt, STEPS)?;
        assert_eq!(run.generation.tokens, dense.tokens, "grid {g}");
        for (step, (a, b)) in run.generation.logits.iter().zip(&dense.logits).enumerate() {
            let d = max_abs_diff(a, b)?;
            assert!(d < 1e-4, "grid {g}, step {step}: logits differ by {d}");
        }
        let full = (prompt.seq() - prompt.starts[1]) * s.cfg.text.num_layers;
        assert_eq!(run.kv_entries[1], full);
    }
    Ok(())
}

/// The sampler's tokens, checked by hand: per window the scale of the largest
/// logit, its cells' top-left pixels (raster order over the map) and their
/// max-pooled features. Returns the number of distinct scales chosen.
fn check_vision_sample(
    sample: &VisionSample,
    window: usize,
    scales: &[(usize, usize)],
) -> Result<usize> {
    let (_, h, w, _) = sample.map.dims4()?;
    let z = sample.logits.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let wins_x = w.div_ceil(window);
    let mut used = std::collections::BTreeSet::new();
    for (row, z_row) in z.iter().enumerate() {
        let mut cells = Vec::new();
        for (m, zm) in z_row.iter().enumerate() {
            let c = (0..zm.len()).fold(0, |best, i| if zm[i] > zm[best] { i } else { best });
            used.insert(c);
            let (kh, kw) = scales[c];
            let (y0, x0) = ((m / wins_x) * window, (m % wins_x) * window);
            for y in (y0..(y0 + window).min(h)).step_by(kh) {
                for x in (x0..(x0 + window).min(w)).step_by(kw) {
                    cells.push((y * w + x, (y, x, kh.min(h - y), kw.min(w - x))));
                }
            }
        }
        cells.sort_by_key(|c| c.0);
        let got: Vec<usize> = sample.cells[row].iter().map(|&c| c as usize).collect();
        assert_eq!(
            got,
            cells.iter().map(|c| c.0).collect::<Vec<_>>(),
            "row {row}: the sampled cells"
        );
        for (i, &(_, (y, x, ch, cw))) in cells.iter().enumerate() {
            let want = sample.map.i((row, y..y + ch, x..x + cw))?.max(0)?.max(0)?;
            let d = max_abs_diff(&sample.tokens[row].get(i)?, &want)?;
            assert_eq!(
                d, 0.0,
                "row {row}, cell ({y}, {x}): not the max over its pixels"
            );
        }
    }
    Ok(used.len())
}

/// S of the paper's Eq. 8 with candle ops: softmax over the visual keys per
/// head, max over the heads, mean over the instruction tokens.
fn importance(q: &Tensor, k: &Tensor, group: usize) -> Result<Vec<f32>> {
    let (hkv, n, d) = k.dims3()?;
    let k = k
        .unsqueeze(1)?
        .broadcast_as((hkv, group, n, d))?
        .reshape((hkv * group, n, d))?;
    let a = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? / (d as f64).sqrt())?)?;
    a.max(0)?.mean(0)?.to_vec1::<f32>()
}

/// How far an argmax is from changing: the best value's lead over the
/// runner-up, relative to its size (no runner-up: infinite).
fn argmax_margin(z: &[f32]) -> f64 {
    let mut v: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(|a, b| b.total_cmp(a));
    match v[..] {
        [top, next, ..] => (top - next) / (1.0 + top.abs()),
        _ => f64::INFINITY,
    }
}

/// How far Eq. 9's kept set (the `n` largest of `s`, the smallest prefix of
/// the sorted scores whose sum exceeds gamma times the total) is from
/// changing, relative to the total: the n-th prefix's excess, the (n-1)-th
/// prefix's shortfall, and the n-th score's lead over the next.
fn selection_margin(s: &[f32], gamma: f32, n: usize) -> f64 {
    let mut v: Vec<f64> = s.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = v.iter().sum();
    let cut = f64::from(gamma) * total;
    let prefix = |i: usize| v[..i].iter().sum::<f64>();
    let mut margin = (prefix(n) - cut).min(cut - prefix(n - 1));
    if n < v.len() {
        margin = margin.min(v[n - 1] - v[n]);
    }
    margin / total
}

/// Per row, where the dense layout `[system][g x g map][question]` ends.
fn dense_ends(s: &Setup, g: usize, questions: &[Vec<u32>]) -> Vec<u32> {
    let cells = g * g * s.model.num_patches();
    questions
        .iter()
        .map(|q| (s.system.len() + cells + q.len()) as u32)
        .collect()
}

/// The reference of a FocusLLaVA run: a dense run over the FocusLLaVA
/// prompt in which the visual tokens the text-guided sampler dropped are
/// masked out from layer K+1 on (layers 0..=K saw, and cached, every token,
/// also while decoding), decoding at `next[b]` (the test's own account of
/// the dense layout's end). Returns every step's logits.
fn masked_reference(
    s: &Setup,
    fcfg: &FocusConfig,
    prompt: &Prompt,
    layer_k: &LayerK,
    run: &FocusRun,
    next: &[u32],
) -> Result<Vec<Tensor>> {
    let dec = &s.model.decoder;
    let dropped: Vec<Vec<usize>> = (0..prompt.batch())
        .map(|b| {
            prompt.visual[b]
                .iter()
                .enumerate()
                .filter(|(i, _)| !run.kept[b].contains(i))
                .map(|(_, &p)| p)
                .collect()
        })
        .collect();
    let mut cache = layer_k.cache.clone();
    let h = dec.forward_layers(
        &layer_k.hidden,
        &prompt.positions,
        Some(&mask_columns(prompt.mask()?, &dropped)?),
        fcfg.layer + 1..dec.num_layers(),
        &mut cache,
    )?;
    let mut steps = vec![dec.last_logits(&h)?];
    steps.extend(replay_steps(
        dec,
        &run.generation.tokens,
        next,
        &mut cache,
        &[fcfg.layer + 1],
        |range, kv_len| {
            let mask = attention_mask(&prompt.starts, 1, kv_len, &Device::Cpu)?;
            match range {
                0 => Ok(mask),
                _ => mask_columns(mask, &dropped),
            }
        },
    )?);
    Ok(steps)
}

/// Real selection at layer K: the kept sets are the paper's rule on S, and
/// every step's logits equal a dense run over the FocusLLaVA prompt in which
/// the dropped visual tokens are masked out from layer K+1 on (layers 0..=K
/// saw, and cached, every token).
#[test]
fn real_selection_equals_masking_the_dropped_tokens() -> Result<()> {
    let s = setup()?;
    for g in [1, 2] {
        let fcfg = FocusConfig::for_model(&s.cfg);
        assert_eq!(fcfg.layer, 1, "the tiny model's default layer");
        // An untrained selector tends to pick one scale for a whole image (the
        // scores share a large common part); this seed mixes two on the grid.
        let fl = FocusLlava::seeded(&s.cfg, &fcfg, SELECTOR_SEED, &Device::Cpu, DType::F32)?;
        let pixels = images(&s, g)?;
        let run = fl.generate(&s.model, &pixels, (g, g), &s.system, &s.questions, STEPS)?;

        // The vision-guided sampler.
        let sample = fl.sample_vision(&s.model, &pixels, (g, g))?;
        let scales_used =
            check_vision_sample(&sample, fcfg.vision.window, fcfg.vision.scales.scales())?;
        // The GPU test (tests/gpu/focus.rs) compares the sampled cells, the
        // kept sets and the tokens of these very inputs exactly across
        // devices: sound only while every decision wins by far more than the
        // devices' rounding differences.
        let z = sample.logits.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let scale_margin = z
            .iter()
            .flatten()
            .map(|zm| argmax_margin(zm))
            .fold(f64::INFINITY, f64::min);
        assert!(
            scale_margin >= DECISION_MARGIN,
            "grid {g}: a window's scale wins by only {scale_margin:e}"
        );
        assert_token_margins(&run.generation.logits, &format!("grid {g}"))?;
        if g == 2 {
            assert!(
                scales_used >= 2,
                "the seeded selector should mix scales on the 2 x 2 grid"
            );
        }
        assert_eq!(
            run.sampled,
            sample
                .tokens
                .iter()
                .map(|t| t.dim(0).unwrap())
                .collect::<Vec<_>>()
        );
        assert!(
            run.sampled.iter().all(|&n| n < run.visual[0]),
            "grid {g}: the sampler reduced {:?} of {}",
            run.sampled,
            run.visual[0]
        );

        // The text-guided sampler: Eq. 9 on S computed here.
        let prompt = fl.prompt(&s.model, &sample, &s.system, &s.questions)?;
        let layer_k = fl.prefill_to_layer_k(&s.model, &prompt)?;
        let (k_cache, _) = layer_k.cache.layer(fcfg.layer).unwrap().clone();
        let seq = prompt.seq();
        for (b, q) in s.questions.iter().enumerate() {
            let qt = layer_k.queries.get(b)?.narrow(1, seq - q.len(), q.len())?;
            let vis = Tensor::from_vec(
                prompt.visual[b]
                    .iter()
                    .map(|&p| p as u32)
                    .collect::<Vec<_>>(),
                prompt.visual[b].len(),
                &Device::Cpu,
            )?;
            let kv = k_cache.get(b)?.index_select(&vis, 1)?;
            let score = importance(&qt, &kv, s.cfg.text.group_size())?;
            assert_eq!(
                run.kept[b],
                select_from_scores(&score, fcfg.gamma),
                "grid {g}, row {b}: the kept set"
            );
            let margin = selection_margin(&score, fcfg.gamma, run.kept[b].len());
            assert!(
                margin >= DECISION_MARGIN,
                "grid {g}, row {b}: the kept set is {margin:e} from changing"
            );
            assert!(
                !run.kept[b].is_empty() && run.kept[b].len() < run.sampled[b],
                "grid {g}, row {b}: needs real selection"
            );
        }

        // The reference: layers K+1.. over the whole prompt, dropped keys masked.
        let next = dense_ends(&s, g, &s.questions);
        let want = masked_reference(&s, &fcfg, &prompt, &layer_k, &run, &next)?;
        assert_steps_close(&run.generation.logits, &want, 1e-4, &format!("grid {g}"))?;
        for (step, logits) in want.iter().enumerate() {
            assert_eq!(
                logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
                run.generation
                    .tokens
                    .iter()
                    .map(|t| t[step])
                    .collect::<Vec<_>>()
            );
        }

        // KV entries: whole rows in layers 0..=K, the kept ones after.
        let layers = s.cfg.text.num_layers;
        for (b, kept) in run.kept.iter().enumerate() {
            let len = seq - prompt.starts[b];
            let kept_len = len - (prompt.visual[b].len() - kept.len());
            let want = len * (fcfg.layer + 1) + kept_len * (layers - fcfg.layer - 1);
            assert_eq!(run.kv_entries[b], want, "row {b}");
        }
    }
    Ok(())
}

/// After both samplers, decoding continues where the dense layout ends,
/// whatever scale was chosen or token kept: with the image (one, or a 2 x 2
/// grid) last, beside a row with text after the image, every window forced
/// to each scale (gamma 1) and the default selector and gamma; every step's
/// logits equal the masked reference decoding there.
#[test]
fn decoding_continues_at_the_end_of_the_dense_layout() -> Result<()> {
    let s = setup()?;
    let settings = [
        (1, Some(0), 1.0),
        (1, Some(1), 1.0),
        (1, Some(2), 1.0),
        (1, None, 0.85),
        (2, Some(0), 1.0),
    ];
    for questions in [vec![vec![], vec![]], vec![vec![], s.questions[1].clone()]] {
        for (g, force_scale, gamma) in settings {
            let mut fcfg = FocusConfig::for_model(&s.cfg);
            fcfg.vision.force_scale = force_scale;
            fcfg.gamma = gamma;
            let fl = FocusLlava::seeded(&s.cfg, &fcfg, SELECTOR_SEED, &Device::Cpu, DType::F32)?;
            let pixels = images(&s, g)?;
            let run = fl.generate(&s.model, &pixels, (g, g), &s.system, &questions, STEPS)?;
            let what = format!(
                "grid {g}, scale {force_scale:?}, gamma {gamma}, question lengths {:?}",
                questions.iter().map(Vec::len).collect::<Vec<_>>()
            );
            let next = dense_ends(&s, g, &questions);
            assert_decodes_from(&run.generation, &next, &what);
            let sample = fl.sample_vision(&s.model, &pixels, (g, g))?;
            let prompt = fl.prompt(&s.model, &sample, &s.system, &questions)?;
            let layer_k = fl.prefill_to_layer_k(&s.model, &prompt)?;
            let want = masked_reference(&s, &fcfg, &prompt, &layer_k, &run, &next)?;
            assert_steps_close(&run.generation.logits, &want, 1e-4, &what)?;
        }
    }
    Ok(())
}

/// A row that is only its image keeps a token at the strongest reduction
/// (every window at 4 x 4, gamma 0.01): the sampler keeps a token per
/// window, and the text-guided sampler keeps a token of every row (all of
/// them in a row without text). The row is the same alone and in a batch.
#[test]
fn a_row_that_is_only_its_image_keeps_a_token_alone_and_in_a_batch() -> Result<()> {
    let s = setup()?;
    let mut fcfg = FocusConfig::for_model(&s.cfg);
    fcfg.vision.force_scale = Some(0);
    fcfg.gamma = 0.01;
    let fl = FocusLlava::seeded(&s.cfg, &fcfg, SELECTOR_SEED, &Device::Cpu, DType::F32)?;
    let pixels = images(&s, 1)?;
    let alone = fl.generate(
        &s.model,
        &pixels.narrow(0, 0, 1)?,
        (1, 1),
        &[],
        &[vec![]],
        STEPS,
    )?;
    let questions = [vec![], s.questions[1].clone()];
    let batch = fl.generate(&s.model, &pixels, (1, 1), &[], &questions, STEPS)?;
    assert_eq!(alone.sampled, [4], "one token per 4 x 4 window");
    assert_eq!(
        alone.kept,
        [vec![0, 1, 2, 3]],
        "no text: every sampled token kept"
    );
    assert!(!batch.kept[1].is_empty() && batch.kept[1].len() < batch.sampled[1]);
    assert_eq!(alone.kept[0], batch.kept[0]);
    assert_row_alone_as_in_batch(&alone.generation, &batch.generation)
}

/// The 7-branch set and Eq. 2's probability scaling reach the gather.
#[test]
fn seven_branches_and_probability_scaling() -> Result<()> {
    let s = setup()?;
    let mut fcfg = FocusConfig::for_model(&s.cfg);
    fcfg.vision.scales = foveal::ScaleSet::seven();
    let pixels = images(&s, 2)?;
    let fl = FocusLlava::seeded(&s.cfg, &fcfg, 4, &Device::Cpu, DType::F32)?;
    let plain = fl.sample_vision(&s.model, &pixels, (2, 2))?;
    check_vision_sample(&plain, fcfg.vision.window, fcfg.vision.scales.scales())?;
    assert_eq!(plain.logits.dim(2)?, 7);

    fcfg.vision.scale_by_prob = true;
    let scaled = FocusLlava::seeded(&s.cfg, &fcfg, 4, &Device::Cpu, DType::F32)?.sample_vision(
        &s.model,
        &pixels,
        (2, 2),
    )?;
    assert_eq!(scaled.cells, plain.cells);
    // Each token times the softmax probability of its window's scale.
    let probs = candle_nn::ops::softmax_last_dim(&plain.logits)?
        .max(D::Minus1)?
        .to_vec2::<f32>()?;
    let (_, _, w, _) = plain.map.dims4()?;
    let wins_x = w.div_ceil(fcfg.vision.window);
    for (b, probs) in probs.iter().enumerate() {
        for (i, &cell) in plain.cells[b].iter().enumerate() {
            let (y, x) = (cell as usize / w, cell as usize % w);
            let m = (y / fcfg.vision.window) * wins_x + x / fcfg.vision.window;
            let want = (plain.tokens[b].get(i)? * f64::from(probs[m]))?;
            let d = max_abs_diff(&scaled.tokens[b].get(i)?, &want)?;
            assert!(d < 1e-5, "row {b}, token {i}: differs by {d}");
        }
    }
    Ok(())
}

#[test]
fn focus_weights_round_trip_through_safetensors() -> Result<()> {
    let s = setup()?;
    let fcfg = FocusConfig::for_model(&s.cfg);
    let fl = FocusLlava::seeded(&s.cfg, &fcfg, 9, &Device::Cpu, DType::F32)?;
    let names: Vec<String> = fl.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "multi_modal_projector.selector.weight",
            "multi_modal_projector.selector.bias"
        ]
    );
    let path =
        std::env::temp_dir().join(format!("foveal-focus-{}.safetensors", std::process::id()));
    fl.save_safetensors(&path)?;
    let loaded = FocusLlava::load_safetensors(&path, &s.cfg, &fcfg, &Device::Cpu, DType::F32)?;
    std::fs::remove_file(&path).ok();
    let pixels = images(&s, 2)?;
    let a = fl.sample_vision(&s.model, &pixels, (2, 2))?;
    let b = loaded.sample_vision(&s.model, &pixels, (2, 2))?;
    assert_eq!(max_abs_diff(&a.logits, &b.logits)?, 0.0);
    assert_eq!(a.cells, b.cells);
    let other = FocusLlava::seeded(&s.cfg, &fcfg, 10, &Device::Cpu, DType::F32)?.sample_vision(
        &s.model,
        &pixels,
        (2, 2),
    )?;
    assert_ne!(
        a.cells, other.cells,
        "another seed must sample differently (the round trip would otherwise prove nothing)"
    );
    Ok(())
}

#[test]
fn bad_configurations_and_inputs_are_refused() -> Result<()> {
    let s = setup()?;
    let dev = Device::Cpu;
    let mut fcfg = FocusConfig::for_model(&s.cfg);
    fcfg.gamma = 0.0;
    assert!(
        FocusLlava::seeded(&s.cfg, &fcfg, 1, &dev, DType::F32).is_err(),
        "gamma 0"
    );
    fcfg = FocusConfig::for_model(&s.cfg);
    fcfg.layer = s.cfg.text.num_layers;
    assert!(
        FocusLlava::seeded(&s.cfg, &fcfg, 1, &dev, DType::F32).is_err(),
        "layer past the decoder"
    );
    fcfg = FocusConfig::for_model(&s.cfg);
    fcfg.vision.force_scale = Some(3);
    assert!(
        FocusLlava::seeded(&s.cfg, &fcfg, 1, &dev, DType::F32).is_err(),
        "forced scale past the set"
    );
    fcfg = FocusConfig::for_model(&s.cfg);
    fcfg.vision.window = 6;
    assert!(
        FocusLlava::seeded(&s.cfg, &fcfg, 1, &dev, DType::F32).is_err(),
        "a scale that does not divide the window"
    );
    let fl = FocusLlava::seeded(&s.cfg, &FocusConfig::for_model(&s.cfg), 1, &dev, DType::F32)?;
    let err = fl
        .sample_vision(&s.model, &images(&s, 1)?, (2, 2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("grid"), "{err}");
    Ok(())
}
