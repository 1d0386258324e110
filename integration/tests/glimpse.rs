//! GlimpsePrune in the model: with every visual token kept it is the dense
//! model; with real pruning, decoding on the compacted cache is decoding with
//! the pruned tokens masked out after layer K (one-shot pruning); decoding
//! continues where the dense layout ends; a row that pruning could empty is
//! refused. The authors' options: anchors always kept, the baseline map,
//! several selected layers, no glimpse token, pruning after the whole
//! prefill.

use candle_core::{DType, Device, Result, Tensor};
use foveal::KeepRule;
use foveal_candle::images::synthetic_images;
use foveal_candle::{
    attention_mask, Anchor, GlimpseConfig, GlimpsePrune, GlimpseRun, ImageMethod, ImageQuestions,
    LlavaModel, Method, ModelConfig, Predictor,
};

mod common;
use common::glimpse as glimpse_inputs;
use common::{
    assert_decodes_from, assert_row_alone_as_in_batch, assert_steps_close, assert_token_margins,
    logits_at, mask_columns, max_abs_diff, replay_steps, system_and_questions, DECISION_MARGIN,
};

const STEPS: usize = 5;

struct Setup {
    cfg: ModelConfig,
    model: LlavaModel,
    pixels: Tensor,
    system: Vec<u32>,
    questions: Vec<Vec<u32>>,
}

fn setup() -> Result<Setup> {
    let cfg = ModelConfig::tiny();
    let model = LlavaModel::seeded(&cfg, 11, &Device::Cpu, DType::F32)?;
    let (pixels, _) = synthetic_images(2, cfg.vision.image_size, 5, &Device::Cpu)?;
    let (system, questions) = system_and_questions();
    Ok(Setup {
        system,
        questions,
        pixels,
        model,
        cfg,
    })
}

/// GlimpsePrune on the tiny model with `rule` (predictor seeded by `seed`).
fn glimpse(s: &Setup, rule: KeepRule, seed: u64) -> Result<GlimpsePrune> {
    glimpse_with(s, rule, seed, |_| {})
}

/// [`glimpse`] with the settings changed by `edit` (the predictor's input
/// width follows the selected layers).
fn glimpse_with(
    s: &Setup,
    rule: KeepRule,
    seed: u64,
    edit: impl FnOnce(&mut GlimpseConfig),
) -> Result<GlimpsePrune> {
    let mut gcfg = GlimpseConfig::for_model(&s.cfg);
    gcfg.rule = rule;
    edit(&mut gcfg);
    let width = gcfg.selected_layers.len() * s.cfg.text.num_heads;
    if let Predictor::Vip(v) = &mut gcfg.predictor {
        v.in_features = width;
    }
    GlimpsePrune::seeded(&s.cfg, &gcfg, seed, &Device::Cpu, DType::F32)
}

/// `threshold` 0.5 with a cap and a floor.
fn rule(max_ratio: f64, min_keep: usize) -> KeepRule {
    KeepRule {
        threshold: 0.5,
        max_ratio: Some(max_ratio as _),
        min_keep,
    }
}

#[test]
fn keeping_every_visual_token_equals_the_dense_model() -> Result<()> {
    let s = setup()?;
    let gp = glimpse(&s, KeepRule::keep_all(), 3)?;
    let run = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, STEPS)?;
    let dense = s.model.generate_dense(
        &s.model.build_prompt(&s.pixels, &s.system, &s.questions)?,
        STEPS,
    )?;
    assert_eq!(
        run.kept.iter().map(Vec::len).collect::<Vec<_>>(),
        run.visual,
        "every visual token kept"
    );
    assert_eq!(run.generation.tokens, dense.tokens);
    for (step, (a, b)) in run.generation.logits.iter().zip(&dense.logits).enumerate() {
        let d = max_abs_diff(a, b)?;
        assert!(d < 1e-4, "step {step}: logits differ by {d}");
    }
    Ok(())
}

