//! Hugging Face model folders: a small LLaVA folder (config.json with
//! llava-hf's nested configs, two safetensors shards with their index, a
//! tokenizer.json made with the tokenizers crate) written to a temporary
//! folder and loaded back; the config fields read and defaulted; the
//! settings and folders refused.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use foveal_candle::hf_folder::INDEX_FILE;
use foveal_candle::{HfFolder, LlavaModel, ModelConfig, NameLayout, TextConfig};
use serde_json::{json, Value};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

/// [`ModelConfig::tiny`] as llava-hf writes it: only what differs from
/// the config classes' defaults (no head_dim, no tie_word_embeddings, no
/// layer_norm_eps).
fn tiny_config() -> Value {
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 500,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "gelu",
            "projection_dim": 64
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 512,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": false,
            "sliding_window": 4096,
            "rope_scaling": null
        },
        "torch_dtype": "float32"
    })
}

const WORDS: [&str; 6] = ["[UNK]", "a", "chat", "about", "an", "image"];

/// Writes `model`'s tensors in two shards (renamed by `rename`), their
/// index, `config` and a word-level tokenizer.json into `dir`.
fn write_folder(dir: &Path, model: &LlavaModel, config: &Value, rename: impl Fn(&str) -> String) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let named = model.named_tensors();
    let half = named.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&named[..half], &named[half..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let map: HashMap<String, Tensor> =
            part.iter().map(|(n, t)| (rename(n), t.clone())).collect();
        for n in map.keys() {
            weight_map.insert(n.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&map, dir.join(&file)).unwrap();
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();

    let vocab = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

fn seeded_tiny() -> LlavaModel {
    LlavaModel::seeded(&ModelConfig::tiny(), 11, &Device::Cpu, DType::F32).unwrap()
}

fn assert_same_weights(a: &LlavaModel, b: &LlavaModel) {
    let (na, nb) = (a.named_tensors(), b.named_tensors());
    assert_eq!(na.len(), nb.len());
    for ((n1, t1), (n2, t2)) in na.iter().zip(&nb) {
        assert_eq!(n1, n2);
        let (v1, v2) = (
            t1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(t1.dims(), t2.dims(), "{n1}");
        assert!(v1 == v2, "{n1} differs after loading");
    }
}

#[test]
fn sharded_folder_loads_weights_config_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = seeded_tiny();
    write_folder(dir.path(), &model, &tiny_config(), str::to_string);
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.config, ModelConfig::tiny());
    assert_eq!(folder.shards.len(), 2);
    assert_eq!(folder.layout, NameLayout::Llava);
    let loaded = folder.load_model(DType::F32, &Device::Cpu).unwrap();
    assert_same_weights(&model, &loaded);
    assert_eq!(
        folder.encode("a chat about an image").unwrap(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(folder.encode("a dog").unwrap(), vec![1, 0]);
    assert_eq!(
        folder.decode(&[2, 5]).unwrap().as_deref(),
        Some("chat image")
    );
}

#[test]
fn transformers_4_52_names_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = seeded_tiny();
    let rename = |n: &str| {
        if let Some(rest) = n.strip_prefix("language_model.model.") {
            format!("model.language_model.{rest}")
        } else if let Some(rest) = n.strip_prefix("language_model.") {
            rest.to_string()
        } else {
            format!("model.{n}")
        }
    };
    write_folder(dir.path(), &model, &tiny_config(), rename);
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.layout, NameLayout::Transformers452);
    assert_same_weights(
        &model,
        &folder.load_model(DType::F32, &Device::Cpu).unwrap(),
    );
}

#[test]
fn missing_shard_and_index_naming_a_missing_tensor_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), &seeded_tiny(), &tiny_config(), str::to_string);
    let index_path = dir.path().join(INDEX_FILE);
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();

    let mut bad = index.clone();
    bad["weight_map"]["language_model.model.extra.weight"] =
        "model-00002-of-00002.safetensors".into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("language_model.model.extra.weight"), "{err}");

    std::fs::write(&index_path, index.to_string()).unwrap();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");

    std::fs::remove_file(&index_path).unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no model.safetensors.index.json"), "{err}");
}

#[test]
fn head_dim_derived_or_read_and_tie_default() {
    let mut cfg = tiny_config();
    let text = TextConfig::from_hf_json(&cfg.to_string()).unwrap();
    assert_eq!((text.head_dim, text.tie_word_embeddings), (64, false));
    assert_eq!(text.num_kv_heads, 2);
    cfg["text_config"]["head_dim"] = 32.into();
    cfg["tie_word_embeddings"] = true.into();
    let text = TextConfig::from_hf_json(&cfg.to_string()).unwrap();
    assert_eq!((text.head_dim, text.tie_word_embeddings), (32, true));
    // The text object's own setting wins over the top level's.
    cfg["text_config"]["tie_word_embeddings"] = false.into();
    assert!(
        !TextConfig::from_hf_json(&cfg.to_string())
            .unwrap()
            .tie_word_embeddings
    );
    // No num_key_value_heads: as many as query heads.
    cfg["text_config"]
        .as_object_mut()
        .unwrap()
        .remove("num_key_value_heads");
    assert_eq!(
        TextConfig::from_hf_json(&cfg.to_string())
            .unwrap()
            .num_kv_heads,
        4
    );
}

