//! Glance2Gaze's Gaze Compression (SPEC "Glance2Gaze"): before a
//! compressed decoder layer `l`, the `p_{l-1}` visual tokens of a unit (an
//! image, a sub-image or a video frame) become `p_l` tokens,
//!
//! `H_l = F_o(CrossAttn(F_q(Q_pool[:p_l] + PE2D(p_l)), F_k(H_{l-1}), F_v(H_{l-1})))`,
//!
//! with one query pool `Q_pool [p_r, dt]` shared by every layer and sliced
//! to its first `p_l` rows. Choices (docs/architecture.md, "Glance2Gaze in
//! the model"):
//!
//! - **Query grid and PE2D.** The `p` queries of a step lie on a grid of
//!   `w = ceil(sqrt(p))` columns and `ceil(p / w)` rows spread over the
//!   unit's `side x side` patch grid, in raster order; query `i` sits at
//!   its cell's centre, `((x + 0.5) side / w - 0.5, (y + 0.5) side / h -
//!   0.5)` in patch units ([`query_cell`]). PE2D is the fixed 2D sin-cos
//!   embedding of that point (MAE's and Qwen-VL's resampler's: the first
//!   half of the channels encodes x, the second y, each `[sin, cos]` with
//!   frequencies `10000^(-k / (dt / 4))`), added to the pool's rows. With `p
//!   = side^2` the points are the patches themselves.
//! - **Heads.** The decoder's layout: `Hq` heads of `D` (F_q, F_k, F_v map
//!   `dt -> Hq D`, F_o back; no GQA), scale `1/sqrt(D)`; every projection
//!   has a bias (`nn.MultiheadAttention`'s default).
//! - **One module** for every compressed layer: the projections are shared
//!   like the pool (the SPEC's equation indexes neither by layer).

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use crate::ops::{self, AttendLens};

