//! GlimpsePrune's Visual Importance Predictor (VIP): a small transformer over
//! the visual tokens that turns the glimpse attention into one importance
//! logit per token (SPEC "GlimpsePrune": a small model, built from candle ops).
//!
//! Input: the glimpse attention `A [B, Nv, Hq]` (foveal's glimpse_scores) and
//! M intermediate ViT feature maps `V_m [B, Nv, C]`. `A` is projected to the
//! hidden size E; block m is a self-attention whose queries and keys are the
//! concatenation, per head, of the block's own projection (E / H dims) and a
//! projection of `V_m` (F / H dims) — the visual condition — with 2D rotary
//! embeddings over the tokens' grid coordinates, values of E / H dims; then a
//! SwiGLU MLP; pre-RMSNorm residual blocks. A final norm and a linear layer
//! give one logit per token. The paper's sizes: E = 256, H = 4, F = 512
//! (q/k head dim 64 + 128 = 192, v head dim 64), M = 4.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{linear, rms_norm, Linear, Module, RmsNorm, VarBuilder};

use crate::nn::SwiGlu;

/// Sizes of the predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct VipConfig {
    /// Query heads of the decoder: the width of the glimpse attention.
    pub in_heads: usize,
    /// Width of the ViT features.
    pub feature_dim: usize,
    /// Hidden size E.
    pub hidden: usize,
    pub heads: usize,
    /// Width F of the projected visual condition.
    pub cond: usize,
    /// Number of blocks M (one ViT feature map each).
    pub blocks: usize,
    pub mlp: usize,
    pub rope_theta: f32,
    pub eps: f64,
}

impl VipConfig {
    /// The paper's predictor (E 256, 4 heads, F 512, 4 blocks).
    pub fn paper(in_heads: usize, feature_dim: usize) -> Self {
        VipConfig {
            in_heads,
            feature_dim,
            hidden: 256,
            heads: 4,
            cond: 512,
            blocks: 4,
            mlp: 1024,
            rope_theta: 100.0,
            eps: 1e-6,
        }
    }

    /// A small predictor for the built-in model.
    pub fn tiny(in_heads: usize, feature_dim: usize) -> Self {
        VipConfig {
            in_heads,
            feature_dim,
            hidden: 64,
            heads: 4,
            cond: 64,
            blocks: 4,
            mlp: 128,
            rope_theta: 100.0,
            eps: 1e-6,
        }
    }

    fn qk_head_dim(&self) -> usize {
        (self.hidden + self.cond) / self.heads
    }

