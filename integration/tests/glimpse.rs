//! GlimpsePrune in the model: with every visual token kept it is the dense
//! model; with real pruning, decoding on the compacted cache is decoding with
//! the pruned tokens masked out after layer K (one-shot pruning); decoding
//! continues where the dense layout ends; a row that pruning could empty is
//! refused.

use candle_core::{DType, Device, Result, Tensor};
use foveal::KeepRule;
use foveal_candle::images::synthetic_images;
use foveal_candle::{
    attention_mask, GlimpseConfig, GlimpsePrune, GlimpseRun, ImageMethod, ImageQuestions,
    LlavaModel, Method, ModelConfig,
};

mod common;
use common::{
    assert_decodes_from, assert_row_alone_as_in_batch, assert_steps_close, logits_at, mask_columns,
    max_abs_diff, replay_steps, system_and_questions,
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
    let mut gcfg = GlimpseConfig::for_model(&s.cfg);
    gcfg.rule = rule;
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
            d.push(seq - 1);
            d
        })
        .collect();
    let k = gp.config().reduce_layer;
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
