//! FocusLLaVA (seeds/004) end to end: the vision-guided sampler in the
//! projector ([`crate::vision_sampler`]: sub-images stitched into one map,
//! window means, the selector's GEMMs, foveal multiscale_gather), then the
//! text-guided sampler inside the decoder at layer K: the instruction
//! tokens' queries and the visual keys of layer K go to foveal
//! text_guided_select, and the unselected visual tokens are dropped from the
//! layer-K hidden states and position ids (foveal's row gather), so layers
//! K+1.. run, cache and decode on the shorter sequence. Layers 0..=K keep
//! their full caches (the paper: the dropped tokens went through those
//! layers, and stay in their caches); decoding reads each span of layers
//! with its own layout ([`CacheSpan`]). Kept tokens keep their position ids.

use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use foveal::text_guided_select::{Lengths, DEFAULT_GAMMA};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::decoder::{CacheSpan, DenseAttention, Generation, KvCache};
use crate::method::{ImageQuestions, Method, Panel, Report, TokenMaps};
use crate::model::LlavaModel;
use crate::ops;
use crate::prompt::{image_question_rows, Prompt, Segment};
use crate::reduce::Reduced;
use crate::vision_sampler::{encode_grid, VisionSample, VisionSampler, VisionSamplerConfig};

/// How FocusLLaVA runs.
#[derive(Debug, Clone, PartialEq)]
pub struct FocusConfig {
    pub vision: VisionSamplerConfig,
    /// The text-guided sampler's layer K (0-based): its queries and keys
    /// select, and layers K+1.. see only the kept visual tokens.
    pub layer: usize,
    /// The cumulative-importance threshold (the paper's 0.85; 1 keeps all).
    pub gamma: f32,
}

impl FocusConfig {
    /// The paper's defaults for `model`: w = 4, the 3-branch scale set, and
    /// the text-guided sampler at the 8th of 32 layers (index 7), i.e. a
    /// quarter of the depth: K = min(7, ceil(L / 4) - 1), which is layer 1 of
    /// the tiny 6-layer model (so 4 of its 6 layers run on the kept tokens).
    /// gamma = 0.85.
    pub fn for_model(model: &ModelConfig) -> Self {
        FocusConfig {
            vision: VisionSamplerConfig::default(),
            layer: 7.min(model.text.num_layers.div_ceil(4).max(1) - 1),
            gamma: DEFAULT_GAMMA,
        }
    }
}

/// The learned parts: the vision-guided sampler's selector.
#[derive(Debug, Clone)]
pub struct FocusLlava {
    sampler: VisionSampler,
    cfg: FocusConfig,
    checkpoint: Checkpoint,
}

/// One FocusLLaVA generation and what it did.
#[derive(Debug)]
pub struct FocusRun {
    pub generation: Generation,
    /// Per row, the visual tokens of the stitched map (before the samplers).
    pub visual: Vec<usize>,
    /// Per row, the tokens after the vision-guided sampler.
    pub sampled: Vec<usize>,
    /// Per row, the tokens the text-guided sampler kept (indices into the
    /// row's sampled tokens, ascending).
    pub kept: Vec<Vec<usize>>,
    /// KV entries per row: the full prompt in layers 0..=K, the kept
    /// sequence in the later layers.
    pub kv_entries: Vec<usize>,
    /// Per row, over the stitched map: the scale each window chose (the
    /// cell each sampled token pools outlined, finer scales brighter) and
    /// the cells of the tokens the text-guided sampler kept.
    pub maps: Vec<TokenMaps>,
    pub prefill: Duration,
    pub decode: Duration,
}

/// What the prefill up to layer K leaves.
#[derive(Debug, Clone)]
pub struct LayerK {
    /// Hidden states after layer K `[B, S, Dm]`.
    pub hidden: Tensor,
    /// The caches of layers 0..=K.
    pub cache: KvCache,
    /// Layer K's queries after RoPE `[B, Hq, S, D]`.
    pub queries: Tensor,
}

impl Method for FocusLlava {
    type Config = FocusConfig;
    const NAME: &'static str = "FocusLLaVA";

    fn parts(&self) -> (&FocusConfig, &Checkpoint) {
        (&self.cfg, &self.checkpoint)
    }

