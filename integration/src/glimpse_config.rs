//! GlimpsePrune's settings as its authors' code reads them, and foveal's
//! [`GlimpseConfig`] built from them.
//!
//! - [`UpstreamConfig`]: the authors' keys, as their training YAML
//!   (`train_configs/*.yaml`) and the `config.json` saved beside their
//!   modules (`new_modules_gp.pt`) spell them; [`UpstreamConfig::from_yaml`]
//!   reads either (JSON is YAML). A key left out takes the default of the
//!   authors' config class for that base model ([`BaseModel`]). Their two
//!   released settings: [`UpstreamConfig::llava_1_5_7b`] and
//!   [`UpstreamConfig::qwen2_5_vl_7b`] (also in `integration/configs/`).
//! - [`GlimpseConfig::from_upstream`]: what foveal runs.
//!
//! docs/glimpseprune.md has the table of every key and how foveal reads it.

use std::path::Path;

use candle_core::Result;
use candle_nn::Activation;
use foveal::{KeepRule, ScoreMode};
use serde::{Deserialize, Deserializer};

use crate::config::ModelConfig;
use crate::vip::VipConfig;

/// The base model the authors' code was written for: it settles the
/// conventions the keys leave implicit (defaults, how ViT layers are
/// counted, the glimpse embeddings' norm, the merge of patches into tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    /// LLaVA-1.5 (`llava_gp/`): CLIP ViT hidden states, no patch merge.
    Llava,
    /// Qwen2.5-VL (`transformers_gp/`): vision blocks, 2 x 2 patch merge.
    Qwen25Vl,
}

/// The importance predictor (`attn_fuse_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FuserType {
    /// Conditioned on ViT features.
    AttnFuserV1,
    /// Without visual conditioning.
    AttnFuserV2,
    /// The training-free baseline map (no learned predictor).
    AttnFuserDummy,
}

/// The glimpse embeddings' norm (`le_norm_type`, Qwen2.5-VL only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LeNormType {
    #[serde(rename = "rmsnorm")]
    RmsNorm,
    #[serde(rename = "layernorm")]
    LayerNorm,
}

/// An always-kept corner of each image (`anchor_positions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Anchor {
    #[serde(rename = "tl")]
    TopLeft,
    #[serde(rename = "tr")]
    TopRight,
    #[serde(rename = "bl")]
    BottomLeft,
    #[serde(rename = "br")]
    BottomRight,
}

impl Anchor {
    /// The anchor's token in a row-major `h x w` image.
    pub fn index(self, h: usize, w: usize) -> usize {
        match self {
            Anchor::TopLeft => 0,
            Anchor::TopRight => w - 1,
            Anchor::BottomLeft => (h - 1) * w,
            Anchor::BottomRight => h * w - 1,
        }
    }
}

/// Qwen2.5-VL's `vision_config` keys that the settings use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct VisionKeys {
    pub hidden_size: Option<usize>,
    pub spatial_merge_size: Option<usize>,
}

/// The authors' keys (their names; `None`: left out, the default of their
/// config class applies). Keys that only training reads (losses, learning
/// rate, dropout) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct UpstreamConfig {
    /// The training YAML's base model (the base model is told from it or from `model_type`).
    pub model_name_or_path: Option<String>,
    /// config.json's `llava_llama_gp` or `qwen2_5_vl_gp`.
    pub model_type: Option<String>,
    /// Decoder layers whose glimpse attention the predictor reads, in its input order.
    pub selected_layers: Option<Vec<usize>>,
    /// K: the pruning layer (0-based; the layers after it run on the kept tokens).
    pub reduce_layer: Option<usize>,
    /// Decoder layers with a glimpse embedding (must hold 0, the token's input embedding).
    pub le_layers: Option<Vec<usize>>,
    /// Glimpse tokens appended (1; 0 with Qwen2.5-VL: none).
    pub le_length: Option<usize>,
    pub le_norm_type: Option<LeNormType>,
    /// true: raw scaled logits (Qwen2.5-VL); false: log-softmax (LLaVA).
    pub use_attention_logits: Option<bool>,
    pub attn_fuse_type: Option<FuserType>,
    /// E.
    pub attn_fuse_size: Option<usize>,
    /// F.
    pub visual_cond_size: Option<usize>,
    pub attn_fuse_num_heads: Option<usize>,
    pub attn_fuse_hidden_act: Option<Activation>,
    /// Qwen2.5-VL: true attends per image, false within its vision windows.
    pub attn_fuse_global: Option<bool>,
    /// Output projections on every block (training); inference reads the last.
    pub deep_supervision: Option<bool>,
    /// The baseline map as an extra training target; no effect on inference.
    pub ori_attn_supervision: Option<bool>,
    /// Conditioning ViT layers, deepest first (LLaVA: hidden-state indices,
    /// 0 = embeddings; Qwen2.5-VL: 0-based block indices).
    pub selected_visual_layers: Option<Vec<usize>>,
    pub reduce_threshold: Option<f64>,
    /// `null`: no minimum.
    #[serde(deserialize_with = "present")]
    pub min_remain_num: Option<Option<usize>>,
    /// `null`: no cap.
    #[serde(deserialize_with = "present")]
    pub max_remain_ratio: Option<Option<f64>>,
    #[serde(deserialize_with = "present")]
    pub anchor_positions: Option<Option<Vec<Anchor>>>,
    /// The base model's sizes (config.json; a training YAML leaves them to the base model).
    pub num_attention_heads: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub hidden_size: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    /// LLaVA's vision tower width.
    pub mm_hidden_size: Option<usize>,
    pub vision_config: Option<VisionKeys>,
}

