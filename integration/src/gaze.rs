//! Gaze Attention (seeds/003) end to end: learnable context tokens after
//! every visual unit (an image or a video frame), a prefill in which each
//! context token sees only its own unit, region descriptors from every
//! layer's cached visual keys (foveal region_descriptors), and greedy
//! decoding in which every layer's attention is gaze attention: the new
//! token's query picks its `k` best regions per head (foveal route_topk) and
//! attends those regions' tokens plus everything that is not a routable
//! visual token (foveal gaze_decode). The KV cache keeps every visual token;
//! what is attended changes at every step and layer.

use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use foveal::{GazeLayout, RegionShape, Routes};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::decoder::{AttentionCore, Generation, KvCache};
use crate::gaze_prompt::{GazePrompt, GazeSegment};
use crate::method::{ImageQuestions, Method, Panel, Report, TokenMaps};
use crate::model::LlavaModel;
use crate::ops::{self, GazeIndex, GazeRoutes};
use crate::prompt::image_question_rows;
use crate::vision_sampler::encode_grid;

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
    checkpoint: Checkpoint,
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
    /// KV entries (positions x layers) per row after the prefill: every
    /// token stays cached.
    pub kv_entries: Vec<usize>,
    /// The decode steps (one fewer than the generated tokens: the first
    /// token comes from the prefill).
    pub steps: Vec<GazeStep>,
    /// Per row and visual token (in prompt order), the region holding it
    /// (`None`: in none) ...
    pub visual_regions: Vec<Vec<Option<usize>>>,
    /// ... and the fraction of (decode step, layer, query head) reads that
    /// routed that region.
    pub routed: Vec<Vec<f32>>,
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

    /// Row `b`'s regions over a visual grid of `(rows, cols)` tokens (one
    /// image, or a stitched map): each region outlined, brighter the more
    /// often it was routed (scaled to the most-routed region).
    pub fn token_maps(&self, b: usize, (rows, cols): (usize, usize)) -> TokenMaps {
        let cells = rows * cols;
        let mut boxes: Vec<[usize; 4]> = Vec::new();
        let mut ids: Vec<usize> = Vec::new();
        for (i, r) in self.visual_regions[b].iter().enumerate().take(cells) {
            let Some(r) = *r else { continue };
            let (y, x) = (i / cols, i % cols);
            match ids.iter().position(|&id| id == r) {
                Some(j) => {
                    let bx = &mut boxes[j];
                    *bx = [
                        bx[0].min(y),
                        bx[1].min(x),
                        bx[2].max(y + 1),
                        bx[3].max(x + 1),
                    ];
                }
                None => {
                    ids.push(r);
                    boxes.push([y, x, y + 1, x + 1]);
                }
            }
        }
        let routed = &self.routed[b][..cells.min(self.routed[b].len())];
        TokenMaps {
            grid: (rows, cols),
            panels: vec![Panel {
                boxes,
                ..Panel::scaled("regions, brighter the more often routed", routed)
            }],
        }
    }

    /// The run in the terms every method shares; the detail of row `b` is
    /// its regions, `k` and the KV entries a query head attended per step
    /// against dense attention's.
    pub fn report(self, method: &'static str, cfg: &GazeConfig) -> Report {
        let r = cfg.region;
        let detail = (0..self.visual.len())
            .map(|b| {
                let (attended, dense) = self.mean_attended(b);
                format!(
                    "{} regions of {}x{}x{}, k {}, {} context: attended {attended:.1} of {dense:.1} KV entries per step ({:.0}%)",
                    self.regions[b],
                    r.frames,
                    r.height,
                    r.width,
                    cfg.k,
                    self.context[b],
                    100.0 * attended / dense
                )
            })
            .collect();
        Report {
            detail,
            ..Report::new(
                method,
                self.visual,
                self.kv_entries,
                (self.prefill, self.decode),
                self.generation.tokens,
            )
        }
    }
}

impl Method for GazeAttention {
    type Config = GazeConfig;
    const NAME: &'static str = "Gaze Attention";