#[test]
fn text_fields_of_qwen2_and_qwen2_5_vl_configs() {
    // A Qwen2 config (and Qwen2.5-VL's before transformers 4.53): text fields
    // at the top level; omitted fields take Qwen2Config's defaults.
    let qwen2 = json!({
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 24,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": true
    });
    let t = TextConfig::from_hf_json(&qwen2.to_string()).unwrap();
    assert_eq!(
        (
            t.head_dim,
            t.num_kv_heads,
            t.vocab_size,
            t.intermediate_size
        ),
        (64, 2, 151_936, 22_016)
    );
    assert_eq!(
        (t.rope_theta, t.rms_norm_eps, t.tie_word_embeddings),
        (1e6, 1e-6, true)
    );
    // Qwen2.5-VL's multimodal RoPE is refused, not ignored.
    let mut vl = qwen2.clone();
    vl["model_type"] = "qwen2_5_vl".into();
    vl["rope_scaling"] = json!({"type": "mrope", "mrope_section": [16, 24, 24]});
    let err = TextConfig::from_hf_json(&vl.to_string())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rope_scaling") && err.contains("mrope"),
        "{err}"
    );
    // Later Qwen2.5-VL: nested text_config.
    let nested = json!({"model_type": "qwen2_5_vl", "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 128, "num_attention_heads": 2}});
    assert_eq!(
        TextConfig::from_hf_json(&nested.to_string())
            .unwrap()
            .head_dim,
        64
    );
}

#[test]
fn unimplemented_settings_are_refused() {
    let refused = |edit: &dyn Fn(&mut Value), needle: &str| {
        let mut cfg = tiny_config();
        edit(&mut cfg);
        let err = ModelConfig::from_hf_json(&cfg.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    };
    refused(
        &|c| c["text_config"]["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0}),
        "rope_scaling",
    );
    refused(
        &|c| c["text_config"]["rope_scaling"] = json!({"type": "linear", "factor": 2.0}),
        "linear",
    );
    refused(
        &|c| c["text_config"]["use_sliding_window"] = true.into(),
        "sliding",
    );
    refused(
        &|c| c["text_config"]["model_type"] = "llama".into(),
        "llama",
    );
    refused(
        &|c| c["text_config"]["hidden_act"] = "gelu".into(),
        "hidden_act",
    );
    refused(
        &|c| c["vision_config"]["model_type"] = "siglip_vision_model".into(),
        "siglip_vision_model",
    );
    refused(
        &|c| c["model_type"] = "llava_onevision".into(),
        "llava_onevision",
    );
    refused(
        &|c| c["vision_feature_select_strategy"] = "full".into(),
        "full",
    );
    refused(
        &|c| c["vision_feature_layer"] = json!([-2, -5]),
        "vision_feature_layer",
    );
    refused(
        &|c| {
            c.as_object_mut().unwrap().remove("vision_config");
        },
        "no vision_config",
    );
    refused(
        &|c| {
            c["text_config"]["hidden_size"] = 250.into();
        },
        "head_dim",
    );
    // What is implemented is read: plain RoPE named explicitly, a sliding
    // window configured but not in use.
    let mut ok = tiny_config();
    ok["text_config"]["rope_scaling"] = json!({"rope_type": "default"});
    assert_eq!(
        ModelConfig::from_hf_json(&ok.to_string()).unwrap(),
        ModelConfig::tiny()
    );
}

#[test]
fn clip_defaults_where_fields_are_absent() {
    // llava-hf's LLaVA-1.5 vision_config lists no hidden_act: CLIP's quick_gelu.
    let mut cfg = tiny_config();
    cfg["vision_config"]
        .as_object_mut()
        .unwrap()
        .remove("hidden_act");
    let m = ModelConfig::from_hf_json(&cfg.to_string()).unwrap();
    assert!(m.vision.quick_gelu);
    assert_eq!(m.vision.layer_norm_eps, 1e-5);
}

#[test]
fn main_job_runs_a_model_folder_and_writes_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    std::fs::create_dir(&folder).unwrap();
    write_folder(&folder, &seeded_tiny(), &tiny_config(), str::to_string);
    let image = dir.path().join("image.png");
    image::RgbImage::from_fn(80, 64, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 4) as u8, 90])
    })
    .save(&image)
    .unwrap();
    let out = dir.path().join("pictures");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_foveal"))
        .args(["--model", folder.to_str().unwrap()])
        .args(["--image", image.to_str().unwrap()])
        .args(["--prompt", "a chat about an image"])
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{stdout}");
    // The folder has no method weights: each method says it is seeded.
    assert!(
        stdout.contains("GlimpsePrune: learned parts SEEDED"),
        "{stdout}"
    );
    for name in ["GlimpsePrune", "FocusLLaVA", "Gaze_Attention"] {
        let png = out.join(format!("image-row0-{name}.png"));
        let img = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(img.width() >= 256, "{name}");
    }

    // Bad flags and a bad folder: a clear message, exit codes 2 and 1.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_foveal"))
        .args(["--model"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--model <DIR>"));
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_foveal"))
        .args(["--model", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("config.json"));
}