/// A key given (even as `null`): `Some(value)`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl UpstreamConfig {
    /// Reads the authors' training YAML or saved config.json.
    pub fn from_yaml(text: &str) -> Result<Self> {
        yaml_serde::from_str(text).map_err(candle_core::Error::wrap)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        Self::from_yaml(&text)
    }

    /// The released LLaVA-1.5-7B setting (their
    /// `train_configs/llava1_5_7b_gp`, with LLaVA-1.5-7B's sizes).
    pub fn llava_1_5_7b() -> Self {
        UpstreamConfig {
            model_name_or_path: Some("liuhaotian/llava-v1.5-7b".into()),
            selected_layers: Some(vec![21]),
            reduce_layer: Some(21),
            le_layers: Some((0..32).collect()),
            use_attention_logits: Some(false),
            attn_fuse_type: Some(FuserType::AttnFuserV1),
            attn_fuse_size: Some(256),
            visual_cond_size: Some(512),
            attn_fuse_num_heads: Some(4),
            attn_fuse_hidden_act: Some(Activation::Silu),
            deep_supervision: Some(false),
            ori_attn_supervision: Some(false),
            selected_visual_layers: Some(vec![23, 17, 11, 5]),
            num_attention_heads: Some(32),
            num_hidden_layers: Some(32),
            hidden_size: Some(4096),
            rms_norm_eps: Some(1e-5),
            mm_hidden_size: Some(1024),
            ..Default::default()
        }
    }

    /// The released Qwen2.5-VL-7B setting (their
    /// `train_configs/qwen2_5_7b_gp`, with Qwen2.5-VL-7B's sizes).
    pub fn qwen2_5_vl_7b() -> Self {
        UpstreamConfig {
            model_name_or_path: Some("Qwen/Qwen2.5-VL-7B-Instruct".into()),
            selected_layers: Some(vec![18]),
            reduce_layer: Some(18),
            le_layers: Some((0..28).collect()),
            le_norm_type: Some(LeNormType::RmsNorm),
            use_attention_logits: Some(true),
            attn_fuse_type: Some(FuserType::AttnFuserV1),
            attn_fuse_size: Some(256),
            visual_cond_size: Some(512),
            attn_fuse_num_heads: Some(4),
            attn_fuse_hidden_act: Some(Activation::Silu),
            attn_fuse_global: Some(true),
            deep_supervision: Some(false),
            ori_attn_supervision: Some(false),
            selected_visual_layers: Some(vec![31, 23, 15, 7]),
            num_attention_heads: Some(28),
            num_hidden_layers: Some(28),
            hidden_size: Some(3584),
            rms_norm_eps: Some(1e-6),
            vision_config: Some(VisionKeys {
                hidden_size: Some(1280),
                spatial_merge_size: Some(2),
            }),
            ..Default::default()
        }
    }

    /// The released LLaVA setting's shape scaled to `model` (foveal's
    /// LLaVA-style model): glimpse attention of layer K = ceil(2L/3) - 1,
    /// pruning there, a glimpse embedding at every layer, log-softmax,
    /// E a quarter of the decoder's width (a multiple of 16, at least 16),
    /// F = 2E, 4 heads, 4 conditioning layers deepest first from the
    /// penultimate, a quarter of the tower apart (24 layers: 23, 17, 11, 5).
    pub fn llava_scaled(model: &ModelConfig) -> Self {
        let l = model.text.num_layers;
        let k = (2 * l).div_ceil(3) - 1;
        let e = (model.text.hidden_size / 4).max(16).next_multiple_of(16);
        let n = model.vision.num_layers;
        let step = (n / 4).max(1);
        UpstreamConfig {
            model_type: Some("llava_llama_gp".into()),
            selected_layers: Some(vec![k]),
            reduce_layer: Some(k),
            le_layers: Some((0..l).collect()),
            use_attention_logits: Some(false),
            attn_fuse_type: Some(FuserType::AttnFuserV1),
            attn_fuse_size: Some(e),
            visual_cond_size: Some(2 * e),
            attn_fuse_num_heads: Some(4),
            attn_fuse_hidden_act: Some(Activation::Silu),
            deep_supervision: Some(false),
            ori_attn_supervision: Some(false),
            selected_visual_layers: Some((0..4.min(n)).map(|i| n - 1 - i * step).collect()),
            ..Default::default()
        }
    }

    /// The base model's sizes the settings name (config.json) against `model`'s.
    fn check_sizes(&self, base: BaseModel, model: &ModelConfig) -> Result<()> {
        let vision = match base {
            BaseModel::Llava => self.mm_hidden_size,
            BaseModel::Qwen25Vl => self.vision_config.as_ref().and_then(|v| v.hidden_size),
        };
        let sizes = [
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                model.text.num_layers,
            ),
            ("hidden_size", self.hidden_size, model.text.hidden_size),
            (
                "num_attention_heads",
                self.num_attention_heads,
                model.text.num_heads,
            ),
            ("the vision width", vision, model.vision.hidden_size),
        ];
        for (key, given, has) in sizes {
            if given.is_some_and(|g| g != has) {
                candle_core::bail!(
                    "GlimpsePrune settings: {key} {} in the settings, the model's is {has}",
                    given.unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// The base model, from `model_type` or else `model_name_or_path`.
    pub fn base_model(&self) -> Result<BaseModel> {
        for name in [&self.model_type, &self.model_name_or_path]
            .into_iter()
            .flatten()
        {
            let name = name.to_lowercase();
            if name.contains("qwen") {
                return Ok(BaseModel::Qwen25Vl);
            }
            if name.contains("llava") {
                return Ok(BaseModel::Llava);
            }
        }
        candle_core::bail!(
            "GlimpsePrune settings: neither model_type ({:?}) nor model_name_or_path ({:?}) names LLaVA or Qwen2.5-VL",
            self.model_type,
            self.model_name_or_path
        )
    }
}

/// The glimpse embeddings' norm, `norm(linear(E_l))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LeNorm {
    RmsNorm {
        eps: f64,
    },
    /// With a bias (`torch.nn.LayerNorm`).
    LayerNorm {
        eps: f64,
    },
}

/// The glimpse token and its per-layer embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingConfig {
    /// Decoder layers with an embedding (`le_layers`; the first embedding of
    /// the stored `[len, 1, Dm]` table is layer `layers[0]`'s, and so on).
    /// Must hold 0: its embedding is the glimpse token's input.
    pub layers: Vec<usize>,
    pub norm: LeNorm,
}

