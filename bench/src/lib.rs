//! Shared, seeded input generators of foveal's benchmarks.
//!
//! Both the criterion benchmarks of the CPU paths (`benches/<op>.rs`) and the
//! CUDA-event benchmark of the GPU paths (`src/bin/gpu_bench/`, one section
//! per op: `src/bin/gpu_bench/<op>.rs`) draw their inputs from here, so the
//! two measure the same cases. Everything is seeded
//! (rand 0.9 [`StdRng`]): the same case gives the same bytes.
//!
//! The cases are GlimpsePrune on a Qwen2.5-VL-7B-style model ([`QWEN25_VL_7B`]:
//! 28 layers, 28 query heads, 4 KV heads, head dim 128, bf16): each batch row is
//! a chat prompt with one or more images (1,024 to 16,384 visual tokens, see
//! [`VISUAL_TOKENS`]) between text, and the glimpse token last ([`rows`]).
//!
//! One module per op, named after it, each with the same parts:
//! - `Case`: what to generate (batch, visual tokens, layout, seed...);
//! - `generate` (host tensors) and, where the GPU bench fills the tensors
//!   itself, `plan` (only the index structures);
//! - `floor_bytes`: the bytes the op must read plus write (each input read
//!   once, each output written once), the numerator of every GB/s figure;
//! - `baseline`: the CPU baseline each criterion group compares against.
//!
//! | op | generator | baseline |
//! |---|---|---|
//! | glimpse_scores | [`glimpse_scores::generate`] | [`glimpse_scores::baseline`]: unfused framework ops (repeat_kv, q.k for every key, softmax, gather) |
//! | select_keep | [`select_keep::generate`] | [`select_keep::baseline`]: sigmoid then a full sort of each row |
//! | compact_kv | [`compact_kv::generate`], [`compact_kv::plan`] | [`compact_kv::baseline`]: a per-layer loop, one gather per K and per V plane (2L calls) |
//! | window_mean | [`window_mean::generate`] | [`window_mean::baseline`]: a contiguous copy, then a naive loop per window and channel |
//! | multiscale_gather | [`multiscale_gather::generate`] | [`multiscale_gather::baseline`]: every scale pooled, softmax, argmax, then a pick per window |
//! | text_guided_select | [`text_guided_select::generate`] | [`text_guided_select::baseline`]: unfused (A `[H, T, N]` materialised, softmax, max, mean, sort, cumsum) |
//! | region_descriptors | [`region_descriptors::generate`] | [`region_descriptors::baseline`]: per region, gather its keys to a new f32 tensor, then the mean |
//! | route_topk | [`route_topk::generate`] | [`route_topk::baseline`]: repeat_kv of the descriptors, scores, full argsort, first k, sort |
//! | gaze_decode | [`gaze_decode::generate`], [`gaze_decode::plan`] | [`gaze_decode::Plan::dense`]: the same op with every position visible (dense decode attention) |
//! | gaze_route_decode | [`gaze_route_decode::generate`] (gaze_decode's case, routes chosen by the scores) | route_topk + gaze_decode (two ops); dense decode attention |
//! | cross_attention | [`cross_attention::generate`], [`cross_attention::sweep`] | [`cross_attention::baseline`]: repeat_kv, S = Q K^T materialised, softmax, P V |
//! | pos_conv1d | [`pos_conv1d::generate`] | [`pos_conv1d::baseline`]: transpose to channels-first, padded conv per channel, transpose back, residual |
//! | token_pack | [`token_pack::generate`] | [`token_pack::baseline`]: the resized map materialised, then the space-to-depth copy |
//! | glance_fusion | [`glance_fusion::generate`] | [`glance_fusion::baseline`]: the literal formula (S x N x M dot products, mean, softmax over layers, weighted sum) |
//!
//! The FocusLLaVA ops (window_mean, multiscale_gather, text_guided_select)
//! use LLaVA-NeXT-style shapes instead: 24 x 24 or 48 x 48 feature maps of
//! 1024 (CLIP-L) or 4096 (projected) channels, and a Llama-3-8B language
//! model ([`LLAMA3_8B`]) for text_guided_select. Their `Case`s carry the
//! shapes themselves (no ragged rows), so `floor_bytes` is on the `Case`.
//! The Gaze Attention ops (region_descriptors, route_topk) use Qwen2.5-VL-7B
//! with 32 x 32-token frames (an image, or a video of up to 16 frames) cut
//! into 6 x 6 regions; their `floor_bytes` take the region count.
//! The VISOR ops use LLaVA-OneVision shapes (27 x 27 SigLIP grids of 729
//! tokens per crop): cross_attention with 0.5B (14 / 2 heads, D 64) and
//! 7B-like (28 / 4, D 128) heads, whose `Case` also carries `flops` and the
//! floor that bounds it on a given machine (`bound`).
//! glance_fusion uses LLaVA-1.5-7B (4 ViT layers, 576 tokens per image, dt
//! 4,096, instructions of 16 to 256 tokens) and LLaVA-NeXT's 5 sub-images.

