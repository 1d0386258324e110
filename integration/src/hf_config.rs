//! A Hugging Face `config.json` read into [`ModelConfig`] / [`TextConfig`]
//! / [`VisionConfig`], as transformers reads it: a field the file leaves out
//! takes the default of its config class (`Qwen2Config` for the text
//! model, `CLIPVisionConfig` for the tower, `LlavaConfig` for the rest), and
//! a setting foveal-candle's model does not implement is refused with an
//! error naming it, never ignored. docs/architecture.md, "Hugging Face
//! model folders", lists the fields read and refused.
//!
//! - Text fields ([`TextConfig::from_hf_json`]): the object itself (Qwen2,
//!   Qwen2.5-VL before transformers 4.53) or its `text_config` (LLaVA,
//!   LLaVA-OneVision, later Qwen2.5-VL). `head_dim` is
//!   `hidden_size / num_attention_heads` when absent, `num_key_value_heads`
//!   is `num_attention_heads` when absent, `tie_word_embeddings` is read from
//!   the text object, then the top level, else `false` (`Qwen2Config`'s
//!   default). Refused: a text `model_type` other than Qwen2's (the decoder
//!   has Qwen2's q/k/v biases), `hidden_act` other than `silu`,
//!   `rope_scaling` other than absent / `null` / `{"rope_type": "default"}`
//!   (Qwen2.5-VL's `mrope`, YaRN, linear, dynamic ...), a sliding window in
//!   use (`use_sliding_window: true`).
//! - The whole model ([`ModelConfig::from_hf_json`]): LLaVA (`model_type`
//!   `llava` or absent) with a CLIP `vision_config`. Refused: other
//!   top-level model types (LLaVA-NeXT / OneVision's any-resolution tiling
//!   and `image_newline`, Qwen2.5-VL's tower), a SigLIP or other tower, a
//!   list of feature layers, `vision_feature_select_strategy` `full` (the
//!   model drops the class token), no `vision_config` (a text-only model).

use std::path::Path;

use candle_core::{bail, Result};
use candle_nn::Activation;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{ModelConfig, TextConfig, VisionConfig};

/// The text fields, `Qwen2Config`'s defaults where absent.
#[derive(Deserialize)]
struct HfText {
    model_type: Option<String>,
    #[serde(default = "qwen2::vocab_size")]
    vocab_size: usize,
    #[serde(default = "qwen2::hidden_size")]
    hidden_size: usize,
    #[serde(default = "qwen2::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "qwen2::layers")]
    num_hidden_layers: usize,
    #[serde(default = "qwen2::heads")]
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "qwen2::rope_theta")]
    rope_theta: f64,
    #[serde(default = "qwen2::rms_norm_eps")]
    rms_norm_eps: f64,
    tie_word_embeddings: Option<bool>,
    #[serde(default = "qwen2::hidden_act")]
    hidden_act: String,
    rope_scaling: Option<Value>,
    #[serde(default)]
    use_sliding_window: bool,
}

/// `Qwen2Config`'s defaults (transformers).
mod qwen2 {
    pub fn vocab_size() -> usize {
        151_936
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        22_016
    }
    pub fn layers() -> usize {
        32
    }
    pub fn heads() -> usize {
        32
    }
    pub fn rope_theta() -> f64 {
        10_000.0
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
}

/// The vision tower's fields, `CLIPVisionConfig`'s defaults where absent.
#[derive(Deserialize)]
struct HfVision {
    model_type: Option<String>,
    #[serde(default = "clip::hidden_size")]
    hidden_size: usize,
    #[serde(default = "clip::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "clip::layers")]
    num_hidden_layers: usize,
    #[serde(default = "clip::heads")]
    num_attention_heads: usize,
    #[serde(default = "clip::channels")]
    num_channels: usize,
    #[serde(default = "clip::image_size")]
    image_size: usize,
    #[serde(default = "clip::patch_size")]
    patch_size: usize,
    #[serde(default = "clip::hidden_act")]
    hidden_act: String,
    #[serde(default = "clip::layer_norm_eps")]
    layer_norm_eps: f64,
}

/// `CLIPVisionConfig`'s defaults (transformers).
mod clip {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        12
    }
    pub fn channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

/// The top-level LLaVA fields, `LlavaConfig`'s defaults where absent.
#[derive(Deserialize)]
struct HfLlava {
    model_type: Option<String>,
    vision_config: Option<Value>,
    #[serde(default = "llava::feature_layer")]
    vision_feature_layer: Value,
    #[serde(default = "llava::select_strategy")]
    vision_feature_select_strategy: String,
    #[serde(default = "llava::projector_act")]
    projector_hidden_act: String,
}

/// `LlavaConfig`'s defaults (transformers).
mod llava {
    pub fn feature_layer() -> serde_json::Value {
        (-2).into()
    }
    pub fn select_strategy() -> String {
        "default".into()
    }
    pub fn projector_act() -> String {
        "gelu".into()
    }
}

/// Text model types whose decoder is Qwen2's.
const QWEN2_TEXT: [&str; 3] = ["qwen2", "qwen2_5_vl", "qwen2_5_vl_text"];

fn parse<T: serde::de::DeserializeOwned>(what: &str, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone())
        .map_err(|e| candle_core::Error::Msg(format!("config.json: {what}: {e}")))
}