/// What turns the glimpse attention into importance logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictor {
    /// The learned predictor.
    Vip(VipConfig),
    /// The training-free baseline map ([`crate::vip::baseline_map`]).
    Baseline,
}

/// How GlimpsePrune runs in foveal.
#[derive(Debug, Clone, PartialEq)]
pub struct GlimpseConfig {
    /// Decoder layers whose glimpse attention (foveal glimpse_scores, one
    /// call per layer) is concatenated, layer-major, into the predictor's
    /// input; each at most `reduce_layer`.
    pub selected_layers: Vec<usize>,
    /// K (0-based): layers 0..=K run over the whole prompt and their caches
    /// are compacted; at or past the last layer, the cache of every layer is
    /// compacted after the whole prefill (as upstream).
    pub reduce_layer: usize,
    /// The glimpse attention as the predictor takes it (Logits or LogSoftmax).
    pub mode: ScoreMode,
    pub rule: KeepRule,
    /// Corners of each image kept whatever the rule says (after it).
    pub anchors: Vec<Anchor>,
    /// `None`: no glimpse token; the last prompt token's attention is read
    /// (Qwen2.5-VL with `le_layers` empty or `le_length` 0).
    pub embeddings: Option<EmbeddingConfig>,
    pub predictor: Predictor,
    /// The ViT hidden states (0 = embeddings, `i` = block `i`'s output) that
    /// condition the predictor's blocks, one each, deepest first.
    pub visual_layers: Vec<usize>,
    /// Patches averaged into one conditioning feature (Qwen2.5-VL: its
    /// 2 x 2 merge unit, 4; LLaVA: 1).
    pub merge_unit: usize,
}