/// The pool and the four projections (`query_pool`, `q_proj`, `k_proj`,
/// `v_proj`, `o_proj` under the builder's prefix).
#[derive(Debug, Clone)]
pub struct GazeCompression {
    /// `[p_r, dt]`.
    pool: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl GazeCompression {
    /// A pool of `pool_size` queries of width `dt`, `heads` heads of
    /// `head_dim`.
    pub fn new(
        vb: VarBuilder,
        dt: usize,
        heads: usize,
        head_dim: usize,
        pool_size: usize,
    ) -> Result<Self> {
        if dt % 4 != 0 {
            candle_core::bail!(
                "GazeCompression: the 2D sin-cos embedding needs a width divisible by 4, not {dt}"
            );
        }
        let inner = heads * head_dim;
        Ok(GazeCompression {
            pool: vb.get((pool_size, dt), "query_pool")?,
            q_proj: linear(dt, inner, vb.pp("q_proj"))?,
            k_proj: linear(dt, inner, vb.pp("k_proj"))?,
            v_proj: linear(dt, inner, vb.pp("v_proj"))?,
            o_proj: linear(inner, dt, vb.pp("o_proj"))?,
            heads,
            head_dim,
        })
    }

    /// `p_r`: the most tokens a step can give.
    pub fn pool_size(&self) -> usize {
        self.pool.dim(0).unwrap_or(0)
    }

    /// The queries of a step to `p` tokens over units of `side x side`
    /// patches: `Q_pool[:p] + PE2D`, `[p, dt]` (the pool's dtype), before F_q.
    pub fn queries(&self, p: usize, side: usize) -> Result<Tensor> {
        if p == 0 || p > self.pool_size() {
            candle_core::bail!(
                "GazeCompression: {p} queries from a pool of {}",
                self.pool_size()
            );
        }
        let dt = self.pool.dim(1)?;
        let pe = pos_embed_2d(p, side, dt, self.pool.device())?.to_dtype(self.pool.dtype())?;
        self.pool.narrow(0, 0, p)? + pe
    }

    /// One step: `units [U, n, dt]` (each unit's visual tokens) -> `[U, p,
    /// dt]`, `p <= n` tokens per unit on a `side x side` patch grid.
    pub fn forward(&self, units: &Tensor, p: usize, side: usize) -> Result<Tensor> {
        Ok(self.step(units, p, side, false)?.0)
    }

    /// [`GazeCompression::forward`], and which tokens the queries attended:
    /// per unit the attention probabilities over its `n` tokens, mean over
    /// the `p` queries and the heads, `[U, n]` f32 (each sums to 1; from
    /// the op's lse, [`ops::cross_attention_probs`]). For pictures.
    pub fn forward_recording(
        &self,
        units: &Tensor,
        p: usize,
        side: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (out, attention) = self.step(units, p, side, true)?;
        let attention = attention
            .ok_or_else(|| candle_core::Error::msg("GazeCompression: no attention recorded"))?;
        Ok((out, attention))
    }

    fn step(
        &self,
        units: &Tensor,
        p: usize,
        side: usize,
        record: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (u, n, _) = units.dims3()?;
        if p > n {
            candle_core::bail!(
                "GazeCompression: {p} tokens from {n} (compression never adds tokens)"
            );
        }
        let (h, d) = (self.heads, self.head_dim);
        let q = self
            .q_proj
            .forward(&self.queries(p, side)?)?
            .reshape((1, p, h, d))?
            .broadcast_as((u, p, h, d))?
            .contiguous()?;
        let k = self.k_proj.forward(units)?.reshape((u, n, h, d))?;
        let v = self.v_proj.forward(units)?.reshape((u, n, h, d))?;
        let lens = AttendLens::new(&vec![p; u], &vec![n; u], units.device())?;
        let (o, attention) = if record {
            let (o, lse) = ops::cross_attention_lse(&q, &k, &v, &lens, None)?;
            let probs = ops::cross_attention_probs(&q, &k, &lse, lens.host(), None)?;
            (o, Some(probs.mean(1)?.mean(1)?)) // [U, H, p, n] -> [U, n]
        } else {
            (ops::cross_attention(&q, &k, &v, &lens, None)?, None)
        };
        Ok((self.o_proj.forward(&o.reshape((u, p, h * d))?)?, attention))
    }
}

/// The grid of a step to `p` queries: `(rows, cols)` with `cols =
/// ceil(sqrt(p))`, `rows = ceil(p / cols)` (the last row may be short).
pub fn query_grid(p: usize) -> (usize, usize) {
    let mut w = (p as f64).sqrt() as usize;
    while w * w < p {
        w += 1;
    }
    (p.div_ceil(w.max(1)), w)
}

/// Where query `i` of `p` sits on a unit of `side x side` patches: its
/// cell's centre `(y, x)` in patch units (patch `j` spans `j - 0.5 .. j +
/// 0.5`), and the patch `(row, col)` under that centre.
pub fn query_cell(i: usize, p: usize, side: usize) -> ((f64, f64), (usize, usize)) {
    let (h, w) = query_grid(p);
    let (gy, gx) = (i / w, i % w);
    let s = side as f64;
    let y = (gy as f64 + 0.5) * s / h as f64;
    let x = (gx as f64 + 0.5) * s / w as f64;
    ((y - 0.5, x - 0.5), (y as usize, x as usize))
}

/// PE2D of the `p` queries of a step over `side x side` patches: `[p, dt]`
/// f32, row `i` the 2D sin-cos embedding of [`query_cell`]'s centre
/// (channels `0..dt/2` encode x, `dt/2..dt` y; each half `[sin(c w_k),
/// cos(c w_k)]` for `w_k = 10000^(-k / (dt / 4))`, `k < dt / 4`).
pub fn pos_embed_2d(p: usize, side: usize, dt: usize, device: &Device) -> Result<Tensor> {
    let quarter = dt / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 10000f64.powf(-(k as f64) / quarter as f64))
        .collect();
    let mut pe = Vec::with_capacity(p * dt);
    for i in 0..p {
        let ((y, x), _) = query_cell(i, p, side);
        for c in [x, y] {
            pe.extend(omega.iter().map(|w| (c * w).sin() as f32));
            pe.extend(omega.iter().map(|w| (c * w).cos() as f32));
        }
    }
    Tensor::from_vec(pe, (p, dt), device)
}
