//! GlimpsePrune's Visual Importance Predictor (VIP; seeds/001 §3, Fig. 3b-c)
//! as its authors build it (their `AttnFuserV1`, and `AttnFuserV2` without
//! visual conditioning), with their parameter names (under `attn_fuser.` in
//! their saved modules), and their training-free baseline map
//! (`AttnFuserDummy`). docs/glimpseprune.md lists every setting.
//!
//! Per image of `h x w` visual tokens (a token attends only within its own
//! image), from the glimpse attention `A [n, layers x heads]` (foveal's
//! glimpse_scores at each selected decoder layer, layer-major) and one ViT
//! feature map `V_m [n, C]` per block (deepest first):
//!
//! - `x = attn_in_proj(A)` (width E, with bias);
//! - block m (`layers.m`): `c = cond_in_projs.m(V_m)` (width F, with bias;
//!   V2 has none), `u = [norm1(x); c]` (RMSNorm, eps 1e-6),
//!   `q = attn.q_proj(u)`, `k = attn.k_proj(u)` (square E+F, no bias),
//!   `v = attn.v_proj(norm1(x))` (square E, no bias), H heads (q/k head dim
//!   `d = (E+F)/H`, v head dim E/H), 2D RoPE on q and k,
//!   `x += attn.o_proj(softmax(q k^T / sqrt(d)) v)`, then
//!   `x += mlp(norm2(x))` (gated MLP of width 2E with biases,
//!   `down(act(gate(.)) * up(.))`);
//! - one logit per token: `attn_out_projs.{M-1}(x)` (no final norm; with
//!   deep supervision every block has an output projection, and inference
//!   reads only the last).
//!
//! The 2D RoPE is Qwen2.5-VL's vision tower's: theta 10,000, `d/4`
//! frequencies `theta^(-4j/d)`; token (row r, column c) has the angles
//! `[r f_0 .. r f_{d/4-1}, c f_0 .. c f_{d/4-1}]` (`d/2` of them), and
//! channels `i` and `i + d/2` rotate together by angle `i` (rotate-half over
//! the whole head).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{
    linear, linear_no_bias, rms_norm, Activation, Linear, Module, RmsNorm, VarBuilder,
};
use foveal::ScoreMode;

use crate::nn::SwiGlu;

/// RoPE base of the predictor (Qwen2.5-VL's vision tower's).
pub const ROPE_THETA: f32 = 10_000.0;
/// eps of the predictor's RMSNorms.
pub const NORM_EPS: f64 = 1e-6;
/// The baseline map's min-max normalisation: `(m - min) / (max - min + eps)`.
pub const BASELINE_EPS: f32 = 1e-6;

/// Sizes of the predictor (upstream names in brackets).
#[derive(Debug, Clone, PartialEq)]
pub struct VipConfig {
    /// Width of the glimpse attention: selected decoder layers x query heads
    /// (`len(selected_layers) * num_attention_heads`).
    pub in_features: usize,
    /// Width C of the conditioning ViT features (the tower's hidden size).
    pub vision_hidden: usize,
    /// E (`attn_fuse_size`).
    pub hidden: usize,
    /// F (`visual_cond_size`); `None`: no visual conditioning (`AttnFuserV2`).
    pub cond: Option<usize>,
    /// H (`attn_fuse_num_heads`).
    pub heads: usize,
    /// M blocks, one per conditioning feature map (`len(selected_visual_layers)`).
    pub layers: usize,
    /// The MLP's activation (`attn_fuse_hidden_act`).
    pub act: Activation,
}

impl VipConfig {
    /// The q/k head dim `(E + F) / H`.
    pub fn qk_head_dim(&self) -> usize {
        (self.hidden + self.cond.unwrap_or(0)) / self.heads.max(1)
    }

    /// Checks the sizes split into heads and the 2D rotary embedding.
    pub fn validate(&self) -> Result<()> {
        let qk = self.hidden + self.cond.unwrap_or(0);
        if self.in_features == 0 || self.hidden == 0 || self.heads == 0 || self.layers == 0 {
            candle_core::bail!(
                "VipConfig: input width, hidden size, heads and blocks must be positive ({self:?})"
            );
        }
        if self.hidden % self.heads != 0 || qk % self.heads != 0 || (qk / self.heads) % 4 != 0 {
            candle_core::bail!(
                "VipConfig: E {} and E + F {qk} must split into {} heads, of a q/k head dim divisible by 4 (2D RoPE: rows and columns each a quarter of it)",
                self.hidden,
                self.heads
            );
        }
        Ok(())
    }
}

