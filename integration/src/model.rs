//! The small LLaVA-style model: vision tower, projector, decoder, with the
//! Hugging Face LLaVA parameter names (`vision_tower.vision_model.…`,
//! `multi_modal_projector.…`, `language_model.model.…`,
//! `language_model.lm_head`), a seeded random initialisation, safetensors
//! save/load, prompt building and dense greedy generation.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::decoder::{Decoder, Generation};
use crate::nn::Named;
use crate::projector::Projector;
use crate::prompt::{Prompt, Segment};
use crate::vision::VisionTower;

/// What the vision side gives for a batch of images.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// The tower's hidden states `0..=feature layer` (see
    /// [`VisionTower::forward`]), each `[B, Np, C_vision]`.
    pub hidden_states: Vec<Tensor>,
    /// The projected features of the configured layer: `[B, Np, Dm]`.
    pub embeds: Tensor,
}

#[derive(Debug, Clone)]
pub struct LlavaModel {
    pub vision: VisionTower,
    pub projector: Projector,
    pub decoder: Decoder,
    pub config: ModelConfig,
}

impl LlavaModel {
    /// Builds the model from `vb` at the root of a LLaVA checkpoint.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(LlavaModel {
            vision: VisionTower::new(vb.pp("vision_tower.vision_model"), &cfg.vision)?,
            projector: Projector::new(
                vb.pp("multi_modal_projector"),
                cfg.vision.hidden_size,
                cfg.text.hidden_size,
                cfg.projector_act,
            )?,
            decoder: Decoder::new(vb.pp("language_model"), &cfg.text)?,
            config: cfg.clone(),
        })
    }

    /// A deterministic random initialisation: every parameter drawn from a
    /// generator seeded by `seed` and its name (so the same seed gives the same
    /// weights whatever the construction order). Norm weights near 1, biases
    /// small, matrices normal with std `1/sqrt(fan_in)`, embeddings of std 1.
    pub fn seeded(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let vb = VarBuilder::from_backend(Box::new(SeededInit { seed }), dtype, device.clone());
        Self::new(vb, cfg)
    }

    /// Loads a safetensors file with HF LLaVA names (tensors not used by the
    /// model, e.g. `post_layernorm`, are ignored), converting to `dtype`.
    pub fn load_safetensors(
        path: impl AsRef<Path>,
        cfg: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)?;
        Self::new(VarBuilder::from_tensors(tensors, dtype, device), cfg)
    }

    /// Every parameter with its HF LLaVA name.
    pub fn named_tensors(&self) -> Named {
        let mut out = Vec::new();
        self.vision
            .named_tensors("vision_tower.vision_model", &mut out);
        self.projector
            .named_tensors("multi_modal_projector", &mut out);
        self.decoder.named_tensors("language_model", &mut out);
        out
    }

    /// Writes every parameter (HF LLaVA names, the model's dtype) to a safetensors file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let map: HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        candle_core::safetensors::save(&map, path)
    }

    /// Visual tokens per image.
    pub fn num_patches(&self) -> usize {
        self.config.vision.num_patches()
    }

    /// Runs the tower up to the configured feature layer and projects it:
    /// pixels `[B, 3, H, W]`.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<ImageFeatures> {
        let layer = self.config.feature_layer_index();
        let hidden_states = self.vision.forward_upto(pixels, layer)?;
        let embeds = self.projector.forward(&hidden_states[layer])?;
        Ok(ImageFeatures {
            hidden_states,
            embeds,
        })
    }

    /// The LLaVA prompt of row `b`: `[system][image b's visual embeddings][questions[b]]`,
    /// rows left-padded. `pixels` `[B, 3, H, W]`, one image per question.
    pub fn build_prompt(
        &self,
        pixels: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Prompt> {
        let embeds = self.encode_images(pixels)?.embeds;
        self.build_prompt_from_embeds(&embeds, system, questions)
    }

    /// [`LlavaModel::build_prompt`] from already projected image embeddings `[B, Np, Dm]`.
    pub fn build_prompt_from_embeds(
        &self,
        image_embeds: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Prompt> {
        let b = image_embeds.dim(0)?;
        if questions.len() != b {
            candle_core::bail!("build_prompt: {b} images, {} questions", questions.len());
        }
        let rows = questions
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Ok(vec![
                    Segment::Text(system.to_vec()),
                    Segment::Image(image_embeds.get(i)?),
                    Segment::Text(q.clone()),
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Prompt::build(&self.decoder, &rows)
    }

    /// Dense greedy generation: a prefill of every layer over the whole
    /// prompt, then `max_new_tokens - 1` cached decode steps, positions
    /// continuing after each row's last.
    pub fn generate_dense(&self, prompt: &Prompt, max_new_tokens: usize) -> Result<Generation> {
        let dec = &self.decoder;
        let mut cache = dec.new_cache();
        let mask = prompt.mask()?;
        let h = dec.forward_layers(
            &prompt.embeds,
            &prompt.positions,
            Some(&mask),
            0..dec.num_layers(),
            &mut cache,
        )?;
        let first = dec.last_logits(&h)?;
        dec.greedy(
            &first,
            &prompt.next_positions(),
            &prompt.starts,
            &mut cache,
            max_new_tokens,
        )
    }

    /// The logits `[B, S, vocab]` of a full prefill of `prompt` (no cache kept).
    pub fn prefill_logits(&self, prompt: &Prompt) -> Result<Tensor> {
        let dec = &self.decoder;
        let mut cache = dec.new_cache();
        let mask = prompt.mask()?;
        let h = dec.forward_layers(
            &prompt.embeds,
            &prompt.positions,
            Some(&mask),
            0..dec.num_layers(),
            &mut cache,
        )?;
        dec.logits(&h)
    }
}

/// The seeded initialiser behind [`LlavaModel::seeded`].
pub(crate) struct SeededInit {
    pub(crate) seed: u64,
}

impl SeededInit {
    /// Standard deviation and mean of the parameter `name` of shape `dims`.
    fn scale(name: &str, dims: &[usize]) -> (f32, f32) {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let is_norm = ["norm", "layrnorm", "layer_norm"]
            .iter()
            .any(|n| name.contains(n));
        if is_norm && leaf == "weight" {
            (0.1, 1.0)
        } else if leaf == "bias" {
            (0.02, 0.0)
        } else if name.ends_with("embed_tokens.weight") {
            (1.0, 0.0)
        } else if name.ends_with("position_embedding.weight") || name.ends_with("class_embedding") {
            (0.5, 0.0)
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            ((fan_in as f32).powf(-0.5), 0.0)
        }
    }
}

/// FNV-1a, a stable hash of a parameter name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(name));
        let (std, mean) = Self::scale(name, s.dims());
        let n = s.elem_count();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller: two normals per pair of uniforms.
            let u1 = 1.0 - rng.random::<f32>();
            let u2 = rng.random::<f32>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f32::consts::TAU * u2;
            v.push(mean + std * r * t.cos());
            if v.len() < n {
                v.push(mean + std * r * t.sin());
            }
        }
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("seeded init: {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