    fn parts(&self) -> (&GazeConfig, &Checkpoint) {
        (&self.cfg, &self.checkpoint)
    }

    /// From `vb` (name `gaze.context_tokens`, `[c, Dm]`).
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &GazeConfig) -> Result<Self> {
        let r = cfg.region;
        if cfg.context_tokens == 0 || cfg.k == 0 || r.frames == 0 || r.height == 0 || r.width == 0 {
            candle_core::bail!(
                "GazeConfig: {cfg:?}: context tokens, k and every region side must be at least 1"
            );
        }
        let (context, checkpoint) = Checkpoint::record(vb, |vb| {
            let shape = (cfg.context_tokens, model.text.hidden_size);
            vb.pp("gaze").get(shape, "context_tokens")
        })?;
        Ok(GazeAttention {
            context,
            cfg: *cfg,
            checkpoint,
        })
    }

    /// The stitched map of a grid is one visual unit.
    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        let t0 = Instant::now();
        let (map, _) = encode_grid(model, &input.pixels, input.grid)?;
        let prompt = self.map_prompt(model, &map, &input.system, &input.questions)?;
        let encode = t0.elapsed();
        let mut run = self.generate(model, &prompt, tokens)?;
        run.prefill += encode;
        let (_, h, w, _) = map.dims4()?;
        let maps = (0..run.visual.len())
            .map(|b| run.token_maps(b, (h, w)))
            .collect();
        Ok(Report {
            maps,
            ..run.report(Self::NAME, &self.cfg)
        })
    }
}

impl GazeAttention {
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
        let (b, _, dm) = image_embeds.dims3()?;
        let side = model.config.vision.patches_per_side();
        let map = image_embeds.reshape((b, side, side, dm))?;
        self.map_prompt(model, &map, system, questions)
    }

    /// [`GazeAttention::image_prompt`] from feature maps `[B, H, W, Dm]`
    /// (one image, or a grid's stitched map, per row).
    pub fn map_prompt(
        &self,
        model: &LlavaModel,
        map: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<GazePrompt> {
        let (n, height, width, dm) = map.dims4()?;
        let image = |b| {
            Ok(GazeSegment::Image {
                embeds: map.get(b)?.reshape((height * width, dm))?,
                height,
                width,
            })
        };
        let rows = image_question_rows(n, system, questions, GazeSegment::Text, image)?;
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
        let (visual_regions, routed) = (0..p.batch())
            .map(|b| routed_regions(layout, &p.visual[b], &steps, b))
            .unzip();
        Ok(GazeRun {
            visual_regions,
            routed,
            kv_entries: p
                .starts
                .iter()
                .map(|s| (p.seq() - s) * dec.num_layers())
                .collect(),
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

/// Row `b`'s visual tokens at sequence positions `visual`: each one's
/// region in `layout`, and the fraction of (step, layer, query head) reads
/// in `steps` that routed it.
fn routed_regions(
    layout: &GazeLayout,
    visual: &[usize],
    steps: &[GazeStep],
    b: usize,
) -> (Vec<Option<usize>>, Vec<f32>) {
    let mut region_of = vec![None; visual.len()];
    for r in 0..layout.regions(b) {
        for &pos in layout.region(b, r) {
            if let Some(i) = visual.iter().position(|&v| v == pos as usize) {
                region_of[i] = Some(r);
            }
        }
    }
    let mut count = vec![0usize; layout.regions(b)];
    let mut reads = 0usize;
    for step in steps {
        for routes in &step.routes {
            for h in 0..routes.shape()[2] {
                reads += 1;
                for &id in routes.get(b, 0, h) {
                    if let Some(c) = count.get_mut(id as usize) {
                        *c += 1;
                    }
                }
            }
        }
    }
    let routed = region_of
        .iter()
        .map(|r| r.map_or(0.0, |r| count[r] as f32 / reads.max(1) as f32))
        .collect();
    (region_of, routed)
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