    /// From `vb` at the root of a LLaVA checkpoint (names
    /// `multi_modal_projector.selector.{weight,bias}`).
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &FocusConfig) -> Result<Self> {
        if cfg.layer >= model.text.num_layers {
            candle_core::bail!(
                "FocusConfig: layer {} of {}",
                cfg.layer,
                model.text.num_layers
            );
        }
        if !(cfg.gamma > 0.0 && cfg.gamma <= 1.0) {
            candle_core::bail!("FocusConfig: gamma {} is outside (0, 1]", cfg.gamma);
        }
        let (sampler, checkpoint) = Checkpoint::record(vb, |vb| {
            VisionSampler::new(
                vb.pp("multi_modal_projector"),
                model.vision.num_patches(),
                &cfg.vision,
            )
        })?;
        Ok(FocusLlava {
            sampler,
            cfg: cfg.clone(),
            checkpoint,
        })
    }

    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        let ImageQuestions {
            pixels,
            grid,
            system,
            questions,
        } = input;
        let run = self.generate(model, pixels, *grid, system, questions, tokens)?;
        Ok(Report {
            sampled: Some(run.sampled),
            kept: run.kept.iter().map(Vec::len).collect(),
            maps: run.maps,
            ..Report::new(
                Self::NAME,
                run.visual,
                run.kv_entries,
                (run.prefill, run.decode),
                run.generation.tokens,
            )
        })
    }
}

impl FocusLlava {
    /// The vision-guided sampler over images `pixels [B, 3, rows * s, cols *
    /// s]` cut into a `grid` of sub-images (`(1, 1)`: one image of the
    /// tower's size).
    pub fn sample_vision(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        grid: (usize, usize),
    ) -> Result<VisionSample> {
        let (map, global) = encode_grid(model, pixels, grid)?;
        self.sampler.sample(&map, &global)
    }

