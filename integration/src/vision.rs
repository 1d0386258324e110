//! A CLIP-style vision transformer (the LLaVA vision tower), HF names under
//! `vision_tower.vision_model`: patch embedding (a bias-free conv with stride
//! = patch, computed as a matmul over flattened patches), optional class
//! token, learned position embeddings, `pre_layrnorm`, pre-LN encoder blocks.
//!
//! [`VisionTower::forward`] returns every hidden state, as HF's
//! `output_hidden_states`: index 0 is the embeddings (after `pre_layrnorm`),
//! index `i` the output of encoder layer `i` (1-based), each `[B, Np, C]` with
//! patch tokens only (the class token, when present, is dropped, as LLaVA's
//! "default" feature selection does).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use crate::config::VisionConfig;
use crate::nn::activate;

#[derive(Debug, Clone)]
struct VisionAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(VisionAttention {
            q_proj: linear(c, c, vb.pp("q_proj"))?,
            k_proj: linear(c, c, vb.pp("k_proj"))?,
            v_proj: linear(c, c, vb.pp("v_proj"))?,
            out_proj: linear(c, c, vb.pp("out_proj"))?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let dtype = q.dtype();
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct VisionLayer {
    self_attn: VisionAttention,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    cfg: VisionConfig,
}

impl VisionLayer {
    fn new(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(VisionLayer {
            self_attn: VisionAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: layer_norm(c, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            layer_norm2: layer_norm(c, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(c, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, c, vb.pp("mlp.fc2"))?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = activate(&h, self.cfg.hidden_act, self.cfg.quick_gelu)?;
        xs + self.fc2.forward(&h)?
    }
}

/// The vision tower. Build it on the `vision_tower.vision_model` prefix.
#[derive(Debug, Clone)]
pub struct VisionTower {
    /// `[C, channels, P, P]` (HF conv weight).
    patch_embedding: Tensor,
    /// `[C]`, when the config has a class token.
    class_embedding: Option<Tensor>,
    /// `[num_positions, C]`.
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<VisionLayer>,
    cfg: VisionConfig,
}

impl VisionTower {
    pub fn new(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let (c, p) = (cfg.hidden_size, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_embedding = emb.get((c, cfg.num_channels, p, p), "patch_embedding.weight")?;
        let class_embedding = if cfg.class_token {
            Some(emb.get(c, "class_embedding")?)
        } else {
            None
        };
        let position_embedding = emb.get((cfg.num_positions(), c), "position_embedding.weight")?;
        let pre_layrnorm = layer_norm(c, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?;
        let layers = (0..cfg.num_layers)
            .map(|i| VisionLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Every hidden state: `num_layers + 1` tensors `[B, Np, C]` (see the module doc).
    pub fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_upto(pixels, self.cfg.num_layers)
    }

    /// Hidden states `0..=last` only (the layers after `last` are not run):
    /// LLaVA's penultimate-layer features need `last = num_layers - 1`.
    pub fn forward_upto(&self, pixels: &Tensor, last: usize) -> Result<Vec<Tensor>> {
        if last > self.cfg.num_layers {
            candle_core::bail!(
                "VisionTower: hidden state {last} requested, the tower has {} layers",
                self.cfg.num_layers
            );
        }
        let cls = usize::from(self.class_embedding.is_some());
        let mut xs = self.embed(pixels)?;
        let np = self.cfg.num_patches();
        let mut states = vec![xs.narrow(1, cls, np)?];
        for layer in &self.layers[..last] {
            xs = layer.forward(&xs)?;
            states.push(xs.narrow(1, cls, np)?);
        }
        Ok(states)
    }

    /// Patch + class + position embeddings and `pre_layrnorm`: `[B, cls + Np, C]`.
    fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, ch, h, w) = pixels.dims4()?;
        let (p, side, c) = (cfg.patch_size, cfg.patches_per_side(), cfg.hidden_size);
        if ch != cfg.num_channels || h != cfg.image_size || w != cfg.image_size {
            candle_core::bail!(
                "VisionTower: pixels {:?}, expected [B, {}, {}, {}]",
                pixels.dims(),
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size
            );
        }
        let dtype = self.patch_embedding.dtype();
        // [B, ch, Hp, P, Wp, P] -> [B, Hp, Wp, ch, P, P] -> [B, Np, ch*P*P]: a
        // patch flattened in the conv weight's (in, kh, kw) order.
        let patches = pixels
            .to_dtype(dtype)?
            .reshape(vec![b, ch, side, p, side, p])?
            .permute([0, 2, 4, 1, 3, 5])?
            .reshape((b, side * side, ch * p * p))?;
        let w = self.patch_embedding.reshape((c, ch * p * p))?;
        let mut xs = patches.broadcast_matmul(&w.t()?)?;
        if let Some(cls) = &self.class_embedding {
            let cls = cls.reshape((1, 1, c))?.broadcast_as((b, 1, c))?;
            xs = Tensor::cat(&[&cls, &xs], 1)?;
        }
        let xs = xs.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.pre_layrnorm.forward(&xs.contiguous()?)
    }
}
