//! GlimpsePrune's settings and learned parts as its authors save them:
//! their directory (config.json and new_modules_gp.pt, written by
//! scripts/make-glimpse-fixture.py the way torch.save writes it) loads as it
//! is, with the values a safetensors copy of the same tensors holds, and
//! runs the same; the parameter names are theirs; their two released
//! settings read from their YAML keys.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Activation, VarBuilder};
use foveal::{KeepRule, ScoreMode};
use foveal_candle::images::synthetic_images;
use foveal_candle::vip::{merge_unit_mean, Vip, VipConfig};
use foveal_candle::{
    Anchor, BaseModel, EmbeddingConfig, GlimpseConfig, GlimpsePrune, LeNorm, LlavaModel, Method,
    ModelConfig, Predictor, UpstreamConfig,
};

mod common;
use common::{max_abs_diff, system_and_questions};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/glimpse_upstream")
}

/// The fixture's model: the built-in tiny model, narrower (decoder width 64
/// with 4 query heads, ViT width 32).
fn small_model() -> ModelConfig {
    let mut cfg = ModelConfig::tiny();
    cfg.text.hidden_size = 64;
    cfg.text.head_dim = 16;
    cfg.text.intermediate_size = 128;
    cfg.vision.hidden_size = 32;
    cfg.vision.num_heads = 2;
    cfg.vision.intermediate_size = 64;
    cfg
}

