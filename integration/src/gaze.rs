//! Gaze Attention (seeds/003) end to end: learnable context tokens after
//! every visual unit (an image or a video frame), a prefill in which each
//! context token sees only its own unit, region descriptors from every
//! layer's cached visual keys (foveal region_descriptors), and greedy
//! decoding in which every layer's attention is gaze attention: the new
//! token's query picks its `k` best regions per head (foveal route_topk) and
//! attends those regions' tokens plus everything that is not a routable
//! visual token (foveal gaze_decode). The KV cache keeps every visual token;
//! what is attended changes at every step and layer.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use foveal::{GazeLayout, RegionShape, Routes};

use crate::config::ModelConfig;
use crate::decoder::{AttentionCore, Generation, KvCache};
use crate::gaze_prompt::{GazePrompt, GazeSegment};
use crate::model::{LlavaModel, SeededInit};
use crate::nn::Named;
use crate::ops::{self, GazeIndex, GazeRoutes};

/// How Gaze Attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GazeConfig {
    /// Learnable context tokens after each visual unit (the paper's c).
    pub context_tokens: usize,
    /// Region size (frames x rows x columns of the unit grid).
    pub region: RegionShape,
    /// Regions each query head attends per decode step (clamped to a row's
    /// region count).
    pub k: usize,
}

impl Default for GazeConfig {
    /// The paper's main setting: 4 context tokens, 6 x 6 regions of one
    /// frame, 4 regions (144 of 576 visual tokens per image).
    fn default() -> Self {
        GazeConfig {
            context_tokens: 4,
            region: RegionShape::default(),
            k: 4,
        }
    }
}

/// The learned part: the context tokens `[c, Dm]` (`gaze.context_tokens`).
#[derive(Debug, Clone)]
pub struct GazeAttention {
    context: Tensor,
    cfg: GazeConfig,
}

/// A prefill of a Gaze Attention prompt.
#[derive(Debug)]
pub struct GazePrefill {
    pub cache: KvCache,
    /// The last layer's hidden states `[B, S, Dm]` (before the final norm).
    pub hidden: Tensor,
    /// The logits `[B, vocab]` of each row's last position.
    pub first_logits: Tensor,
}

/// One decode step: the layout it attended with and each layer's routes
/// (`[B, 1, Hq, k]`).
#[derive(Debug, Clone)]
pub struct GazeStep {
    pub layout: GazeLayout,
    pub routes: Vec<Routes>,
}

impl GazeStep {
    /// KV entries row `b` attended, averaged over layers and query heads.
    pub fn attended(&self, b: usize) -> f64 {
        let (mut sum, mut n) = (0usize, 0usize);
        let visible = self.layout.visible_len(b);
        for r in &self.routes {
            for h in 0..r.shape()[2] {
                let routed: usize = r
                    .get(b, 0, h)
                    .iter()
                    .map(|&id| self.layout.region(b, id as usize).len())
                    .sum();
                sum += visible + routed;
                n += 1;
            }
        }
        sum as f64 / n.max(1) as f64
    }

    /// KV entries dense attention reads in row `b` (its whole valid cache).
    pub fn dense(&self, b: usize) -> usize {
        let regions: usize = (0..self.layout.regions(b))
            .map(|r| self.layout.region(b, r).len())
            .sum();
        self.layout.visible_len(b) + regions
    }
}

/// One Gaze Attention generation and what it did.
#[derive(Debug)]
pub struct GazeRun {
    pub generation: Generation,
    /// Per row: visual tokens, context tokens, regions.
    pub visual: Vec<usize>,
    pub context: Vec<usize>,
    pub regions: Vec<usize>,
    /// The decode steps (one fewer than the generated tokens: the first
    /// token comes from the prefill).
    pub steps: Vec<GazeStep>,
    pub prefill: Duration,
    pub decode: Duration,
}

impl GazeRun {
    /// KV entries row `b` attended per step, layer and head, averaged over
    /// the decode steps; and what dense attention reads, averaged likewise.
    pub fn mean_attended(&self, b: usize) -> (f64, f64) {
        let n = self.steps.len().max(1) as f64;
        let attended = self.steps.iter().map(|s| s.attended(b)).sum::<f64>() / n;
        let dense = self.steps.iter().map(|s| s.dense(b) as f64).sum::<f64>() / n;
        (attended, dense)
    }
}

impl GazeAttention {
    /// From `vb` (name `gaze.context_tokens`, `[c, Dm]`).
    pub fn new(vb: VarBuilder, model: &ModelConfig, cfg: &GazeConfig) -> Result<Self> {
        let r = cfg.region;
        if cfg.context_tokens == 0 || cfg.k == 0 || r.frames == 0 || r.height == 0 || r.width == 0 {
            candle_core::bail!(
                "GazeConfig: {cfg:?}: context tokens, k and every region side must be at least 1"
            );
        }
        let context = vb.pp("gaze").get(
            (cfg.context_tokens, model.text.hidden_size),
            "context_tokens",
        )?;
        Ok(GazeAttention { context, cfg: *cfg })
    }

    /// A deterministic random initialisation (the model's seeded scheme).
    pub fn seeded(
        model: &ModelConfig,
        cfg: &GazeConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::new(
            VarBuilder::from_backend(Box::new(SeededInit { seed }), dtype, device.clone()),
            model,
            cfg,
        )
    }