/// The reference of a GlimpsePrune run (one-shot pruning at layer K: layers
/// 0..=K see every token; from layer K+1 on, and at every layer while
/// decoding, the pruned visual tokens and the glimpse token are gone): the
/// same model run densely over the whole glimpse prompt with those keys
/// masked out from layer K+1 on (kept tokens at their original positions),
/// the first logits read at each row's last kept token, decoding at
/// `next[b]` (the test's own account of the dense layout's end). Returns
/// every step's logits, to equal the compacted run's.
fn masked_reference(
    s: &Setup,
    gp: &GlimpsePrune,
    system: &[u32],
    questions: &[Vec<u32>],
    run: &GlimpseRun,
    next: &[u32],
) -> Result<Vec<Tensor>> {
    let dec = &s.model.decoder;
    let pixels = s.pixels.narrow(0, 0, questions.len())?;
    let vit = s.model.vision.forward(&pixels)?;
    let embeds = s
        .model
        .projector
        .forward(&vit[s.cfg.feature_layer_index()])?;
    let prompt = gp.prompt(&s.model, &embeds, system, questions)?;
    let (h, mut cache, _) = gp.prefill_to_layer_k(&s.model, &prompt)?;
    let seq = prompt.seq();
    let dropped: Vec<Vec<usize>> = (0..prompt.batch())
        .map(|b| {
            let mut d: Vec<usize> = prompt.visual[b]
                .iter()
                .enumerate()
                .filter(|(i, _)| !run.kept[b].contains(i))
                .map(|(_, &p)| p)
                .collect();
            if gp.config().embeddings.is_some() {
                d.push(seq - 1);
            }
            d
        })
        .collect();
    let k = gp.config().reduce_layer.min(dec.num_layers() - 1);
    let mask = mask_columns(prompt.mask()?, &dropped)?;
    let h = dec.forward_layers(
        &h,
        &prompt.positions,
        Some(&mask),
        k + 1..dec.num_layers(),
        &mut cache,
    )?;
    let last: Vec<usize> = dropped
        .iter()
        .map(|d| (0..seq).rev().find(|p| !d.contains(p)).unwrap())
        .collect();
    let mut steps = vec![logits_at(dec, &h, &last)?];
    steps.extend(replay_steps(
        dec,
        &run.generation.tokens,
        next,
        &mut cache,
        &[],
        |_, kv_len| {
            mask_columns(
                attention_mask(&prompt.starts, 1, kv_len, &Device::Cpu)?,
                &dropped,
            )
        },
    )?);
    Ok(steps)
}

/// Per row, where the dense layout `[system][image][question]` ends.
fn dense_ends(s: &Setup, system: &[u32], questions: &[Vec<u32>]) -> Vec<u32> {
    let np = s.model.num_patches();
    questions
        .iter()
        .map(|q| (system.len() + np + q.len()) as u32)
        .collect()
}

/// Decoding on the compacted cache is decoding with the pruned tokens
/// masked out after layer K.
#[test]
fn decoding_on_the_compacted_cache_equals_masking_the_pruned_tokens() -> Result<()> {
    let s = setup()?;
    let gp = glimpse(&s, rule(0.4, 3), 3)?;
    let run = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, STEPS)?;
    for (b, kept) in run.kept.iter().enumerate() {
        assert!(
            !kept.is_empty() && kept.len() < run.visual[b],
            "row {b}: kept {} of {}: the test needs real pruning",
            kept.len(),
            run.visual[b]
        );
    }
    let next = dense_ends(&s, &s.system, &s.questions);
    let want = masked_reference(&s, &gp, &s.system, &s.questions, &run, &next)?;
    assert_steps_close(&run.generation.logits, &want, 1e-4, "pruned")
}

