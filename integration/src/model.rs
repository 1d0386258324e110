//! The small LLaVA-style model: vision tower, projector, decoder, with the
//! Hugging Face LLaVA parameter names (`vision_tower.vision_model.…`,
//! `multi_modal_projector.…`, `language_model.model.…`,
//! `language_model.lm_head`), a seeded random initialisation, safetensors
//! save/load, prompt building and dense greedy generation.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{self, Checkpoint, Named};
use crate::config::ModelConfig;
use crate::decoder::{Decoder, Generation, KvCache};
use crate::projector::Projector;
use crate::prompt::{image_question_rows, Prompt, Segment};
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
    checkpoint: Checkpoint,
}

impl LlavaModel {
    /// Builds the model from `vb` at the root of a LLaVA checkpoint.
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let ((vision, projector, decoder), checkpoint) = Checkpoint::record(vb, |vb| {
            Ok((
                VisionTower::new(vb.pp("vision_tower.vision_model"), &cfg.vision)?,
                Projector::new(
                    vb.pp("multi_modal_projector"),
                    cfg.vision.hidden_size,
                    cfg.text.hidden_size,
                    cfg.projector_act,
                )?,
                Decoder::new(vb.pp("language_model"), &cfg.text)?,
            ))
        })?;
        Ok(LlavaModel {
            vision,
            projector,
            decoder,
            config: cfg.clone(),
            checkpoint,
        })
    }

    /// A deterministic random initialisation ([`checkpoint::seeded`]).
    pub fn seeded(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        Self::new(checkpoint::seeded(seed, dtype, device), cfg)
    }

    /// Loads a safetensors file with HF LLaVA names (tensors not used by the
    /// model, e.g. `post_layernorm`, are ignored), converting to `dtype`.
    pub fn load_safetensors(
        path: impl AsRef<Path>,
        cfg: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::new(checkpoint::load(path, dtype, device)?, cfg)
    }

    /// Every parameter with its HF LLaVA name.
    pub fn named_tensors(&self) -> Named {
        self.checkpoint.named().clone()
    }

    /// Writes every parameter (HF LLaVA names, the model's dtype) to a safetensors file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        self.checkpoint.save(path)
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
        let image = |b| Ok(Segment::Image(image_embeds.get(b)?));
        let rows = image_question_rows(
            image_embeds.dim(0)?,
            system,
            questions,
            Segment::Text,
            image,
        )?;
        Prompt::build(&self.decoder, &rows)
    }

    /// Dense greedy generation: a prefill of every layer over the whole
    /// prompt, then `max_new_tokens - 1` cached decode steps, positions
    /// continuing after each row's last.
    pub fn generate_dense(&self, prompt: &Prompt, max_new_tokens: usize) -> Result<Generation> {
        let (h, mut cache) = self.prefill(prompt)?;
        let first = self.decoder.last_logits(&h)?;
        self.decoder.greedy(
            &first,
            &prompt.next_positions(),
            &prompt.starts,
            &mut cache,
            max_new_tokens,
        )
    }

    /// A dense prefill of every layer over `prompt`: the last layer's hidden
    /// states `[B, S, Dm]` (before the final norm) and the filled cache.
    pub fn prefill(&self, prompt: &Prompt) -> Result<(Tensor, KvCache)> {
        let dec = &self.decoder;
        let mut cache = dec.new_cache();
        let h = dec.forward_layers(
            &prompt.embeds,
            &prompt.positions,
            Some(&prompt.mask()?),
            0..dec.num_layers(),
            &mut cache,
        )?;
        Ok((h, cache))
    }

    /// The logits `[B, S, vocab]` of a full prefill of `prompt` (no cache kept).
    pub fn prefill_logits(&self, prompt: &Prompt) -> Result<Tensor> {
        self.decoder.logits(&self.prefill(prompt)?.0)
    }
}