#[test]
fn the_authors_saved_modules_load_as_they_are() -> Result<()> {
    let cfg = small_model();
    let dev = Device::Cpu;
    let gp = GlimpsePrune::load_upstream(fixture(), &cfg, &dev, DType::F32)?;

    // config.json, read by its keys.
    let want = GlimpseConfig {
        selected_layers: vec![3],
        reduce_layer: 3,
        mode: ScoreMode::LogSoftmax,
        rule: KeepRule {
            threshold: 0.5,
            max_ratio: Some(0.5),
            min_keep: 1,
        },
        anchors: vec![Anchor::TopLeft, Anchor::BottomRight],
        embeddings: Some(EmbeddingConfig {
            layers: vec![0, 1, 2, 3],
            norm: LeNorm::RmsNorm { eps: 1e-5 },
        }),
        predictor: Predictor::Vip(VipConfig {
            in_features: 4,
            vision_hidden: 32,
            hidden: 16,
            cond: Some(16),
            heads: 2,
            layers: 2,
            act: Activation::Silu,
        }),
        visual_layers: vec![3, 1],
        merge_unit: 1,
    };
    assert_eq!(gp.config(), &want);

    // Every tensor read from the pickle equals the safetensors copy, and the
    // modules fetched all of it but deep supervision's unused projection.
    let st = candle_core::safetensors::load(fixture().join("new_modules_gp.safetensors"), &dev)?;
    let named: HashMap<String, Tensor> = gp.named_tensors().into_iter().collect();
    let unused: BTreeSet<String> = st
        .keys()
        .filter(|k| !named.contains_key(*k))
        .cloned()
        .collect();
    assert_eq!(
        unused,
        BTreeSet::from([
            "attn_fuser.attn_out_projs.0.weight".to_string(),
            "attn_fuser.attn_out_projs.0.bias".to_string()
        ])
    );
    for (name, t) in &named {
        let s = st[name].to_dtype(DType::F32)?;
        assert_eq!(t.dims(), s.dims(), "{name}");
        assert_eq!(max_abs_diff(t, &s)?, 0.0, "{name}");
    }

    // The same modules from the pickle and from the safetensors copy run
    // the same, under a rule that really prunes (the top quarter by
    // importance, plus the anchors).
    let mut pruning = gp.config().clone();
    pruning.rule = KeepRule {
        threshold: 0.0,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    let model = LlavaModel::seeded(&cfg, 11, &dev, DType::F32)?;
    let (pixels, _) = synthetic_images(2, cfg.vision.image_size, 5, &dev)?;
    let (system, questions) = system_and_questions();
    let mut runs = Vec::new();
    for file in ["new_modules_gp.pt", "new_modules_gp.safetensors"] {
        let path = fixture().join(file);
        let gp = if file.ends_with(".pt") {
            GlimpsePrune::load_pth(path, &cfg, &pruning, &dev, DType::F32)?
        } else {
            GlimpsePrune::load_safetensors(path, &cfg, &pruning, &dev, DType::F32)?
        };
        runs.push(gp.generate(&model, &pixels, &system, &questions, 3)?);
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a.kept, b.kept);
    assert_eq!(a.generation.tokens, b.generation.tokens);
    for (x, y) in a.generation.logits.iter().zip(&b.generation.logits) {
        assert_eq!(max_abs_diff(x, y)?, 0.0);
    }
    // The anchors (top left, bottom right of the 8 x 8 grid) are kept on
    // top of the cap's 16.
    for kept in &a.kept {
        assert!(kept.contains(&0) && kept.contains(&63), "{kept:?}");
        assert!((16..=18).contains(&kept.len()), "{}", kept.len());
    }
    assert_ne!(
        a.kept[0], a.kept[1],
        "the rows' questions select differently"
    );
    Ok(())
}

/// The names a module fetches are the authors' (`attn_fuser.*` as their
/// `AttnFuserV1` state dict, `learnable_embeddings`, `le_proj.*`, `le_norm.*`).
#[test]
fn the_parameter_names_are_the_authors() -> Result<()> {
    let cfg = ModelConfig::tiny();
    let gcfg = GlimpseConfig::for_model(&cfg);
    let gp = GlimpsePrune::seeded(&cfg, &gcfg, 1, &Device::Cpu, DType::F32)?;
    let got: BTreeSet<String> = gp.named_tensors().into_iter().map(|(n, _)| n).collect();
    let mut want: BTreeSet<String> = [
        "learnable_embeddings",
        "le_proj.weight",
        "le_proj.bias",
        "le_norm.weight",
    ]
    .map(String::from)
    .into();
    let f = |s: &str| format!("attn_fuser.{s}");
    want.extend([f("attn_in_proj.weight"), f("attn_in_proj.bias")]);
    for m in 0..4 {
        want.extend([
            f(&format!("cond_in_projs.{m}.weight")),
            f(&format!("cond_in_projs.{m}.bias")),
        ]);
        for p in [
            "norm1.weight",
            "norm2.weight",
            "attn.q_proj.weight",
            "attn.k_proj.weight",
            "attn.v_proj.weight",
            "attn.o_proj.weight",
        ] {
            want.insert(f(&format!("layers.{m}.{p}")));
        }
        for p in ["gate_proj", "up_proj", "down_proj"] {
            want.extend([
                f(&format!("layers.{m}.mlp.{p}.weight")),
                f(&format!("layers.{m}.mlp.{p}.bias")),
            ]);
        }
    }
    want.extend([f("attn_out_projs.3.weight"), f("attn_out_projs.3.bias")]);
    assert_eq!(got, want);
    let shapes: HashMap<String, Vec<usize>> = gp
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    // E = 64, F = 128, q/k of [x; c] square 192, 6 decoder layers of width 256.
    assert_eq!(shapes["learnable_embeddings"], [6, 1, 256]);
    assert_eq!(shapes["attn_fuser.attn_in_proj.weight"], [64, 4]);
    assert_eq!(shapes["attn_fuser.cond_in_projs.0.weight"], [128, 128]);
    assert_eq!(shapes["attn_fuser.layers.0.attn.q_proj.weight"], [192, 192]);
    assert_eq!(shapes["attn_fuser.layers.0.attn.v_proj.weight"], [64, 64]);
    assert_eq!(
        shapes["attn_fuser.layers.0.mlp.gate_proj.weight"],
        [128, 64]
    );
    Ok(())
}

/// The released settings, from YAML files with the authors' keys, equal
/// the constructors and give the paper's Table 14 predictor.
#[test]
fn the_released_settings_read_from_their_yaml_keys() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let llava = UpstreamConfig::from_file(dir.join("llava1_5_7b_gp.yaml"))?;
    let qwen = UpstreamConfig::from_file(dir.join("qwen2_5_7b_gp.yaml"))?;
    assert_eq!(llava, UpstreamConfig::llava_1_5_7b());
    assert_eq!(qwen, UpstreamConfig::qwen2_5_vl_7b());
    assert_eq!(llava.base_model()?, BaseModel::Llava);
    assert_eq!(qwen.base_model()?, BaseModel::Qwen25Vl);

    let l = GlimpseConfig::from_upstream(&llava, None)?;
    assert_eq!(
        (l.selected_layers.as_slice(), l.reduce_layer, l.mode),
        ([21].as_slice(), 21, ScoreMode::LogSoftmax)
    );
    assert_eq!(l.visual_layers, [23, 17, 11, 5]);
    assert_eq!(l.merge_unit, 1);
    assert_eq!(
        l.embeddings.as_ref().map(|e| (e.layers.len(), e.norm)),
        Some((32, LeNorm::RmsNorm { eps: 1e-5 }))
    );
    let Predictor::Vip(lv) = &l.predictor else {
        panic!("LLaVA runs the predictor")
    };
    assert_eq!(
        (
            lv.in_features,
            lv.vision_hidden,
            lv.hidden,
            lv.cond,
            lv.heads,
            lv.layers
        ),
        (32, 1024, 256, Some(512), 4, 4)
    );
    assert_eq!(lv.qk_head_dim(), 192);

    let q = GlimpseConfig::from_upstream(&qwen, None)?;
    assert_eq!(
        (q.selected_layers.as_slice(), q.reduce_layer, q.mode),
        ([18].as_slice(), 18, ScoreMode::Logits)
    );
    // Vision blocks 31, 23, 15, 7 are hidden states 32, 24, 16, 8.
    assert_eq!(q.visual_layers, [32, 24, 16, 8]);
    assert_eq!(q.merge_unit, 4);
    assert_eq!(
        q.embeddings.as_ref().map(|e| (e.layers.len(), e.norm)),
        Some((28, LeNorm::RmsNorm { eps: 1e-6 }))
    );
    let Predictor::Vip(qv) = &q.predictor else {
        panic!("Qwen2.5-VL runs the predictor")
    };
    assert_eq!(
        (
            qv.in_features,
            qv.vision_hidden,
            qv.hidden,
            qv.cond,
            qv.heads,
            qv.layers
        ),
        (28, 1280, 256, Some(512), 4, 4)
    );

    // The Qwen2.5-VL predictor at its real sizes runs on merged features
    // (zero weights: shapes only) over a 3 x 5 grid of merged tokens.
    let vip = Vip::new(VarBuilder::zeros(DType::F32, &Device::Cpu), qv)?;
    let attn = Tensor::zeros((1, 15, 28), DType::F32, &Device::Cpu)?;
    let patches = Tensor::ones((1, 60, 1280), DType::F32, &Device::Cpu)?;
    let feats = vec![merge_unit_mean(&patches, q.merge_unit)?; 4];
    assert_eq!(vip.forward(&attn, &feats, &[vec![(3, 5)]])?.dims(), [1, 15]);

    // It does not run on the LLaVA-style model, which merges no patches.
    let err =
        GlimpsePrune::seeded(&ModelConfig::tiny(), &q, 1, &Device::Cpu, DType::F32).unwrap_err();
    assert!(err.to_string().contains("merge units"), "{err}");
    Ok(())
}