fn object(text: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| candle_core::Error::Msg(format!("config.json: {e}")))?;
    if !v.is_object() {
        bail!("config.json: not a JSON object");
    }
    Ok(v)
}

/// An activation by its transformers name (`gelu`, `gelu_new`,
/// `gelu_pytorch_tanh`, `silu`, ...).
fn activation(what: &str, name: &str) -> Result<Activation> {
    parse(what, &Value::String(name.into()))
}

impl TextConfig {
    /// The text fields of a `config.json` (the object itself or its
    /// `text_config`); see the [module docs](crate::hf_config) for the
    /// defaults and refusals.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        Self::from_hf_value(&object(text)?)
    }

    fn from_hf_value(root: &Value) -> Result<Self> {
        let nested = root.get("text_config");
        if nested.is_none() && root.get("model_type").and_then(Value::as_str) == Some("llava") {
            bail!("config.json: a LLaVA config without text_config");
        }
        let t: HfText = parse("text fields", nested.unwrap_or(root))?;
        if let Some(mt) = t
            .model_type
            .as_deref()
            .filter(|mt| !QWEN2_TEXT.contains(mt))
        {
            bail!("config.json: text model_type {mt:?} is not implemented (foveal-candle's decoder is Qwen2's: q/k/v biases, SwiGLU; {QWEN2_TEXT:?})");
        }
        if t.hidden_act != "silu" {
            bail!(
                "config.json: hidden_act {:?} is not implemented (the decoder's MLP is SwiGLU with silu)",
                t.hidden_act
            );
        }
        if let Some(scaling) = t.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            let kind = scaling
                .get("rope_type")
                .or(scaling.get("type"))
                .and_then(Value::as_str);
            if kind != Some("default") {
                bail!("config.json: rope_scaling {scaling} is not implemented (only plain RoPE with rope_theta)");
            }
        }
        if t.use_sliding_window {
            bail!("config.json: use_sliding_window is true; sliding-window attention is not implemented (every layer attends to the whole sequence)");
        }
        let heads = t.num_attention_heads;
        let head_dim = match t.head_dim {
            Some(d) => d,
            None if heads > 0 && t.hidden_size % heads == 0 => t.hidden_size / heads,
            None => bail!(
                "config.json: no head_dim, and hidden_size {} is not a multiple of num_attention_heads {heads}",
                t.hidden_size
            ),
        };
        let tie = t
            .tie_word_embeddings
            .or(root.get("tie_word_embeddings").and_then(Value::as_bool))
            .unwrap_or(false);
        Ok(TextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            num_layers: t.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: t.num_key_value_heads.unwrap_or(heads),
            head_dim,
            intermediate_size: t.intermediate_size,
            rope_theta: t.rope_theta,
            rms_norm_eps: t.rms_norm_eps,
            tie_word_embeddings: tie,
        })
    }
}

impl VisionConfig {
    /// A CLIP `vision_config` object; `CLIPVisionConfig`'s defaults where
    /// a field is absent. Refuses other towers (SigLIP, Qwen2.5-VL's).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        Self::from_hf_value(&object(text)?)
    }

    fn from_hf_value(v: &Value) -> Result<Self> {
        let c: HfVision = parse("vision_config", v)?;
        if let Some(mt) = c
            .model_type
            .as_deref()
            .filter(|&mt| mt != "clip_vision_model")
        {
            bail!("config.json: vision_config model_type {mt:?} is not implemented (foveal-candle's tower is CLIP's: class token, pre-layernorm, no patch bias)");
        }
        let quick_gelu = c.hidden_act == "quick_gelu";
        let hidden_act = if quick_gelu {
            Activation::Gelu
        } else {
            activation("vision_config.hidden_act", &c.hidden_act)?
        };
        Ok(VisionConfig {
            image_size: c.image_size,
            patch_size: c.patch_size,
            num_channels: c.num_channels,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            layer_norm_eps: c.layer_norm_eps,
            hidden_act,
            quick_gelu,
            class_token: true,
        })
    }
}

impl ModelConfig {
    /// A LLaVA `config.json` (see the [module docs](crate::hf_config)),
    /// checked with [`ModelConfig::validate`].
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let root = object(text)?;
        let top: HfLlava = parse("top-level fields", &root)?;
        if let Some(mt) = top.model_type.as_deref().filter(|&mt| mt != "llava") {
            bail!("config.json: model_type {mt:?} is not implemented (foveal-candle's model is LLaVA's: one image of the tower's size per prompt; {mt}'s own image layout is not)");
        }
        let Some(vision) = &top.vision_config else {
            bail!("config.json: no vision_config (a text-only model; foveal-candle's model is LLaVA-style)");
        };
        let vision_feature_layer = match top.vision_feature_layer.as_i64() {
            Some(l) => l as isize,
            None => bail!(
                "config.json: vision_feature_layer {} is not implemented (one layer, an integer)",
                top.vision_feature_layer
            ),
        };
        if top.vision_feature_select_strategy != "default" {
            bail!(
                "config.json: vision_feature_select_strategy {:?} is not implemented (\"default\": the class token dropped)",
                top.vision_feature_select_strategy
            );
        }
        let cfg = ModelConfig {
            vision: VisionConfig::from_hf_value(vision)?,
            text: TextConfig::from_hf_value(&root)?,
            vision_feature_layer,
            projector_act: activation("projector_hidden_act", &top.projector_hidden_act)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`ModelConfig::from_hf_json`] of a file.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Self::from_hf_json(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }
}