/// After pruning, decoding continues where the dense layout ends, whatever
/// was kept: with the image last (a pruned last token), beside a row with
/// text after the image, at several pruning strengths; every step's logits
/// equal the masked reference decoding there, and keeping everything is
/// the dense model itself.
#[test]
fn decoding_continues_at_the_end_of_the_dense_layout() -> Result<()> {
    let s = setup()?;
    let rules = [KeepRule::keep_all(), rule(0.4, 3), rule(0.1, 1)];
    for questions in [vec![vec![], vec![]], vec![vec![], s.questions[1].clone()]] {
        let next = dense_ends(&s, &s.system, &questions);
        for rule in rules {
            let gp = glimpse(&s, rule, 3)?;
            let run = gp.generate(&s.model, &s.pixels, &s.system, &questions, STEPS)?;
            let what = format!(
                "{rule:?}, question lengths {:?}",
                questions.iter().map(Vec::len).collect::<Vec<_>>()
            );
            assert_decodes_from(&run.generation, &next, &what);
            let want = masked_reference(&s, &gp, &s.system, &questions, &run, &next)?;
            assert_steps_close(&run.generation.logits, &want, 1e-4, &what)?;
            if rule == KeepRule::keep_all() {
                let prompt = s.model.build_prompt(&s.pixels, &s.system, &questions)?;
                let dense = s.model.generate_dense(&prompt, STEPS)?;
                assert_eq!(dense.positions, run.generation.positions, "{what}");
                assert_steps_close(&run.generation.logits, &dense.logits, 1e-4, &what)?;
            }
        }
    }
    Ok(())
}

/// A row that is only its image and the glimpse token, under a rule that
/// may keep none of its visual tokens, would be left with nothing to
/// attend: refused before the model runs, naming the row and the rule,
/// alone and in a batch. With text in the row, or a rule that keeps a
/// visual token, it runs, and the row is the same alone and in a batch.
#[test]
fn a_row_that_pruning_could_empty_is_refused_alone_and_in_a_batch() -> Result<()> {
    let s = setup()?;
    let gp = glimpse(&s, rule(0.0, 0), 3)?;
    let one = s.pixels.narrow(0, 0, 1)?;
    let err = gp.generate(&s.model, &one, &[], &[vec![]], 2).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("row 0") && msg.contains("min_keep 0"), "{msg}");
    let err = gp
        .generate(
            &s.model,
            &s.pixels,
            &[],
            &[s.questions[0].clone(), vec![]],
            2,
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("row 1") && msg.contains("min_keep 0"), "{msg}");
    // With a system prompt every row keeps its text (and no visual token).
    let run = gp.generate(&s.model, &s.pixels, &s.system, &[vec![], vec![]], 2)?;
    assert_eq!(run.kept, [Vec::<usize>::new(), vec![]]);

    // min_keep 1: the row keeps one visual token; alone = in a batch.
    let gp = glimpse(&s, rule(0.0, 1), 3)?;
    let alone = gp.generate(&s.model, &one, &[], &[vec![]], STEPS)?;
    let batch = gp.generate(
        &s.model,
        &s.pixels,
        &[],
        &[vec![], s.questions[1].clone()],
        STEPS,
    )?;
    assert_eq!(alone.kept[0].len(), 1);
    assert_eq!(alone.kept[0], batch.kept[0]);
    assert_row_alone_as_in_batch(&alone.generation, &batch.generation)
}

/// The predictor reads one tower-sized image's ViT grid: sub-image grids
/// are refused before anything runs.
#[test]
fn sub_image_grids_are_refused() -> Result<()> {
    let s = setup()?;
    let gp = glimpse(&s, rule(0.5, 1), 3)?;
    assert!(!gp.takes_grids());
    let input = ImageQuestions {
        pixels: synthetic_images(2, 2 * s.cfg.vision.image_size, 5, &Device::Cpu)?.0,
        grid: (2, 2),
        system: s.system.clone(),
        questions: s.questions.clone(),
    };
    let err = gp.run(&s.model, &input, 2).unwrap_err();
    assert!(err.to_string().contains("not a (2, 2) grid"), "{err}");
    Ok(())
}

