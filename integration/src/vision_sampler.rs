//! FocusLLaVA's vision-guided sampler (seeds/004 §3.2; SPEC "FocusLLaVA /
//! Vision-guided sampler"), in the projector.
//!
//! An image is cut into a `rows x cols` grid of sub-images (LLaVA-NeXT's
//! crops; a 1 x 1 grid is the tiny model's single image); every sub-image
//! goes through the ViT and the projector, and their token grids are
//! stitched into one global map `X [B, Hx, Wx, C]` (channels: the decoder's
//! width). The global image `I_g` (the whole image resized to one sub-image)
//! gives `X_g [B, Np, C]`, the selector's global context; with a 1 x 1 grid
//! it is the sub-image itself and is not encoded twice.
//!
//! The selector: `P = window_mean(X)` `[B, M, C]` (foveal; w = 4 by
//! default), `Score = P X_g^T` `[B, M, Np]` and a fully connected layer to
//! the `S` scale logits `Z [B, M, S]` (candle GEMMs). Then foveal's
//! multiscale_gather max-pools each window at `argmax Z`. The tokens enter
//! the decoder in raster order of their pooled cells' top-left pixels, with
//! those pixels as position offsets (see [`VisionSample`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};
use foveal::{Pool, ScaleSet};

use crate::model::LlavaModel;
use crate::ops;

/// How the sampler runs (part of [`FocusConfig`](crate::focus::FocusConfig)).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionSamplerConfig {
    /// Window side `w` (the paper's 4).
    pub window: usize,
    /// `pool(X_i)` of the selector: the mean (SPEC default) or max.
    pub pool: Pool,
    /// The pooling kernels to choose from: [`ScaleSet::three`] (default) or
    /// [`ScaleSet::seven`].
    pub scales: ScaleSet,
    /// Multiply each token by its scale's softmax probability (the paper's
    /// Eq. 2, its training form; off at inference by default).
    pub scale_by_prob: bool,
    /// Every window at this scale (an index into `scales`), the selector
    /// skipped: an ablation, and with the 1 x 1 scale the dense model.
    pub force_scale: Option<usize>,
}

impl Default for VisionSamplerConfig {
    fn default() -> Self {
        VisionSamplerConfig {
            window: foveal::window_mean::DEFAULT_WINDOW,
            pool: Pool::Mean,
            scales: ScaleSet::three(),
            scale_by_prob: false,
            force_scale: None,
        }
    }
}

/// What the sampler gives for a batch of images.
#[derive(Debug, Clone)]
pub struct VisionSample {
    /// The stitched map `X [B, Hx, Wx, C]`.
    pub map: Tensor,
    /// The selector's logits `Z [B, M, S]` (f32; one-hot when the scale is forced).
    pub logits: Tensor,
    /// Per row, the sampled tokens `[n_b, C]` in raster order of their cells'
    /// top-left pixels ...
    pub tokens: Vec<Tensor>,
    /// ... and those pixels, `y * Wx + x`, ascending.
    pub cells: Vec<Vec<u32>>,
}

impl VisionSample {
    /// `Hx * Wx`: the visual tokens before sampling.
    pub fn map_cells(&self) -> Result<usize> {
        let (_, h, w, _) = self.map.dims4()?;
        Ok(h * w)
    }

    /// The map in raster order `[B, Hx * Wx, C]`: the dense model's visual tokens.
    pub fn dense_tokens(&self) -> Result<Tensor> {
        let (b, h, w, c) = self.map.dims4()?;
        self.map.reshape((b, h * w, c))
    }
}

/// The learned part: the selector's fully connected layer `Np -> S`.
#[derive(Debug, Clone)]
pub struct VisionSampler {
    selector: Linear,
    cfg: VisionSamplerConfig,
}