pub mod compact_kv;
pub mod cross_attention;
pub mod gaze_decode;
pub mod gaze_route_decode;
pub mod glance_fusion;
pub mod glimpse_scores;
pub mod multiscale_gather;
pub mod pos_conv1d;
pub mod region_descriptors;
pub mod route_topk;
pub mod rows;
pub mod select_keep;
pub mod text_guided_select;
pub mod token_pack;
pub mod window_mean;

use foveal::{Element, Layout};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The attention shape of a decoder: layers, query heads, KV heads, head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl ModelDims {
    /// Query heads per KV head (GQA group size).
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Qwen2.5-VL-7B's language model: 28 layers, 28 query heads, 4 KV heads, head dim 128.
pub const QWEN25_VL_7B: ModelDims = ModelDims {
    layers: 28,
    q_heads: 28,
    kv_heads: 4,
    head_dim: 128,
};

/// Llama-3-8B (LLaVA-NeXT's language model for text_guided_select): 32 layers,
/// 32 query heads, 8 KV heads, head dim 128.
pub const LLAMA3_8B: ModelDims = ModelDims {
    layers: 32,
    q_heads: 32,
    kv_heads: 8,
    head_dim: 128,
};

/// The visual-token counts the benchmarks sweep (a 448x448 image is about
/// 256 tokens on Qwen2.5-VL; 1K to 16K covers large images, several images and video).
pub const VISUAL_TOKENS: [usize; 3] = [1024, 4096, 16384];

/// The memory order of a KV cache, viewed as `[B, S, H, D]` either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvLayout {
    /// `[B, S, H, D]` in memory (flash / vLLM).
    Bshd,
    /// `[B, H, S, D]` in memory (candle / HF).
    Bhsd,
}

impl KvLayout {
    pub const ALL: [KvLayout; 2] = [KvLayout::Bshd, KvLayout::Bhsd];

    /// The `[B, S, H, D]` view of a cache of this memory order.
    pub fn layout(self, b: usize, s: usize, h: usize, d: usize) -> Layout<4> {
        match self {
            KvLayout::Bshd => Layout::bshd(b, s, h, d),
            KvLayout::Bhsd => Layout::bhsd(b, s, h, d),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvLayout::Bshd => "bshd",
            KvLayout::Bhsd => "bhsd",
        }
    }
}

/// A seeded generator: the same seed gives the same case.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`, rounded to `T`. Never all zeros (zeros
/// hide unwritten outputs and can run faster than real data).
pub fn random_elems<T: Element>(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(lo..hi)))
        .collect()
}

/// One standard normal sample (Box-Muller; rand 0.9 has no normal distribution
/// without rand_distr).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A human-readable byte count (MiB / GiB, binary).
pub fn fmt_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let b = bytes as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Whether a criterion benchmark binary is measuring (`cargo bench` passes
/// `--bench`) rather than smoke-testing each routine once (`cargo test
/// --benches`). The benches use small inputs in the second case, so that a
/// test run stays fast (and unoptimised builds do not crawl over large inputs).
pub fn criterion_measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}
