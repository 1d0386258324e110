//! Sizes of the small LLaVA-style model: a CLIP-style ViT, the LLaVA
//! projector and a Qwen2-style decoder.

use candle_nn::Activation;

/// The vision tower (CLIP ViT, as LLaVA uses it).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Side of the square input image, in pixels.
    pub image_size: usize,
    /// Side of a square patch, in pixels.
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    /// MLP activation (HF CLIP's `hidden_act`: `Gelu` is HF's "gelu" (erf);
    /// OpenAI CLIP checkpoints use "quick_gelu", see [`VisionConfig::quick_gelu`]).
    pub hidden_act: Activation,
    /// OpenAI CLIP's `quick_gelu` (x * sigmoid(1.702 x)) instead of `hidden_act`.
    pub quick_gelu: bool,
    /// A class token (`embeddings.class_embedding`) is prepended and the
    /// position table has `num_patches + 1` rows, as in CLIP. The features the
    /// tower returns are patch tokens only either way (LLaVA drops the class
    /// token).
    pub class_token: bool,
}

impl VisionConfig {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image.
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Rows of the position-embedding table (patches, plus the class token).
    pub fn num_positions(&self) -> usize {
        self.num_patches() + usize::from(self.class_token)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// The language model (Qwen2).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention: `num_heads` is a multiple).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// `lm_head` shares `embed_tokens`' weight (then no `lm_head.weight` is
    /// loaded or saved).
    pub tie_word_embeddings: bool,
}

impl TextConfig {
    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// The whole model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Which of the tower's hidden states feeds the projector, as HF's
    /// `vision_feature_layer`: an index into the `num_layers + 1` hidden states
    /// (0 = embeddings), negative from the end; LLaVA uses -2 (the penultimate
    /// layer's output).
    pub vision_feature_layer: isize,
    /// The projector's activation (`projector_hidden_act`, "gelu").
    pub projector_act: Activation,
}

impl ModelConfig {
    /// The built-in small configuration: a 64x64 image in 8x8 patches (64
    /// visual tokens), a 4-layer ViT of width 128, a 6-layer decoder of width
    /// 256 with 4 query heads and 2 KV heads of dim 64, vocabulary 512.
    pub fn tiny() -> Self {
        ModelConfig {
            vision: VisionConfig {
                image_size: 64,
                patch_size: 8,
                num_channels: 3,
                hidden_size: 128,
                num_layers: 4,
                num_heads: 4,
                intermediate_size: 256,
                layer_norm_eps: 1e-5,
                hidden_act: Activation::Gelu,
                quick_gelu: false,
                class_token: true,
            },
            text: TextConfig {
                vocab_size: 512,
                hidden_size: 256,
                num_layers: 6,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 64,
                intermediate_size: 512,
                rope_theta: 10000.0,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: false,
            },
            vision_feature_layer: -2,
            projector_act: Activation::Gelu,
        }
    }

    /// VISOR's base model: [`ModelConfig::tiny`]'s vision tower and a
    /// 24-layer decoder, as deep as LLaVA-OneVision-0.5B's Qwen2, so that
    /// the paper's layer schedule applies verbatim (8 cross-attention and 8
    /// self-attention layers, Appendix A's configurations), but narrow
    /// (width 64, 4 query / 2 KV heads of dim 16) so that it runs in
    /// moments on a CPU.
    pub fn visor() -> Self {
        let tiny = Self::tiny();
        ModelConfig {
            text: TextConfig {
                hidden_size: 64,
                num_layers: 24,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                intermediate_size: 128,
                ..tiny.text
            },
            ..tiny
        }
    }

    /// The index into the tower's `num_layers + 1` hidden states that feeds the projector.
    pub fn feature_layer_index(&self) -> usize {
        let n = self.vision.num_layers as isize + 1;
        let i = if self.vision_feature_layer < 0 {
            n + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        assert!(
            (0..n).contains(&i),
            "vision_feature_layer {} out of range for {} hidden states",
            self.vision_feature_layer,
            n
        );
        i as usize
    }

    /// Checks the sizes agree (heads divide widths, GQA groups, even head dim).
    pub fn validate(&self) -> candle_core::Result<()> {
        let (v, t) = (&self.vision, &self.text);
        let checks = [
            (
                v.patch_size > 0 && v.image_size % v.patch_size == 0,
                "image_size must be a multiple of patch_size",
            ),
            (
                v.num_heads > 0 && v.hidden_size % v.num_heads == 0,
                "vision hidden_size must be a multiple of num_heads",
            ),
            (
                t.num_kv_heads > 0 && t.num_heads % t.num_kv_heads == 0,
                "num_heads must be a multiple of num_kv_heads",
            ),
            (
                t.head_dim % 2 == 0,
                "head_dim must be even (rotary embeddings)",
            ),
            (
                t.num_layers > 0 && v.num_layers > 0,
                "both towers need at least one layer",
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                candle_core::bail!("ModelConfig: {msg}");
            }
        }
        let n = self.vision.num_layers as isize + 1;
        let i = if self.vision_feature_layer < 0 {
            n + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        if !(0..n).contains(&i) {
            candle_core::bail!(
                "ModelConfig: vision_feature_layer {} out of range for {n} hidden states",
                self.vision_feature_layer
            );
        }
        Ok(())
    }
}