    /// The prompt rows `[system][sampled visual tokens of image b][question b]`.
    pub fn prompt(
        &self,
        model: &LlavaModel,
        sample: &VisionSample,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Prompt> {
        let span = sample.map_cells()?;
        let image = |b: usize| {
            Ok(Segment::SampledImage {
                embeds: sample.tokens[b].clone(),
                offsets: sample.cells[b].clone(),
                span,
            })
        };
        let n = sample.tokens.len();
        let rows = image_question_rows(n, system, questions, Segment::Text, image)?;
        Prompt::build(&model.decoder, &rows)
    }

    /// Layers 0..=K over the whole prompt, capturing layer K's queries.
    pub fn prefill_to_layer_k(&self, model: &LlavaModel, prompt: &Prompt) -> Result<LayerK> {
        let dec = &model.decoder;
        let mut cache = dec.new_cache();
        let mask = prompt.mask()?;
        let (hidden, captured) = dec.forward_layers_capture(
            &prompt.embeds,
            &prompt.positions,
            Some(&mask),
            0..self.cfg.layer + 1,
            &mut cache,
        )?;
        Ok(LayerK {
            hidden,
            cache,
            queries: captured.queries,
        })
    }

    /// The text-guided sampler at layer K: per row the kept visual indices
    /// (into its visual tokens, ascending). The text tokens are the
    /// instruction, the last `text_len[b]` positions of row `b`.
    pub fn select_text(
        &self,
        prompt: &Prompt,
        layer_k: &LayerK,
        text_len: &[usize],
    ) -> Result<Vec<Vec<usize>>> {
        let seq = prompt.seq();
        if text_len.len() != prompt.batch()
            || text_len
                .iter()
                .zip(&prompt.starts)
                .any(|(&t, &s)| t > seq - s)
        {
            candle_core::bail!("FocusLlava::select_text: instruction lengths {text_len:?} do not fit the prompt rows");
        }
        let Some((k, _)) = layer_k.cache.layer(self.cfg.layer) else {
            candle_core::bail!("FocusLlava: layer K's cache is empty")
        };
        let text: Vec<Vec<usize>> = text_len.iter().map(|&t| (seq - t..seq).collect()).collect();
        let q_text = gather_positions(&layer_k.queries, &text)?.transpose(1, 2)?;
        let k_vis = gather_positions(k, &prompt.visual)?.transpose(1, 2)?;
        let n_len: Vec<usize> = prompt.visual.iter().map(Vec::len).collect();
        let lengths = Lengths::new(text_len, &n_len).map_err(candle_core::Error::wrap)?;
        ops::text_guided_select(&q_text, &k_vis, &lengths, self.cfg.gamma)?.kept()
    }

    /// FocusLLaVA generation of `max_new_tokens` greedy tokens per row for
    /// images `pixels` cut into a `grid` of sub-images, one question each.
    pub fn generate(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        grid: (usize, usize),
        system: &[u32],
        questions: &[Vec<u32>],
        max_new_tokens: usize,
    ) -> Result<FocusRun> {
        let t0 = Instant::now();
        let dec = &model.decoder;
        let sample = self.sample_vision(model, pixels, grid)?;
        let prompt = self.prompt(model, &sample, system, questions)?;
        let layer_k = self.prefill_to_layer_k(model, &prompt)?;
        let text_len: Vec<usize> = questions.iter().map(Vec::len).collect();
        let kept = self.select_text(&prompt, &layer_k, &text_len)?;

        // Drop the unselected visual tokens from the layer-K hidden states and
        // position ids; the caches of layers 0..=K stay whole.
        let rows = prompt.row_layout().map_err(candle_core::Error::wrap)?;
        let mut plan = ops::plan_from_kept(&rows, &kept, false, dec.device())?;
        let LayerK {
            hidden, mut cache, ..
        } = layer_k;
        let reduced = Reduced::gather(&prompt, &hidden, &mut plan, "FocusLLaVA")?;
        let k = self.cfg.layer;
        let layers = dec.num_layers();
        let first = reduced.forward(dec, k + 1..layers, &mut cache)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        let spans = [
            CacheSpan {
                layers: 0..k + 1,
                starts: prompt.starts.clone(),
            },
            CacheSpan {
                layers: k + 1..layers,
                starts: reduced.starts.clone(),
            },
        ];
        let generation = dec.greedy_with(
            &first,
            &prompt.next_positions(),
            &spans,
            &mut cache,
            max_new_tokens,
            &mut DenseAttention,
        )?;
        let decode = t1.elapsed();
        let full: Vec<usize> = prompt.starts.iter().map(|&st| prompt.seq() - st).collect();
        let maps = self.maps(&sample, &kept)?;
        Ok(FocusRun {
            maps,
            generation,
            visual: vec![sample.map_cells()?; prompt.batch()],
            sampled: prompt.visual.iter().map(Vec::len).collect(),
            kept,
            kv_entries: full
                .iter()
                .zip(&reduced.lengths)
                .map(|(&f, &n)| f * (k + 1) + n * (layers - k - 1))
                .collect(),
            prefill,
            decode,
        })
    }
}

impl FocusLlava {
    /// [`FocusRun::maps`]: the scale each window chose (the selector's
    /// argmax, as multiscale_gather takes it) and the sampled tokens' cells.
    fn maps(&self, sample: &VisionSample, kept: &[Vec<usize>]) -> Result<Vec<TokenMaps>> {
        let (_, h, w, _) = sample.map.dims4()?;
        let win = self.cfg.vision.window;
        let scales = self.cfg.vision.scales.scales();
        let logits = sample.logits.to_vec3::<f32>()?;
        let per_row = w.div_ceil(win);
        let mut maps = Vec::new();
        for (b, cells) in sample.cells.iter().enumerate() {
            // Each sampled token's pooled cell, from its window's scale.
            let boxes: Vec<[usize; 4]> = cells
                .iter()
                .map(|&c| {
                    let (y, x) = (c as usize / w, c as usize % w);
                    let z = &logits[b][(y / win) * per_row + x / win];
                    let s = (0..z.len()).fold(0, |m, i| if z[i] > z[m] { i } else { m });
                    let (kh, kw) = scales[s];
                    [y, x, (y + kh).min(h), (x + kw).min(w)]
                })
                .collect();
            let mut scale = vec![0.0; h * w];
            let mut kept_cells = vec![0.0; h * w];
            for (i, &[y0, x0, y1, x1]) in boxes.iter().enumerate() {
                let fine = 1.0 / (((y1 - y0) * (x1 - x0)) as f32).sqrt();
                let is_kept = kept.get(b).is_some_and(|k| k.binary_search(&i).is_ok());
                for y in y0..y1 {
                    for x in x0..x1 {
                        scale[y * w + x] = fine;
                        if is_kept {
                            kept_cells[y * w + x] = 1.0;
                        }
                    }
                }
            }
            let kept_boxes = kept
                .get(b)
                .map(|k| k.iter().filter_map(|&i| boxes.get(i).copied()).collect())
                .unwrap_or_default();
            maps.push(TokenMaps {
                grid: (h, w),
                panels: vec![
                    Panel {
                        title: "scale per window (finer brighter)".into(),
                        weight: scale,
                        boxes,
                    },
                    Panel {
                        title: "kept".into(),
                        weight: kept_cells,
                        boxes: kept_boxes,
                    },
                ],
            });
        }
        Ok(maps)
    }
}

/// Rows `[B, H, S, D]` -> `[B, H, N, D]`: row `b` takes the sequence
/// positions `rows[b]` in order, padded (with its first position, or 0) to
/// the longest list (at least 1).
fn gather_positions(t: &Tensor, rows: &[Vec<usize>]) -> Result<Tensor> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let per_row = rows
        .iter()
        .enumerate()
        .map(|(b, r)| {
            let pad = r.first().copied().unwrap_or(0) as u32;
            let idx: Vec<u32> = r
                .iter()
                .map(|&i| i as u32)
                .chain(std::iter::repeat(pad))
                .take(width)
                .collect();
            t.get(b)?
                .index_select(&Tensor::from_vec(idx, width, t.device())?, 1)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&per_row, 0)
}