/// `CondSdpaAttention`: q and k from `[x; c]`, v and the output from x.
#[derive(Debug, Clone)]
struct CondAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
}

impl CondAttention {
    fn new(vb: VarBuilder, cfg: &VipConfig) -> Result<Self> {
        let (e, qk) = (cfg.hidden, cfg.hidden + cfg.cond.unwrap_or(0));
        Ok(CondAttention {
            q_proj: linear_no_bias(qk, qk, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(qk, qk, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(e, e, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(e, e, vb.pp("o_proj"))?,
            heads: cfg.heads,
        })
    }

    /// `x [G, n, E]` (normed), `cond [G, n, F]`, rope (cos, sin) `[n, d/2]` f32.
    fn forward(
        &self,
        x: &Tensor,
        cond: Option<&Tensor>,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (g, n, e) = x.dims3()?;
        let u = match cond {
            Some(c) => Tensor::cat(&[x, c], 2)?,
            None => x.clone(),
        };
        let h = self.heads;
        let split = |t: Tensor| {
            let w = t.dim(2)?;
            t.reshape((g, n, h, w / h))?.transpose(1, 2)?.contiguous()
        };
        let q = rope_2d(&split(self.q_proj.forward(&u)?)?, rope)?;
        let k = rope_2d(&split(self.k_proj.forward(&u)?)?, rope)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (q.dim(3)? as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((g, n, e))?;
        self.o_proj.forward(&out)
    }
}

/// Rotate-half RoPE over the whole head, in f32 (as upstream), back to the
/// input's dtype: `x [G, H, n, d]`, (cos, sin) `[n, d/2]`.
fn rope_2d(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Result<Tensor> {
    candle_nn::rotary_emb::rope(&x.to_dtype(DType::F32)?.contiguous()?, cos, sin)?
        .to_dtype(x.dtype())
}

/// `AttnFuserLayer`: pre-RMSNorm attention and gated MLP, both residual.
#[derive(Debug, Clone)]
struct FuserLayer {
    norm1: RmsNorm,
    norm2: RmsNorm,
    attn: CondAttention,
    mlp: SwiGlu,
}

impl FuserLayer {
    fn new(vb: VarBuilder, cfg: &VipConfig) -> Result<Self> {
        let e = cfg.hidden;
        Ok(FuserLayer {
            norm1: rms_norm(e, NORM_EPS, vb.pp("norm1"))?,
            norm2: rms_norm(e, NORM_EPS, vb.pp("norm2"))?,
            attn: CondAttention::new(vb.pp("attn"), cfg)?,
            mlp: SwiGlu::with(vb.pp("mlp"), e, 2 * e, cfg.act, true)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cond: Option<&Tensor>,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, cond, rope)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// The predictor. Build it on the `attn_fuser` prefix of the authors' saved modules.
#[derive(Debug, Clone)]
pub struct Vip {
    attn_in_proj: Linear,
    cond_in_projs: Vec<Linear>,
    layers: Vec<FuserLayer>,
    attn_out_proj: Linear,
    cfg: VipConfig,
}

impl Vip {
    pub fn new(vb: VarBuilder, cfg: &VipConfig) -> Result<Self> {
        cfg.validate()?;
        let m = cfg.layers;
        let cond_in_projs = match cfg.cond {
            Some(f) => (0..m)
                .map(|i| linear(cfg.vision_hidden, f, vb.pp(format!("cond_in_projs.{i}"))))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        Ok(Vip {
            attn_in_proj: linear(cfg.in_features, cfg.hidden, vb.pp("attn_in_proj"))?,
            cond_in_projs,
            layers: (0..m)
                .map(|i| FuserLayer::new(vb.pp(format!("layers.{i}")), cfg))
                .collect::<Result<_>>()?,
            attn_out_proj: linear(cfg.hidden, 1, vb.pp(format!("attn_out_projs.{}", m - 1)))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VipConfig {
        &self.cfg
    }

    /// Importance logits `[B, N]` (f32) of the visual tokens.
    ///
    /// - `attention` `[B, N, in_features]`: the glimpse attention of each
    ///   row's visual tokens (padded past them).
    /// - `features`: one `[B, N, C]` map per block, deepest first (none for
    ///   an unconditioned predictor), aligned with the visual tokens.
    /// - `grids`: per row, the `(h, w)` grids of its images in the order of
    ///   its visual tokens (row-major within each image).
    ///
    /// Each image runs alone (images of one grid size batched together).
    /// Positions past a row's images are 0.
    pub fn forward(
        &self,
        attention: &Tensor,
        features: &[Tensor],
        grids: &[Vec<(usize, usize)>],
    ) -> Result<Tensor> {
        let (_, n, w) = attention.dims3()?;
        let wanted = if self.cfg.cond.is_some() {
            self.cfg.layers
        } else {
            0
        };
        if w != self.cfg.in_features || features.len() != wanted {
            candle_core::bail!(
                "Vip::forward: attention of width {w} and {} feature maps, the predictor takes {} and {wanted}",
                features.len(),
                self.cfg.in_features
            );
        }
        let images = images(grids, attention.dim(0)?, n)?;
        for f in features {
            let (fb, fn_, fc) = f.dims3()?;
            if fb != grids.len() || fn_ < n || fc != self.cfg.vision_hidden {
                candle_core::bail!(
                    "Vip::forward: a feature map {:?}, expected [{}, >= {n}, {}]",
                    f.dims(),
                    grids.len(),
                    self.cfg.vision_hidden
                );
            }
        }
        let dtype = self.attn_in_proj.weight().dtype();
        let mut logits = vec![None; images.len()];
        for ((h, w), members) in by_grid(&images) {
            let take = |t: &Tensor| -> Result<Tensor> {
                let parts = members
                    .iter()
                    .map(|&i| t.get(images[i].row)?.narrow(0, images[i].offset, h * w))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&parts, 0)?.to_dtype(dtype)
            };
            let conds = features.iter().map(take).collect::<Result<Vec<_>>>()?;
            let out = self.run(&take(attention)?, &conds, h, w)?;
            for (g, &i) in members.iter().enumerate() {
                logits[i] = Some(out.get(g)?);
            }
        }
        place(logits, &images, grids.len(), n, attention.device())
    }

    /// The predictor over `G` images of one `h x w` grid: `a [G, h*w, in]`,
    /// `conds` `[G, h*w, C]` each -> `[G, h*w]` f32.
    fn run(&self, a: &Tensor, conds: &[Tensor], h: usize, w: usize) -> Result<Tensor> {
        let rope = rope_tables(self.cfg.qk_head_dim(), h, w, a.device())?;
        let mut x = self.attn_in_proj.forward(a)?;
        for (m, layer) in self.layers.iter().enumerate() {
            let cond = match self.cond_in_projs.get(m) {
                Some(proj) => Some(proj.forward(&conds[m])?),
                None => None,
            };
            x = layer.forward(&x, cond.as_ref(), &rope)?;
        }
        self.attn_out_proj
            .forward(&x)?
            .squeeze(2)?
            .to_dtype(DType::F32)
    }
}

/// cos and sin `[h*w, d/2]` (f32) of the 2D RoPE angles of an `h x w` grid
/// (row-major tokens), q/k head dim `d` (see the module doc).
pub fn rope_tables(d: usize, h: usize, w: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let quarter = d / 4;
    let inv: Vec<f32> = (0..quarter)
        .map(|j| 1.0 / ROPE_THETA.powf((4 * j) as f32 / d as f32))
        .collect();
    let mut angles = Vec::with_capacity(h * w * 2 * quarter);
    for r in 0..h {
        for c in 0..w {
            angles.extend(inv.iter().map(|f| r as f32 * f));
            angles.extend(inv.iter().map(|f| c as f32 * f));
        }
    }
    let a = Tensor::from_vec(angles, (h * w, 2 * quarter), device)?;
    Ok((a.cos()?, a.sin()?))
}

/// The training-free baseline importance map (upstream's `AttnFuserDummy`;
/// no learned parts): per visual token the mean of its glimpse attention
/// over every selected layer and head; per image a distribution over the
/// image's tokens (`mode` Logits: softmax of the means; LogSoftmax: exp of
/// the means); min-max normalised, `(m - min) / (max - min + 1e-6)`.
/// `attention` `[B, N, W]`, `grids` as for [`Vip::forward`] -> `[B, N]` f32
/// in `[0, 1)`, 0 past each row's images. The keep rule reads it as logits,
/// as upstream does (`sigmoid(map) > threshold`; at threshold 0.5 every
/// token above its image's minimum passes, so the baseline is meant to be
/// used with `max_remain_ratio`).
pub fn baseline_map(
    attention: &Tensor,
    grids: &[Vec<(usize, usize)>],
    mode: ScoreMode,
) -> Result<Tensor> {
    let (b, n, _) = attention.dims3()?;
    let images = images(grids, b, n)?;
    let mean = attention.to_dtype(DType::F32)?.mean(D::Minus1)?;
    let maps = images
        .iter()
        .map(|img| {
            let m = mean.get(img.row)?.narrow(0, img.offset, img.h * img.w)?;
            let p = match mode {
                ScoreMode::Logits => candle_nn::ops::softmax_last_dim(&m)?,
                ScoreMode::LogSoftmax => m.exp()?,
                ScoreMode::Softmax => candle_core::bail!(
                    "baseline_map: the glimpse attention is read as logits or log-softmax (upstream's use_attention_logits), not probabilities"
                ),
            };
            let (lo, hi) = (p.min(0)?, p.max(0)?);
            let range = ((&hi - &lo)? + f64::from(BASELINE_EPS))?;
            Ok(Some(p.broadcast_sub(&lo)?.broadcast_div(&range)?))
        })
        .collect::<Result<Vec<_>>>()?;
    place(maps, &images, b, n, attention.device())
}

/// Qwen2.5-VL's conditioning features: its vision tower lays patches out
/// merge unit by merge unit (`unit` = 4 consecutive patches form one 2 x 2
/// unit, one LLM token), and the authors average each unit's features:
/// `[B, N * unit, C]` -> `[B, N, C]`.
pub fn merge_unit_mean(features: &Tensor, unit: usize) -> Result<Tensor> {
    let (b, np, c) = features.dims3()?;
    if unit == 0 || np % unit != 0 {
        candle_core::bail!("merge_unit_mean: {np} patches do not split into units of {unit}");
    }
    features.reshape((b, np / unit, unit, c))?.mean(2)
}

/// One image of a row: its first visual token and grid.
struct Image {
    row: usize,
    offset: usize,
    h: usize,
    w: usize,
}

/// Every image of `grids`, checked to fit `b` rows of `n` visual tokens.
fn images(grids: &[Vec<(usize, usize)>], b: usize, n: usize) -> Result<Vec<Image>> {
    if grids.len() != b {
        candle_core::bail!(
            "GlimpsePrune predictor: {} rows of image grids for {b} rows",
            grids.len()
        );
    }
    let mut out = Vec::new();
    for (row, gs) in grids.iter().enumerate() {
        let mut offset = 0;
        for &(h, w) in gs {
            if h == 0 || w == 0 {
                candle_core::bail!(
                    "GlimpsePrune predictor: row {row} has an empty {h} x {w} image"
                );
            }
            out.push(Image { row, offset, h, w });
            offset += h * w;
        }
        if offset > n {
            candle_core::bail!("GlimpsePrune predictor: row {row}'s images hold {offset} tokens, more than the {n} given");
        }
    }
    Ok(out)
}

/// The images' indices grouped by grid size (each group runs as one batch).
fn by_grid(images: &[Image]) -> BTreeMap<(usize, usize), Vec<usize>> {
    let mut groups: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        groups.entry((img.h, img.w)).or_default().push(i);
    }
    groups
}

/// Per-image maps `[h*w]` back into rows: `[B, N]`, zeros past each row's images.
fn place(
    maps: Vec<Option<Tensor>>,
    images: &[Image],
    b: usize,
    n: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut rows: Vec<Vec<Tensor>> = vec![Vec::new(); b];
    let mut used = vec![0; b];
    for (map, img) in maps.into_iter().zip(images) {
        let Some(map) = map else {
            candle_core::bail!("GlimpsePrune predictor: an image was not computed")
        };
        rows[img.row].push(map.to_dtype(DType::F32)?);
        used[img.row] += img.h * img.w;
    }
    let rows = rows
        .into_iter()
        .zip(used)
        .map(|(mut parts, u)| {
            if u < n {
                parts.push(Tensor::zeros(n - u, DType::F32, device)?);
            }
            Tensor::cat(&parts, 0)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}