impl VisionSampler {
    /// The selector under `vb` (`selector.weight [S, Np]`, `selector.bias
    /// [S]`), `Np` the global image's tokens.
    pub fn new(vb: VarBuilder, global_tokens: usize, cfg: &VisionSamplerConfig) -> Result<Self> {
        let s = cfg.scales.len();
        if let Some(c) = cfg.force_scale.filter(|&c| c >= s) {
            candle_core::bail!("VisionSamplerConfig: forced scale {c} of {s}");
        }
        if let Some(&(kh, kw)) = cfg
            .scales
            .scales()
            .iter()
            .find(|&&(kh, kw)| cfg.window == 0 || cfg.window % kh != 0 || cfg.window % kw != 0)
        {
            candle_core::bail!(
                "VisionSamplerConfig: the kernel ({kh}, {kw}) does not divide the window {}",
                cfg.window
            );
        }
        Ok(VisionSampler {
            selector: linear(global_tokens, s, vb.pp("selector"))?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VisionSamplerConfig {
        &self.cfg
    }

    /// The selector's logits `[B, M, S]` (f32): scores of each window's
    /// pooled vector against every global feature, then the FC layer.
    pub fn logits(&self, map: &Tensor, global: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = map.dims4()?;
        let windows = foveal::window_mean::num_windows(h, w, self.cfg.window);
        if let Some(c) = self.cfg.force_scale {
            let s = self.cfg.scales.len();
            let one_hot: Vec<f32> = (0..b * windows * s)
                .map(|i| f32::from(u8::from(i % s == c)))
                .collect();
            return Tensor::from_vec(one_hot, (b, windows, s), map.device());
        }
        let pooled = ops::window_mean(map, self.cfg.window, self.cfg.pool)?;
        let scores = pooled.matmul(&global.transpose(1, 2)?)?;
        self.selector.forward(&scores)?.to_dtype(DType::F32)
    }

    /// The sampler over a stitched map `[B, Hx, Wx, C]` and the global
    /// features `[B, Np, C]`.
    pub fn sample(&self, map: &Tensor, global: &Tensor) -> Result<VisionSample> {
        let logits = self.logits(map, global)?;
        let g = ops::multiscale_gather(
            map,
            &logits,
            self.cfg.window,
            &self.cfg.scales,
            self.cfg.scale_by_prob,
        )?;
        // The counts and cells lay out the prompt: read back (host sync).
        let counts = g.count.to_vec1::<i32>()?;
        let positions = g.positions.to_vec2::<i32>()?;
        let (mut tokens, mut cells) = (Vec::new(), Vec::new());
        for (b, (row, &n)) in positions.iter().zip(&counts).enumerate() {
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_by_key(|&i| row[i as usize]);
            cells.push(order.iter().map(|&i| row[i as usize] as u32).collect());
            let idx = Tensor::from_vec(order, n as usize, map.device())?;
            tokens.push(g.tokens.get(b)?.index_select(&idx, 0)?);
        }
        Ok(VisionSample {
            map: map.clone(),
            logits,
            tokens,
            cells,
        })
    }
}

/// The stitched map `[B, rows * p, cols * p, C]` and the global features
/// `[B, Np, C]` of images `pixels [B, 3, rows * s, cols * s]` (`s` the
/// tower's image size, `p` its patches per side): each sub-image encoded and
/// projected, the whole image average-pooled to `s x s` for the global view.
pub fn encode_grid(
    model: &LlavaModel,
    pixels: &Tensor,
    grid: (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let crops = grid_crops(model, pixels, grid)?;
    let features = model.encode_images(&crops)?.embeds; // [B * rows * cols, p * p, C]
    let p = model.config.vision.patches_per_side();
    let (n, _, c) = features.dims3()?;
    let map = stitch_tiles(&features.reshape((n, p, p, c))?, grid)?;
    let global = if grid == (1, 1) {
        features
    } else {
        let (rows, cols) = grid;
        model
            .encode_images(&pixels.avg_pool2d_with_stride((rows, cols), (rows, cols))?)?
            .embeds
    };
    Ok((map, global))
}

/// The `rows x cols` tower-sized sub-images of `pixels [B, 3, rows * s,
/// cols * s]`: `[B * rows * cols, 3, s, s]`, each image's in raster order.
pub fn grid_crops(
    model: &LlavaModel,
    pixels: &Tensor,
    (rows, cols): (usize, usize),
) -> Result<Tensor> {
    let (b, _, h, w) = pixels.dims4()?;
    let s = model.config.vision.image_size;
    if rows == 0 || cols == 0 || h != rows * s || w != cols * s {
        candle_core::bail!("encode_grid: images of {h} x {w} pixels for a {rows} x {cols} grid of {s}-pixel sub-images");
    }
    let crops = (0..b)
        .flat_map(|i| (0..rows).flat_map(move |r| (0..cols).map(move |c| (i, r, c))))
        .map(|(i, r, c)| {
            pixels
                .narrow(0, i, 1)?
                .narrow(2, r * s, s)?
                .narrow(3, c * s, s)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&crops, 0)
}

/// The token grids of [`grid_crops`]' sub-images, `[B * rows * cols, p, q,
/// C]`, stitched into one map per image: `[B, rows * p, cols * q, C]`.
pub fn stitch_tiles(tiles: &Tensor, (rows, cols): (usize, usize)) -> Result<Tensor> {
    let (n, p, q, c) = tiles.dims4()?;
    let b = n / (rows * cols);
    tiles
        .reshape((b, rows, cols, p, q, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, rows * p, cols * q, c))
}
