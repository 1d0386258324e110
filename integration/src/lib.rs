//! foveal-candle: foveal's ops inside models.
//!
//! - [`glimpse_pipeline`]: the GlimpsePrune kernel pipeline on synthetic
//!   inputs, which the main job runs.
//! - One shape for every method: [`method`] (how a method is built, seeded,
//!   saved and loaded; one generation over image questions with a shared
//!   report; the dense baseline) over [`checkpoint`] (seeded, safetensors or PyTorch
//!   parameters, saved under the names they were fetched by), and
//!   [`reduce`] (the batch after a reduction inside the decoder, and the two
//!   rules every method keeps: decoding continues at the end of each row's
//!   dense layout, no row is left with nothing to attend).
//! - A small LLaVA-style model built from candle ops: [`config`] (sizes, the
//!   built-in [`config::ModelConfig::tiny`]), [`vision`] (a CLIP-style ViT
//!   returning every layer's features), [`projector`] (LLaVA's 2-layer MLP),
//!   [`decoder`] (Qwen2: RMSNorm, RoPE from explicit position ids, GQA,
//!   SwiGLU, a `[B, Hkv, S, D]` KV cache, layer ranges, an
//!   [`decoder::AttentionCore`] hook that replaces a layer's attention),
//!   [`prompt`] (prompts as
//!   left-padded input embeddings with their visual positions), [`model`]
//!   (the whole model: HF-named safetensors, seeded init, dense generation)
//!   and [`images`] (seeded synthetic images, image files).
//! - Hugging Face model folders as they ship: [`hf_config`] (`config.json`
//!   read into the model config, unimplemented settings refused) and
//!   [`hf_folder`] (one or sharded safetensors, memory-mapped, checked
//!   against their index; `tokenizer.json`).
//! - [`pictures`]: what a method kept or attended, drawn over the image
//!   (a run's [`method::TokenMaps`]).
//! - foveal on candle tensors: [`ops`] (the `glimpse_scores` and
//!   `window_mean` CustomOps, the kept set, one compaction of many caches,
//!   the row gather, `multiscale_gather`, `text_guided_select`; Gaze
//!   Attention's region descriptors, routing and sparse decode; VISOR's
//!   `cross_attention`, `pos_conv1d` and `token_pack`; CPU tensors go to
//!   foveal's CPU references, CUDA tensors to its CUDA paths in place).
//! - Gaze Attention end to end: [`gaze_prompt`] (text, images and videos
//!   with context tokens after each visual unit, the context-token prefill
//!   mask, the region layout) and [`gaze`] (context tokens, region
//!   descriptors, decoding with routed sparse attention in every layer).
//! - GlimpsePrune end to end, as its authors run it: [`glimpse_config`]
//!   (their settings, read from their YAML / config.json keys; their two
//!   released settings), [`vip`] (the Visual Importance Predictor with
//!   their parameter names, the training-free baseline map) and [`glimpse`]
//!   (glimpse token and embeddings, pruning at layer K, decoding on the
//!   compacted cache; their saved modules load as they are).
//! - VISOR end to end: [`visor_config`] (the layer schedule as data: the
//!   cross-attention layers, the viable self-attention configurations, the
//!   router or a fixed configuration, VISOR-TR's packing ratio),
//!   [`visor_prompt`] (the dense layout and its visual and text streams) and
//!   [`visor`] (the position convolution, cross-attention, self-attention
//!   and text-only layers, the routing token and router, per-row groups,
//!   decoding with the visual K/V of each cross-attention layer kept).
//! - FocusLLaVA end to end: [`vision_sampler`] (sub-images stitched into one
//!   map, the selector, multi-scale sampling in the projector) and [`focus`]
//!   (the text-guided sampler at layer K, the later layers and decoding on
//!   the kept tokens).
//! - Glance2Gaze end to end: [`glance`] (Glance Fusion: several ViT layers
//!   fused under the instruction in the vision path), [`gaze_compression`]
//!   (the shared query pool, its 2D positions, the compression step),
//!   [`glance2gaze_schedule`] (the paper's `(r, P)` schedules as data,
//!   scaled to a model) and [`glance2gaze`] (per-unit fusion and
//!   compression of images, sub-images and video frames, every compressed
//!   layer over its own layout and cache, decoding over them).

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod focus;
pub mod gaze;
pub mod gaze_compression;
pub mod gaze_prompt;
pub mod glance;
pub mod glance2gaze;
pub mod glance2gaze_schedule;
pub mod glimpse;
pub mod glimpse_config;
pub mod glimpse_pipeline;
pub mod hf_config;
pub mod hf_folder;
pub mod images;
pub mod method;
pub mod model;
mod nn;
pub mod ops;
pub mod pictures;
pub mod projector;
pub mod prompt;
pub mod reduce;
pub mod vip;
pub mod vision;
pub mod vision_sampler;
pub mod visor;
pub mod visor_config;
mod visor_layers;
pub mod visor_prompt;

pub use checkpoint::{Checkpoint, Named};
pub use config::{ModelConfig, TextConfig, VisionConfig};
pub use decoder::{
    attention_mask, AttentionCore, CacheSpan, Decoder, DenseAttention, Generation, KvCache,
    MASK_MIN,
};
pub use focus::{FocusConfig, FocusLlava, FocusRun};
pub use gaze::{GazeAttention, GazeConfig, GazePrefill, GazeRun, GazeStep};
pub use gaze_prompt::{GazePrompt, GazeSegment, GazeUnit};
pub use glance2gaze::{
    Glance2Gaze, Glance2GazeConfig, Glance2GazeFlops, Glance2GazeInput, Glance2GazePrefill,
    Glance2GazeRun, Units,
};
pub use glance2gaze_schedule::{paper_schedule, GazeSchedule, PaperSchedule, PAPER_SCHEDULES};
pub use glimpse::{GlimpsePrune, GlimpseRun};
pub use glimpse_config::{
    Anchor, BaseModel, EmbeddingConfig, FuserType, GlimpseConfig, LeNorm, Predictor, UpstreamConfig,
};
pub use hf_folder::{HfFolder, NameLayout};
pub use method::{Dense, ImageMethod, ImageQuestions, Method, Panel, Report, TokenMaps};
pub use model::{ImageFeatures, LlavaModel};
pub use prompt::{Prompt, Segment};
pub use reduce::Reduced;
pub use vision_sampler::{VisionSample, VisionSampler, VisionSamplerConfig};
pub use visor::{AttentionFlops, Visor, VisorInput, VisorRun};
pub use visor_config::{LayerKind, Route, VisorConfig};
pub use visor_prompt::{Streams, VisorPrompt, VisorText};