#[test]
fn glimpse_weights_round_trip_through_safetensors() -> Result<()> {
    let s = setup()?;
    let gp = glimpse(&s, rule(0.5, 1), 9)?;
    let path =
        std::env::temp_dir().join(format!("foveal-glimpse-{}.safetensors", std::process::id()));
    gp.save_safetensors(&path)?;
    let loaded =
        GlimpsePrune::load_safetensors(&path, &s.cfg, gp.config(), &Device::Cpu, DType::F32)?;
    std::fs::remove_file(&path).ok();
    let a = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, 2)?;
    let b = loaded.generate(&s.model, &s.pixels, &s.system, &s.questions, 2)?;
    assert_eq!(a.kept, b.kept);
    assert_eq!(a.generation.tokens, b.generation.tokens);
    let other =
        glimpse(&s, rule(0.5, 1), 10)?.generate(&s.model, &s.pixels, &s.system, &s.questions, 2)?;
    assert_ne!(
        a.kept, other.kept,
        "another seed must select differently (the round trip would otherwise prove nothing)"
    );
    Ok(())
}

/// The pruned run equals the masked reference (and keeps something, drops something).
fn check_pruned(s: &Setup, gp: &GlimpsePrune, what: &str) -> Result<GlimpseRun> {
    let run = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, STEPS)?;
    for (b, kept) in run.kept.iter().enumerate() {
        assert!(
            !kept.is_empty() && kept.len() < run.visual[b],
            "{what}: row {b}: kept {} of {}: the test needs real pruning",
            kept.len(),
            run.visual[b]
        );
    }
    let next = dense_ends(s, &s.system, &s.questions);
    let want = masked_reference(s, gp, &s.system, &s.questions, &run, &next)?;
    assert_steps_close(&run.generation.logits, &want, 1e-4, what)?;
    Ok(run)
}

/// The corners of every image are kept whatever the rule says, after its
/// cap (as upstream: the cap's kept set plus the anchors), and decoding
/// sees them.
#[test]
fn anchors_are_always_kept() -> Result<()> {
    let s = setup()?;
    let corners = [0, 7, 56, 63];
    let plain = glimpse(&s, rule(0.05, 1), 3)?;
    let anchored = glimpse_with(&s, rule(0.05, 1), 3, |c| {
        c.anchors = vec![
            Anchor::TopLeft,
            Anchor::TopRight,
            Anchor::BottomLeft,
            Anchor::BottomRight,
        ]
    })?;
    let without = plain.generate(&s.model, &s.pixels, &s.system, &s.questions, 1)?;
    let run = check_pruned(&s, &anchored, "anchors")?;
    for (b, kept) in run.kept.iter().enumerate() {
        assert_eq!(
            without.kept[b].len(),
            3,
            "row {b}: the cap floor(0.05 * 64)"
        );
        let mut want = without.kept[b].clone();
        want.extend(corners);
        want.sort_unstable();
        want.dedup();
        assert_eq!(kept, &want, "row {b}");
    }
    // min_keep 0 cannot empty an image-only row when anchors are kept.
    let gp = glimpse_with(&s, rule(0.0, 0), 3, |c| {
        c.anchors = vec![Anchor::BottomRight]
    })?;
    let one = s.pixels.narrow(0, 0, 1)?;
    assert_eq!(
        gp.generate(&s.model, &one, &[], &[vec![]], 2)?.kept,
        [vec![63]]
    );
    Ok(())
}