/// Keys left out take the authors' defaults for the base model; keys only
/// training reads, and repeated ones, are ignored; what foveal does not
/// implement is refused by name.
#[test]
fn settings_defaults_and_refusals() -> Result<()> {
    let yaml = "model_name_or_path: liuhaotian/llava-v1.5-7b\nbf16: true\nbf16: true\nlearning_rate: 1e-4\nnum_attention_heads: 32\nmm_hidden_size: 1024\nrms_norm_eps: 1.0e-5\nmin_remain_num: null\nmax_remain_ratio: 0.111\nanchor_positions: [tl, tr, bl, br]\n";
    let up = UpstreamConfig::from_yaml(yaml)?;
    let cfg = GlimpseConfig::from_upstream(&up, None)?;
    assert_eq!(cfg.selected_layers, [21]);
    assert_eq!(cfg.visual_layers, [23, 17, 11, 5]);
    assert_eq!(cfg.rule.min_keep, 0);
    let cap = cfg.rule.max_ratio.expect("a cap");
    assert!((cap - 0.111).abs() < 1e-6, "{cap}");
    assert_eq!(
        cfg.anchors,
        [
            Anchor::TopLeft,
            Anchor::TopRight,
            Anchor::BottomLeft,
            Anchor::BottomRight
        ]
    );
    let Predictor::Vip(v) = &cfg.predictor else {
        panic!()
    };
    // visual_cond_size defaults to 256 in the authors' config classes.
    assert_eq!(v.cond, Some(256));

    let refused = [
        ("model_type: qwen2_5_vl_gp\nselected_layers: [18]\nreduce_layer: 18\nnum_attention_heads: 28\nrms_norm_eps: 1.0e-6\nvision_config: {hidden_size: 1280}\n", "attn_fuse_global"),
        ("model_type: llava_llama_gp\nle_length: 2\nrms_norm_eps: 1.0e-5\n", "le_length 2"),
        ("model_type: llava_llama_gp\nle_layers: []\n", "always appends"),
        ("model_type: llava_llama_gp\nle_layers: [1, 2]\nrms_norm_eps: 1.0e-5\nnum_attention_heads: 32\nmm_hidden_size: 1024\n", "lack layer 0"),
        ("model_type: llava_llama_gp\nselected_layers: [22]\nrms_norm_eps: 1.0e-5\nnum_attention_heads: 32\nmm_hidden_size: 1024\n", "after the pruning layer"),
        ("model_name_or_path: some/other-model\n", "names LLaVA or Qwen2.5-VL"),
    ];
    for (yaml, what) in refused {
        let err =
            GlimpseConfig::from_upstream(&UpstreamConfig::from_yaml(yaml)?, None).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // The settings' base-model sizes must be the model's.
    let err =
        GlimpseConfig::from_upstream(&UpstreamConfig::llava_1_5_7b(), Some(&ModelConfig::tiny()))
            .unwrap_err();
    assert!(
        err.to_string()
            .contains("num_hidden_layers 32 in the settings, the model's is 6"),
        "{err}"
    );
    // A base-model size neither in the settings nor given by a model.
    let err = GlimpseConfig::from_upstream(
        &UpstreamConfig::from_yaml("model_type: llava_llama_gp\nrms_norm_eps: 1.0e-5\n")?,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("num_attention_heads"), "{err}");
    Ok(())
}
