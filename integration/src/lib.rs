//! foveal-candle: foveal's ops inside models.
//!
//! - [`glimpse_pipeline`]: the GlimpsePrune kernel pipeline on synthetic
//!   inputs, which the main job runs.
//! - A small LLaVA-style model built from candle ops: [`config`] (sizes, the
//!   built-in [`config::ModelConfig::tiny`]), [`vision`] (a CLIP-style ViT
//!   returning every layer's features), [`projector`] (LLaVA's 2-layer MLP),
//!   [`decoder`] (Qwen2: RMSNorm, RoPE from explicit position ids, GQA,
//!   SwiGLU, a `[B, Hkv, S, D]` KV cache, layer ranges), [`prompt`] (prompts as
//!   left-padded input embeddings with their visual positions), [`model`]
//!   (the whole model: HF-named safetensors, seeded init, dense generation)
//!   and [`images`] (seeded synthetic images, image files).

pub mod config;
pub mod decoder;
pub mod glimpse_pipeline;
pub mod images;
pub mod model;
mod nn;
pub mod projector;
pub mod prompt;
pub mod vision;

pub use config::{ModelConfig, TextConfig, VisionConfig};
pub use decoder::{attention_mask, Decoder, Generation, KvCache, MASK_MIN};
pub use model::{ImageFeatures, LlavaModel};
pub use nn::Named;
pub use prompt::{Prompt, Segment};