/// The training-free baseline map (no predictor): the kept set is the top
/// of the test's own map (head-mean log-softmax, exp, min-max), capped; with
/// every token kept it is the dense model.
#[test]
fn the_baseline_map_keeps_the_top_of_the_mean_glimpse_attention() -> Result<()> {
    let s = setup()?;
    let baseline = |c: &mut GlimpseConfig| c.predictor = Predictor::Baseline;
    let gp = glimpse_with(&s, rule(0.25, 1), 3, baseline)?;
    assert!(gp
        .named_tensors()
        .iter()
        .all(|(n, _)| !n.starts_with("attn_fuser")));
    let run = check_pruned(&s, &gp, "baseline")?;

    let vit = s.model.vision.forward(&s.pixels)?;
    let embeds = s
        .model
        .projector
        .forward(&vit[s.cfg.feature_layer_index()])?;
    let prompt = gp.prompt(&s.model, &embeds, &s.system, &s.questions)?;
    let (_, _, attention) = gp.prefill_to_layer_k(&s.model, &prompt)?;
    for (b, a) in attention.to_vec3::<f32>()?.iter().enumerate() {
        let p: Vec<f64> = a
            .iter()
            .map(|h| (h.iter().map(|&x| f64::from(x)).sum::<f64>() / h.len() as f64).exp())
            .collect();
        let (lo, hi) = p
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
        let map: Vec<f64> = p.iter().map(|x| (x - lo) / (hi - lo + 1e-6)).collect();
        let mut order: Vec<usize> = (0..map.len()).collect();
        order.sort_by(|&i, &j| map[j].total_cmp(&map[i]).then(i.cmp(&j)));
        let mut want = order[..16].to_vec();
        want.sort_unstable();
        assert_eq!(run.kept[b], want, "row {b}");
    }

    let gp = glimpse_with(&s, KeepRule::keep_all(), 3, baseline)?;
    let run = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, STEPS)?;
    let dense = s.model.generate_dense(
        &s.model.build_prompt(&s.pixels, &s.system, &s.questions)?,
        STEPS,
    )?;
    assert_steps_close(
        &run.generation.logits,
        &dense.logits,
        1e-4,
        "baseline, all kept",
    )
}

/// The predictor's input is the glimpse attention of every selected layer,
/// layer-major in the order of `selected_layers`.
#[test]
fn several_selected_layers_feed_the_predictor_in_order() -> Result<()> {
    let s = setup()?;
    let attention = |layers: Vec<usize>| -> Result<Tensor> {
        let gp = glimpse_with(&s, rule(0.4, 3), 3, |c| c.selected_layers = layers)?;
        let vit = s.model.vision.forward(&s.pixels)?;
        let embeds = s
            .model
            .projector
            .forward(&vit[s.cfg.feature_layer_index()])?;
        let prompt = gp.prompt(&s.model, &embeds, &s.system, &s.questions)?;
        Ok(gp.prefill_to_layer_k(&s.model, &prompt)?.2)
    };
    let both = attention(vec![1, 3])?;
    let h = s.cfg.text.num_heads;
    assert_eq!(both.dims(), [2, 64, 2 * h]);
    assert_eq!(
        max_abs_diff(&both.narrow(2, 0, h)?, &attention(vec![1])?)?,
        0.0
    );
    assert_eq!(
        max_abs_diff(&both.narrow(2, h, h)?, &attention(vec![3])?)?,
        0.0
    );
    let gp = glimpse_with(&s, rule(0.4, 3), 3, |c| c.selected_layers = vec![1, 3])?;
    check_pruned(&s, &gp, "selected layers 1 and 3")?;
    Ok(())
}

/// Without a glimpse token (Qwen2.5-VL's `le_layers` empty) the prompt is
/// the dense one: keeping everything is the dense model; pruning reads the
/// last prompt token's attention, which must be text.
#[test]
fn without_a_glimpse_token_the_last_prompt_token_is_read() -> Result<()> {
    let s = setup()?;
    let none = |c: &mut GlimpseConfig| c.embeddings = None;
    let gp = glimpse_with(&s, KeepRule::keep_all(), 3, none)?;
    assert!(gp.named_tensors().iter().all(|(n, _)| !n.starts_with("le")));
    let run = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, STEPS)?;
    let dense = s.model.generate_dense(
        &s.model.build_prompt(&s.pixels, &s.system, &s.questions)?,
        STEPS,
    )?;
    assert_eq!(run.generation.tokens, dense.tokens);
    assert_steps_close(
        &run.generation.logits,
        &dense.logits,
        1e-4,
        "no glimpse token",
    )?;
    check_pruned(
        &s,
        &glimpse_with(&s, rule(0.4, 3), 3, none)?,
        "no glimpse token",
    )?;
    let err = gp
        .generate(
            &s.model,
            &s.pixels,
            &s.system,
            &[vec![], s.questions[1].clone()],
            2,
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("row 0 ends with its image"),
        "{err}"
    );
    Ok(())
}

