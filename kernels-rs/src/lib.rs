//! foveal: GPU kernels, with CPU references, that make vision-language models
//! fast by looking only where it matters.
//!
//! Each op is a module with a CPU reference (`op::cpu`, always built) and a
//! CUDA path (`op::cuda`, feature `cuda`) of the same semantics. The exact
//! math, edge cases and speed targets are in the project's SPEC; the docs of
//! each module restate what the op computes.
//!
//! GlimpsePrune: [`glimpse_scores`] (the glimpse token's attention to the
//! visual tokens), [`select_keep`] (importance logits to kept tokens),
//! [`compact_kv`] (one-shot compaction of every earlier layer's KV cache, and
//! the same gather for hidden states and position ids).
//!
//! FocusLLaVA: [`window_mean`] (one vector per window of the feature map),
//! [`multiscale_gather`] (the vision-guided sampler's multi-scale pooling at
//! each window's chosen scale), [`text_guided_select`] (the text-guided
//! sampler: text-to-visual attention importance, cumulative threshold).
//!
//! Gaze Attention: [`region_descriptors`] (the mean key of each region of a
//! visual unit), [`route_topk`] (each query head's best regions),
//! [`gaze_decode`] (decode attention over the always-visible keys and the
//! routed regions only), all on a [`GazeLayout`]; [`gaze_route_decode`] is
//! route_topk and gaze_decode fused into one launch for a decode step.
//!
//! VISOR: [`cross_attention`] (non-causal attention of a few queries over
//! many keys: text over visual tokens, or learned queries), [`pos_conv1d`]
//! (the visual tokens' conditional position embedding), [`token_pack`]
//! (bilinear resize and space-to-depth at any reduction ratio, VISOR-TR).
//! Glance2Gaze: [`glance_fusion`] (Glance Fusion: S ViT layers' tokens
//! weighted per token by their agreement with the instruction, in one pass).

#![warn(missing_docs)]

pub mod compact_kv;
pub mod cross_attention;
pub mod dtype;
pub mod error;
pub mod gaze_decode;
pub mod gaze_layout;
pub mod gaze_route_decode;
pub mod glance_fusion;
pub mod glimpse_scores;
pub mod layout;
pub mod multiscale_gather;
pub mod pos_conv1d;
pub mod region_descriptors;
pub mod route_topk;
pub mod rows;
pub mod select_keep;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod shared_memory;
pub mod text_guided_select;
pub mod token_pack;
pub mod window_mean;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use compact_kv::{KeepPositions, Padding};
pub use cross_attention::SeqLens;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use gaze_layout::{GazeLayout, GazeRow, RegionShape, Routes};
pub use glimpse_scores::ScoreMode;
pub use layout::{Layout, View, ViewMut};
pub use multiscale_gather::ScaleSet;
pub use rows::{RowLayout, RowSpec};
pub use select_keep::{KeepRule, KeepSet};
pub use window_mean::Pool;