    pub fn load_safetensors(
        path: impl AsRef<Path>,
        model: &ModelConfig,
        cfg: &GazeConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)?;
        Self::new(VarBuilder::from_tensors(tensors, dtype, device), model, cfg)
    }

    pub fn named_tensors(&self) -> Named {
        vec![("gaze.context_tokens".to_string(), self.context.clone())]
    }

    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let map: HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        candle_core::safetensors::save(&map, path)
    }

    pub fn config(&self) -> &GazeConfig {
        &self.cfg
    }

    /// The context tokens `[c, Dm]`.
    pub fn context_tokens(&self) -> &Tensor {
        &self.context
    }

    /// Lays out `rows`, the context tokens after every visual unit.
    pub fn prompt(&self, model: &LlavaModel, rows: &[Vec<GazeSegment>]) -> Result<GazePrompt> {
        GazePrompt::build(&model.decoder, rows, &self.context, self.cfg.region)
    }

    /// The LLaVA prompt of row `b`, `[system][image b][context][questions[b]]`,
    /// from projected image embeddings `[B, Np, Dm]` on the model's square grid.
    pub fn image_prompt(
        &self,
        model: &LlavaModel,
        image_embeds: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<GazePrompt> {
        let side = model.config.vision.patches_per_side();
        let rows = questions
            .iter()
            .enumerate()
            .map(|(b, q)| {
                Ok(vec![
                    GazeSegment::Text(system.to_vec()),
                    GazeSegment::Image {
                        embeds: image_embeds.get(b)?,
                        height: side,
                        width: side,
                    },
                    GazeSegment::Text(q.clone()),
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        self.prompt(model, &rows)
    }

    /// Every layer over the whole prompt with the context-token mask.
    pub fn prefill(&self, model: &LlavaModel, prompt: &GazePrompt) -> Result<GazePrefill> {
        let dec = &model.decoder;
        let mut cache = dec.new_cache();
        let p = &prompt.prompt;
        let hidden = dec.forward_layers(
            &p.embeds,
            &p.positions,
            Some(&prompt.mask()?),
            0..dec.num_layers(),
            &mut cache,
        )?;
        let first_logits = dec.last_logits(&hidden)?;
        Ok(GazePrefill {
            cache,
            hidden,
            first_logits,
        })
    }

    /// Gaze Attention generation of `max_new_tokens` greedy tokens per row.
    pub fn generate(
        &self,
        model: &LlavaModel,
        prompt: &GazePrompt,
        max_new_tokens: usize,
    ) -> Result<GazeRun> {
        let dec = &model.decoder;
        let t0 = Instant::now();
        let GazePrefill {
            mut cache,
            first_logits,
            ..
        } = self.prefill(model, prompt)?;
        let layout = prompt.layout().map_err(candle_core::Error::wrap)?;
        let index = GazeIndex::new(layout, dec.device())?;
        let descriptors = (0..dec.num_layers())
            .map(|l| match cache.layer(l) {
                Some((k, _)) => ops::region_descriptors(k, &index),
                None => candle_core::bail!("Gaze Attention: layer {l} has no cache"),
            })
            .collect::<Result<Vec<_>>>()?;
        let prefill = t0.elapsed();

        let t1 = Instant::now();
        let p = &prompt.prompt;
        let mut core = GazeDecode {
            descriptors,
            end: p.seq(),
            index,
            k: self.cfg.k,
            steps: Vec::new(),
        };
        let generation = dec.greedy_with(
            &first_logits,
            &p.next_positions(),
            &[dec.span_all(&p.starts)],
            &mut cache,
            max_new_tokens,
            &mut core,
        )?;
        let decode = t1.elapsed();

        let layout = core.index.layout();
        let steps = core
            .steps
            .into_iter()
            .map(|(layout, routes)| {
                Ok(GazeStep {
                    layout,
                    routes: routes
                        .iter()
                        .map(GazeRoutes::to_host)
                        .collect::<Result<_>>()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GazeRun {
            visual: p.visual.iter().map(Vec::len).collect(),
            context: prompt.context_positions().iter().map(Vec::len).collect(),
            regions: (0..p.batch()).map(|b| layout.regions(b)).collect(),
            generation,
            steps,
            prefill,
            decode,
        })
    }
}

/// Gaze attention as the decoder's attention core during decoding: at each
/// step (a cache longer than the layout's) the generated token joins the
/// always-visible keys, and every layer routes and attends sparsely.
struct GazeDecode {
    /// Per layer, `[B, Hkv, R_max, D]` f32.
    descriptors: Vec<Tensor>,
    /// Cache length the current layout covers.
    end: usize,
    index: GazeIndex,
    k: usize,
    /// Per step, its layout and each layer's routes.
    steps: Vec<(GazeLayout, Vec<GazeRoutes>)>,
}

impl AttentionCore for GazeDecode {
    /// One new token per row; the decoder's mask (left padding) is not
    /// needed: padding is neither visible nor in a region.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if q.dim(2)? != 1 {
            candle_core::bail!(
                "Gaze Attention decodes one token per row, got {}",
                q.dim(2)?
            );
        }
        let s = k.dim(2)?;
        if s != self.end {
            // A new step: every row's valid cache now ends at `s` (rows are
            // left-padded and decode in lockstep), the new entries visible;
            // the region ids the descriptors use stay.
            if s < self.end {
                candle_core::bail!("Gaze Attention: the cache shrank from {} to {s}", self.end);
            }
            self.index.extend_visible(s)?;
            let layout = self.index.layout().clone();
            self.steps.push((layout, Vec::new()));
            self.end = s;
        }
        let Some(desc) = self.descriptors.get(layer) else {
            candle_core::bail!("Gaze Attention: no descriptors for layer {layer}");
        };
        let routes = ops::route_topk(q, desc, &self.index, self.k)?;
        let o = ops::gaze_decode(&q.squeeze(2)?, k, v, &self.index, &routes, None)?;
        if let Some((_, r)) = self.steps.last_mut() {
            r.push(routes);
        }
        o.unsqueeze(2)
    }
}