/// A pruning layer at or past the last layer (Qwen2.5-VL's default 1000)
/// prunes the caches of every layer after the whole prefill.
#[test]
fn pruning_after_the_whole_prefill() -> Result<()> {
    let s = setup()?;
    for k in [5, 1000] {
        let gp = glimpse_with(&s, rule(0.4, 3), 3, |c| c.reduce_layer = k)?;
        check_pruned(&s, &gp, &format!("reduce_layer {k}"))?;
    }
    Ok(())
}

/// How far the keep rule's decisions on importance logits `z` are from
/// changing (relative to the logits' size): the threshold's margin where it
/// decides, the cap's boundary gap where it does, and min_keep's boundary
/// gap where that adds tokens. Anchors are added after the rule and decide
/// nothing.
fn rule_margin(z: &[f32], rule: &KeepRule) -> f64 {
    let rel = |gap: f64, at: f64| gap / (1.0 + at.abs());
    let mut v: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(|a, b| b.total_cmp(a));
    let nv = v.len();
    let t = f64::from(rule.threshold);
    let theta = (t / (1.0 - t)).ln();
    let over = v.iter().filter(|&&x| x > theta).count();
    let cap = rule.max_ratio.map(|r| (r * nv as f64).floor() as usize);
    let gap_at = |n: usize| {
        if n == 0 || n >= nv {
            f64::INFINITY
        } else {
            rel(v[n - 1] - v[n], v[n - 1])
        }
    };
    let mut margin = match cap {
        // The cap decides: the top `cap` are kept while more than `cap` pass.
        Some(c) if over > c => gap_at(c).min(rel(v[c] - theta, v[c])),
        // The threshold decides which pass, and that no more than `cap` do.
        _ => {
            let above = if over > 0 {
                rel(v[over - 1] - theta, v[over - 1])
            } else {
                f64::INFINITY
            };
            let below = if over < nv {
                rel(theta - v[over], v[over])
            } else {
                f64::INFINITY
            };
            above.min(below)
        }
    };
    let kept = cap.map_or(over, |c| over.min(c));
    if kept < rule.min_keep.min(nv) {
        margin = margin.min(gap_at(rule.min_keep.min(nv)));
    }
    margin
}

/// The runs the GPU test (tests/gpu/glimpse.rs) compares with the CPU decide
/// every kept token and every greedy token by far more than the devices'
/// f32 rounding, so comparing those decisions exactly across devices is
/// sound: the importance logits clear the keep rule by DECISION_MARGIN, the
/// tokens (dense and pruned) by twice GPU_LOGIT_TOL.
#[test]
fn gpu_test_runs_decide_with_margins() -> Result<()> {
    let dev = Device::Cpu;
    let (cfg, model, pixels) = glimpse_inputs::model_and_images(&dev)?;
    let (system, questions) = system_and_questions();
    let prompt = model.build_prompt(&pixels, &system, &questions)?;
    assert_token_margins(
        &model.generate_dense(&prompt, glimpse_inputs::STEPS)?.logits,
        "dense",
    )?;
    let vit = model.vision.forward(&pixels)?;
    let embeds = model.projector.forward(&vit[cfg.feature_layer_index()])?;
    for (name, gcfg) in glimpse_inputs::settings(&cfg) {
        let gp = glimpse_inputs::method(&cfg, &gcfg, &dev)?;
        let run = gp.generate(&model, &pixels, &system, &questions, glimpse_inputs::STEPS)?;
        assert_token_margins(&run.generation.logits, name)?;
        let prompt = gp.prompt(&model, &embeds, &system, &questions)?;
        let (_, _, attention) = gp.prefill_to_layer_k(&model, &prompt)?;
        let z = gp.importance(&model, &attention, &vit)?.to_vec2::<f32>()?;
        for (b, zb) in z.iter().enumerate() {
            assert!(
                run.kept[b].len() < run.visual[b],
                "{name}, row {b}: the GPU test needs real pruning"
            );
            let margin = rule_margin(zb, &gcfg.rule);
            assert!(
                margin >= DECISION_MARGIN,
                "{name}, row {b}: a keep decision is only {margin:e} from changing"
            );
        }
    }
    Ok(())
}
