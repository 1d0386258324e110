//! GlimpsePrune in the model: with every visual token kept it is the dense
//! model; with real pruning, decoding on the compacted cache is decoding with
//! the pruned tokens masked out after layer K (one-shot pruning).

use candle_core::{DType, Device, Result, Tensor};
use foveal::KeepRule;
use foveal_candle::images::synthetic_images;
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{
    attention_mask, GlimpseConfig, GlimpsePrune, LlavaModel, Method, ModelConfig, MASK_MIN,
};

mod common;
use common::max_abs_diff;

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
    // Questions of different lengths: a ragged, left-padded batch.
    let questions = vec![
        byte_tokens("Where is the red square?"),
        byte_tokens("Count the shapes."),
    ];
    Ok(Setup {
        system: byte_tokens("You see an image."),
        questions,
        pixels,
        model,
        cfg,
    })
}

#[test]
fn keeping_every_visual_token_equals_the_dense_model() -> Result<()> {
    let s = setup()?;
    let mut gcfg = GlimpseConfig::for_model(&s.cfg);
    gcfg.rule = KeepRule::keep_all();
    let gp = GlimpsePrune::seeded(&s.cfg, &gcfg, 3, &Device::Cpu, DType::F32)?;
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

/// One-shot pruning at layer K: layers 0..=K see every token; from layer K+1
/// on, and at every layer while decoding, the pruned visual tokens and the
/// glimpse token are gone. The reference runs the same model densely over the
/// whole sequence with those keys masked out from layer K+1 on (kept tokens
/// at their original positions), and must give the logits of the compacted run.
#[test]
fn decoding_on_the_compacted_cache_equals_masking_the_pruned_tokens() -> Result<()> {
    let s = setup()?;
    let mut gcfg = GlimpseConfig::for_model(&s.cfg);
    gcfg.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.4),
        min_keep: 3,
    };
    let gp = GlimpsePrune::seeded(&s.cfg, &gcfg, 3, &Device::Cpu, DType::F32)?;
    let run = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, STEPS)?;
    for (b, kept) in run.kept.iter().enumerate() {
        assert!(
            !kept.is_empty() && kept.len() < run.visual[b],
            "row {b}: kept {} of {}: the test needs real pruning",
            kept.len(),
            run.visual[b]
        );
    }

    // The reference: the same glimpse prompt and layers 0..=K ...
    let dec = &s.model.decoder;
    let vit = s.model.vision.forward(&s.pixels)?;
    let embeds = s
        .model
        .projector
        .forward(&vit[s.cfg.feature_layer_index()])?;
    let prompt = gp.prompt(&s.model, &embeds, &s.system, &s.questions)?;
    let (h, mut cache, _) = gp.prefill_to_layer_k(&s.model, &prompt)?;
    // ... then every later layer with the pruned keys and the glimpse masked.
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
    let masked = |mask: Tensor| -> Result<Tensor> {
        let (b, _, q, kv) = mask.dims4()?;
        let mut m = mask.flatten_all()?.to_vec1::<f32>()?;
        for (row, cols) in dropped.iter().enumerate() {
            for i in 0..q {
                for &c in cols {
                    m[(row * q + i) * kv + c] = MASK_MIN;
                }
            }
        }
        Tensor::from_vec(m, (b, 1, q, kv), &Device::Cpu)
    };
    let mask = masked(prompt.mask()?)?;
    let h = dec.forward_layers(
        &h,
        &prompt.positions,
        Some(&mask),
        gcfg.layer + 1..dec.num_layers(),
        &mut cache,
    )?;
    // The last kept token is the one before the glimpse.
    let first = dec.logits(&h.narrow(1, seq - 2, 1)?)?.squeeze(1)?;
    let d = max_abs_diff(&first, &run.generation.logits[0])?;
    assert!(d < 1e-4, "prefill: logits differ by {d}");

    let mut pos: Vec<u32> = prompt.next_positions().iter().map(|p| p - 1).collect();
    for step in 1..STEPS {
        let tokens: Vec<u32> = run.generation.tokens.iter().map(|t| t[step - 1]).collect();
        let ids = Tensor::from_slice(&tokens, (tokens.len(), 1), &Device::Cpu)?;
        let p = Tensor::from_slice(&pos, (pos.len(), 1), &Device::Cpu)?;
        let kv_len = cache.seq_len(0) + 1;
        let mask = masked(attention_mask(&prompt.starts, 1, kv_len, &Device::Cpu)?)?;
        let h = dec.forward_layers(
            &dec.embed(&ids)?,
            &p,
            Some(&mask),
            0..dec.num_layers(),
            &mut cache,
        )?;
        let d = max_abs_diff(&dec.last_logits(&h)?, &run.generation.logits[step])?;
        assert!(d < 1e-4, "decode step {step}: logits differ by {d}");
        pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(())
}

#[test]
fn glimpse_weights_round_trip_through_safetensors() -> Result<()> {
    let s = setup()?;
    let mut gcfg = GlimpseConfig::for_model(&s.cfg);
    gcfg.rule = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.5),
        min_keep: 1,
    };
    let gp = GlimpsePrune::seeded(&s.cfg, &gcfg, 9, &Device::Cpu, DType::F32)?;
    let path =
        std::env::temp_dir().join(format!("foveal-glimpse-{}.safetensors", std::process::id()));
    gp.save_safetensors(&path)?;
    let loaded = GlimpsePrune::load_safetensors(&path, &s.cfg, &gcfg, &Device::Cpu, DType::F32)?;
    std::fs::remove_file(&path).ok();
    let a = gp.generate(&s.model, &s.pixels, &s.system, &s.questions, 2)?;
    let b = loaded.generate(&s.model, &s.pixels, &s.system, &s.questions, 2)?;
    assert_eq!(a.kept, b.kept);
    assert_eq!(a.generation.tokens, b.generation.tokens);
    let other = GlimpsePrune::seeded(&s.cfg, &gcfg, 10, &Device::Cpu, DType::F32)?.generate(
        &s.model,
        &s.pixels,
        &s.system,
        &s.questions,
        2,
    )?;
    assert_ne!(
        a.kept, other.kept,
        "another seed must select differently (the round trip would otherwise prove nothing)"
    );
    Ok(())
}