    fn validate(&self) -> Result<()> {
        if self.hidden % self.heads != 0
            || self.cond % self.heads != 0
            || self.qk_head_dim() % 4 != 0
        {
            candle_core::bail!("VipConfig: hidden {} and cond {} must split into {} heads of a q/k dim divisible by 4", self.hidden, self.cond, self.heads)
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    cond_proj: Linear,
    o_proj: Linear,
    norm2: RmsNorm,
    mlp: SwiGlu,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &VipConfig) -> Result<Self> {
        let (e, f) = (cfg.hidden, cfg.cond);
        Ok(Block {
            norm1: rms_norm(e, cfg.eps, vb.pp("norm1"))?,
            q_proj: linear(e, e, vb.pp("q_proj"))?,
            k_proj: linear(e, e, vb.pp("k_proj"))?,
            v_proj: linear(e, e, vb.pp("v_proj"))?,
            cond_proj: linear(cfg.feature_dim, f, vb.pp("cond_proj"))?,
            o_proj: linear(e, e, vb.pp("o_proj"))?,
            norm2: rms_norm(e, cfg.eps, vb.pp("norm2"))?,
            mlp: SwiGlu::new(vb.pp("mlp"), e, cfg.mlp)?,
        })
    }

    /// `x [B, N, E]`, `feature [B, N, C]`, rope tables `[N, qk/2]`, additive key mask `[B, 1, 1, N]`.
    fn forward(
        &self,
        x: &Tensor,
        feature: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cfg: &VipConfig,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let h = cfg.heads;
        let heads = |t: Tensor, d: usize| t.reshape((b, n, h, d))?.transpose(1, 2)?.contiguous();
        let xn = self.norm1.forward(x)?;
        let cond = heads(self.cond_proj.forward(feature)?, cfg.cond / h)?;
        let q = Tensor::cat(
            &[
                heads(self.q_proj.forward(&xn)?, cfg.hidden / h)?,
                cond.clone(),
            ],
            3,
        )?;
        let k = Tensor::cat(
            &[heads(self.k_proj.forward(&xn)?, cfg.hidden / h)?, cond],
            3,
        )?;
        let v = heads(self.v_proj.forward(&xn)?, cfg.hidden / h)?;
        let (q, k) = (rope_2d(&q, rope)?, rope_2d(&k, rope)?);
        let scale = 1.0 / (cfg.qk_head_dim() as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let attn = attn.transpose(1, 2)?.reshape((b, n, cfg.hidden))?;
        let x = (x + self.o_proj.forward(&attn)?)?;
        x.clone() + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// 2D rotary embedding: the first half of each q/k head rotates with the
/// token's grid row, the second half with its column (rotate-half within
/// each half). `rope` = (cos, sin) `[N, d/2]`, rows' angles then columns'.
fn rope_2d(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let halves = [
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    ];
    let mut out = Vec::with_capacity(2);
    for (i, part) in halves.iter().enumerate() {
        let c = cos.narrow(1, i * d / 4, d / 4)?;
        let s = sin.narrow(1, i * d / 4, d / 4)?;
        out.push(candle_nn::rotary_emb::rope(
            &part.contiguous()?,
            &c.contiguous()?,
            &s.contiguous()?,
        )?);
    }
    Tensor::cat(&out, D::Minus1)
}

/// The predictor.
#[derive(Debug, Clone)]
pub struct Vip {
    in_proj: Linear,
    blocks: Vec<Block>,
    norm: RmsNorm,
    out_proj: Linear,
    cfg: VipConfig,
}

impl Vip {
    pub fn new(vb: VarBuilder, cfg: &VipConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Vip {
            in_proj: linear(cfg.in_heads, cfg.hidden, vb.pp("in_proj"))?,
            blocks: (0..cfg.blocks)
                .map(|m| Block::new(vb.pp(format!("blocks.{m}")), cfg))
                .collect::<Result<_>>()?,
            norm: rms_norm(cfg.hidden, cfg.eps, vb.pp("norm"))?,
            out_proj: linear(cfg.hidden, 1, vb.pp("out_proj"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VipConfig {
        &self.cfg
    }

    /// The cos/sin tables of the tokens' grid coordinates `(row, col)`.
    fn rope_tables(
        &self,
        grid: &[(usize, usize)],
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let quarter = self.cfg.qk_head_dim() / 4;
        let inv: Vec<f32> = (0..quarter)
            .map(|i| 1.0 / self.cfg.rope_theta.powf(i as f32 / quarter as f32))
            .collect();
        let mut angles = Vec::with_capacity(grid.len() * 2 * quarter);
        for &(r, c) in grid {
            angles.extend(inv.iter().map(|f| r as f32 * f));
            angles.extend(inv.iter().map(|f| c as f32 * f));
        }
        let a = Tensor::from_vec(angles, (grid.len(), 2 * quarter), device)?;
        Ok((a.cos()?.to_dtype(dtype)?, a.sin()?.to_dtype(dtype)?))
    }

    /// Importance logits `[B, N]` (f32) of the visual tokens: `attention`
    /// `[B, N, Hq]` (rows padded past `nv[b]`), `features` one `[B, N, C]` map
    /// per block, `grid` each token's (row, col), `nv` the valid count per row
    /// (padded tokens are masked out of the attention; their logits are
    /// meaningless).
    pub fn forward(
        &self,
        attention: &Tensor,
        features: &[Tensor],
        grid: &[(usize, usize)],
        nv: &[usize],
    ) -> Result<Tensor> {
        let (b, n, _) = attention.dims3()?;
        if features.len() != self.blocks.len() || grid.len() != n || nv.len() != b {
            candle_core::bail!(
                "Vip::forward: {} feature maps for {} blocks, {} grid cells and {} counts for {b} rows of {n} tokens",
                features.len(),
                self.blocks.len(),
                grid.len(),
                nv.len()
            )
        }
        let dtype = self.in_proj.weight().dtype();
        let device = attention.device();
        let rope = self.rope_tables(grid, device, dtype)?;
        let mask: Vec<f32> = nv
            .iter()
            .flat_map(|&c| (0..n).map(move |i| if i < c { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, n), device)?.to_dtype(dtype)?;
        let mut x = self.in_proj.forward(&attention.to_dtype(dtype)?)?;
        for (block, feature) in self.blocks.iter().zip(features) {
            x = block.forward(&x, &feature.to_dtype(dtype)?, &rope, &mask, &self.cfg)?;
        }
        self.out_proj
            .forward(&self.norm.forward(&x)?)?
            .squeeze(2)?
            .to_dtype(DType::F32)
    }
}