/// The defaults of the authors' config classes (`LlavaConfig_GP`,
/// `Qwen2_5_VL_GPConfig`) where they differ.
struct Defaults {
    selected_layers: &'static [usize],
    reduce_layer: usize,
    selected_visual_layers: &'static [usize],
}

impl BaseModel {
    fn defaults(self) -> Defaults {
        match self {
            BaseModel::Llava => Defaults {
                selected_layers: &[21],
                reduce_layer: 21,
                selected_visual_layers: &[23, 17, 11, 5],
            },
            BaseModel::Qwen25Vl => Defaults {
                selected_layers: &[],
                reduce_layer: 1000,
                selected_visual_layers: &[8],
            },
        }
    }
}

impl GlimpseConfig {
    /// The released LLaVA setting's shape scaled to `model`
    /// ([`UpstreamConfig::llava_scaled`]), threshold 0.5, at least one token kept.
    pub fn for_model(model: &ModelConfig) -> Self {
        Self::from_upstream(&UpstreamConfig::llava_scaled(model), Some(model))
            .expect("the scaled LLaVA setting is valid for any model")
    }

    /// foveal's settings from the authors'. The base model's sizes (query
    /// heads, vision width, RMSNorm eps) come from the settings' own keys
    /// (config.json has them) or else from `model`, and where both are
    /// known they must agree.
    pub fn from_upstream(up: &UpstreamConfig, model: Option<&ModelConfig>) -> Result<Self> {
        let base = up.base_model()?;
        if let Some(m) = model {
            up.check_sizes(base, m)?;
        }
        let d = base.defaults();
        let selected_layers = up
            .selected_layers
            .clone()
            .unwrap_or(d.selected_layers.to_vec());
        let visual_layers: Vec<usize> = up
            .selected_visual_layers
            .clone()
            .unwrap_or(d.selected_visual_layers.to_vec())
            .into_iter()
            .map(|l| match base {
                BaseModel::Llava => l,
                // Block l's output is hidden state l + 1.
                BaseModel::Qwen25Vl => l + 1,
            })
            .collect();
        let merge = match base {
            BaseModel::Llava => 1,
            BaseModel::Qwen25Vl => up
                .vision_config
                .as_ref()
                .and_then(|v| v.spatial_merge_size)
                .unwrap_or(2),
        };
        let cfg = GlimpseConfig {
            reduce_layer: up.reduce_layer.unwrap_or(d.reduce_layer),
            mode: if up.use_attention_logits.unwrap_or(false) {
                ScoreMode::Logits
            } else {
                ScoreMode::LogSoftmax
            },
            rule: KeepRule {
                threshold: up.reduce_threshold.unwrap_or(0.5) as f32,
                max_ratio: up.max_remain_ratio.flatten().map(|r| r as _),
                min_keep: up.min_remain_num.unwrap_or(Some(1)).unwrap_or(0),
            },
            anchors: up.anchor_positions.clone().flatten().unwrap_or_default(),
            embeddings: embeddings_of(up, base, model)?,
            predictor: predictor_of(up, base, model, selected_layers.len(), visual_layers.len())?,
            selected_layers,
            visual_layers,
            merge_unit: merge * merge,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the settings agree with themselves (the model is checked by
    /// [`crate::glimpse::GlimpsePrune`]).
    pub fn validate(&self) -> Result<()> {
        if self.selected_layers.is_empty() {
            candle_core::bail!("GlimpseConfig: no selected layer (the predictor reads the glimpse attention of at least one)");
        }
        if let Some(&l) = self
            .selected_layers
            .iter()
            .find(|&&l| l > self.reduce_layer)
        {
            candle_core::bail!(
                "GlimpseConfig: selected layer {l} after the pruning layer {}",
                self.reduce_layer
            );
        }
        if self.mode == ScoreMode::Softmax {
            candle_core::bail!("GlimpseConfig: the glimpse attention is read as logits or log-softmax (use_attention_logits), not probabilities");
        }
        if let Some(e) = &self.embeddings {
            if !e.layers.contains(&0) {
                candle_core::bail!("GlimpseConfig: glimpse embedding layers {:?} lack layer 0 (the glimpse token's input)", e.layers);
            }
        }
        if let Predictor::Vip(v) = &self.predictor {
            v.validate()?;
            if v.layers != self.visual_layers.len() {
                candle_core::bail!(
                    "GlimpseConfig: {} predictor blocks for {} conditioning layers",
                    v.layers,
                    self.visual_layers.len()
                );
            }
        }
        if self.merge_unit == 0 {
            candle_core::bail!("GlimpseConfig: merge unit 0");
        }
        Ok(())
    }
}

/// A base-model size from the settings, else from the model.
fn size_of(given: Option<usize>, from_model: Option<usize>, what: &str) -> Result<usize> {
    given.or(from_model).ok_or_else(|| {
        candle_core::Error::msg(format!(
            "GlimpsePrune settings: {what} is neither in the settings nor given by a model"
        ))
    })
}

/// The glimpse token's settings (`le_*`); `None`: no glimpse token.
fn embeddings_of(
    up: &UpstreamConfig,
    base: BaseModel,
    model: Option<&ModelConfig>,
) -> Result<Option<EmbeddingConfig>> {
    let le_length = up.le_length.unwrap_or(1);
    let le_layers = up.le_layers.clone().unwrap_or(vec![0]);
    if le_length == 0 || le_layers.is_empty() {
        if base == BaseModel::Llava {
            candle_core::bail!("GlimpsePrune settings: LLaVA always appends the glimpse token (le_length {le_length}, le_layers {le_layers:?})");
        }
        return Ok(None);
    }
    if le_length != 1 {
        candle_core::bail!("GlimpsePrune settings: le_length {le_length}: foveal appends one glimpse token (the released settings' 1)");
    }
    let eps = match up.rms_norm_eps {
        Some(e) => e,
        None => model.map(|m| m.text.rms_norm_eps).ok_or_else(|| {
            candle_core::Error::msg(
                "GlimpsePrune settings: rms_norm_eps is neither in the settings nor given by a model",
            )
        })?,
    };
    // LLaVA's code has no key: always the decoder's RMSNorm.
    let norm = match (base, up.le_norm_type.unwrap_or(LeNormType::RmsNorm)) {
        (BaseModel::Llava, _) | (_, LeNormType::RmsNorm) => LeNorm::RmsNorm { eps },
        (_, LeNormType::LayerNorm) => LeNorm::LayerNorm { eps: 1e-5 },
    };
    Ok(Some(EmbeddingConfig {
        layers: le_layers,
        norm,
    }))
}

/// The predictor's settings (`attn_fuse_*`, `visual_cond_size`) for
/// `selected` decoder layers and `blocks` conditioning layers.
fn predictor_of(
    up: &UpstreamConfig,
    base: BaseModel,
    model: Option<&ModelConfig>,
    selected: usize,
    blocks: usize,
) -> Result<Predictor> {
    let kind = up.attn_fuse_type.unwrap_or(FuserType::AttnFuserV1);
    if kind == FuserType::AttnFuserDummy {
        return Ok(Predictor::Baseline);
    }
    if base == BaseModel::Qwen25Vl && !up.attn_fuse_global.unwrap_or(false) {
        candle_core::bail!("GlimpsePrune settings: attn_fuse_global false (the predictor attending within Qwen2.5-VL's vision windows) is not supported; the released settings attend per image (true)");
    }
    let heads = size_of(
        up.num_attention_heads,
        model.map(|m| m.text.num_heads),
        "num_attention_heads",
    )?;
    let vision = match base {
        BaseModel::Llava => up.mm_hidden_size,
        BaseModel::Qwen25Vl => up.vision_config.as_ref().and_then(|v| v.hidden_size),
    };
    Ok(Predictor::Vip(VipConfig {
        in_features: selected * heads,
        vision_hidden: size_of(
            vision,
            model.map(|m| m.vision.hidden_size),
            "the vision width",
        )?,
        hidden: up.attn_fuse_size.unwrap_or(256),
        cond: (kind == FuserType::AttnFuserV1).then(|| up.visual_cond_size.unwrap_or(256)),
        heads: up.attn_fuse_num_heads.unwrap_or(4),
        layers: blocks,
        act: up.attn_fuse_hidden_act.unwrap_or(Activation::Silu),
    }))
}
