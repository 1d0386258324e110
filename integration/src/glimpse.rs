//! GlimpsePrune (seeds/001) end to end: a glimpse token appended after the
//! instruction, with a learned embedding added at every decoder layer; the
//! prefill of layers 0..=K; the glimpse token's attention to the visual tokens
//! at layer K (foveal glimpse_scores); the Visual Importance Predictor; the
//! kept set (foveal select_keep); one compaction of the KV caches of layers
//! 0..=K, of the layer-K hidden states and of the position ids (foveal
//! compact_kv / gather_rows), the glimpse token dropped; the remaining layers
//! on the shorter sequence; greedy decoding on the compacted cache. Kept
//! tokens keep their original position ids.

use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use foveal::{KeepRule, Padding, ScoreMode};

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::decoder::{Generation, KvCache};
use crate::method::{ImageQuestions, Method, Report};
use crate::model::LlavaModel;
use crate::ops;
use crate::prompt::{image_question_rows, Prompt, Segment};
use crate::reduce::Reduced;
use crate::vip::{Vip, VipConfig};

/// How GlimpsePrune runs.
#[derive(Debug, Clone, PartialEq)]
pub struct GlimpseConfig {
    /// The pruning layer K (0-based): the glimpse attention is read there,
    /// and layers 0..=K are compacted.
    pub layer: usize,
    /// Glimpse attention as the predictor takes it (LLaVA: log-softmax).
    pub mode: ScoreMode,
    pub rule: KeepRule,
    /// The ViT layers (indices into its hidden states, 1 = first block's
    /// output) that condition the predictor's blocks, one each.
    pub feature_layers: Vec<usize>,
    pub vip: VipConfig,
}

impl GlimpseConfig {
    /// The paper's defaults for `model`: K = ceil(2L/3) - 1 (0-based), M = 4
    /// ViT layers sampled uniformly, threshold 0.5, the small predictor.
    pub fn for_model(model: &ModelConfig) -> Self {
        let blocks = 4;
        let n = model.vision.num_layers;
        GlimpseConfig {
            layer: (2 * model.text.num_layers).div_ceil(3) - 1,
            mode: ScoreMode::LogSoftmax,
            rule: KeepRule::default(),
            feature_layers: (1..=blocks).map(|m| (m * n).div_ceil(blocks)).collect(),
            vip: VipConfig::tiny(model.text.num_heads, model.vision.hidden_size),
        }
    }
}

/// The learned parts: the glimpse embeddings `[L, Dm]` and the predictor.
#[derive(Debug, Clone)]
pub struct GlimpsePrune {
    embeddings: Tensor,
    vip: Vip,
    cfg: GlimpseConfig,
    checkpoint: Checkpoint,
}

/// One GlimpsePrune generation and what it did.
#[derive(Debug)]
pub struct GlimpseRun {
    pub generation: Generation,
    /// Per row, the kept visual indices (into the row's visual tokens).
    pub kept: Vec<Vec<usize>>,
    /// Per row, the visual tokens before pruning.
    pub visual: Vec<usize>,
    /// KV entries (positions x layers) per row after pruning.
    pub kv_entries: Vec<usize>,
    pub prefill: Duration,
    pub decode: Duration,
}

impl Method for GlimpsePrune {
    type Config = GlimpseConfig;
    const NAME: &'static str = "GlimpsePrune";
    /// No: the predictor reads one tower-sized image's ViT grid.
    const TAKES_GRIDS: bool = false;

    fn parts(&self) -> (&GlimpseConfig, &Checkpoint) {
        (&self.cfg, &self.checkpoint)
    }

    /// From `vb` (names `glimpse.embeddings`, `vip.…`).
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &GlimpseConfig) -> Result<Self> {
        if cfg.layer >= model.text.num_layers || cfg.feature_layers.len() != cfg.vip.blocks {
            candle_core::bail!(
                "GlimpseConfig: layer {} of {}, {} feature layers for {} blocks",
                cfg.layer,
                model.text.num_layers,
                cfg.feature_layers.len(),
                cfg.vip.blocks
            );
        }
        if cfg
            .feature_layers
            .iter()
            .any(|&l| l > model.vision.num_layers)
        {
            candle_core::bail!(
                "GlimpseConfig: feature layers {:?} past the tower's {}",
                cfg.feature_layers,
                model.vision.num_layers
            );
        }
        let ((embeddings, vip), checkpoint) = Checkpoint::record(vb, |vb| {
            let shape = (model.text.num_layers, model.text.hidden_size);
            Ok((
                vb.pp("glimpse").get(shape, "embeddings")?,
                Vip::new(vb.pp("vip"), &cfg.vip)?,
            ))
        })?;
        Ok(GlimpsePrune {
            embeddings,
            vip,
            cfg: cfg.clone(),
            checkpoint,
        })
    }

    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        let run = self.generate(
            model,
            &input.pixels,
            &input.system,
            &input.questions,
            tokens,
        )?;
        Ok(Report {
            kept: run.kept.iter().map(Vec::len).collect(),
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

impl GlimpsePrune {
    /// The prompt rows `[system][image b][question b][glimpse]`, the glimpse
    /// token entering with its layer-0 embedding.
    pub fn prompt(
        &self,
        model: &LlavaModel,
        image_embeds: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Prompt> {
        let glimpse = self.embeddings.narrow(0, 0, 1)?;
        let image = |b| Ok(Segment::Image(image_embeds.get(b)?));
        let n = image_embeds.dim(0)?;
        let mut rows = image_question_rows(n, system, questions, Segment::Text, image)?;
        for row in &mut rows {
            row.push(Segment::Transient(glimpse.clone()));
        }
        Prompt::build(&model.decoder, &rows)
    }

    /// Adds layer `l`'s glimpse embedding to the last position (the glimpse
    /// token of every left-padded row).
    fn add_glimpse_embedding(&self, hidden: &Tensor, l: usize) -> Result<Tensor> {
        let (b, s, dm) = hidden.dims3()?;
        let emb = self
            .embeddings
            .get(l)?
            .to_dtype(hidden.dtype())?
            .reshape((1, 1, dm))?
            .broadcast_as((b, 1, dm))?;
        let before = hidden.narrow(1, 0, s - 1)?;
        let last = (hidden.narrow(1, s - 1, 1)? + emb)?;
        Tensor::cat(&[&before, &last], 1)
    }

    /// Layers 0..=K over the glimpse prompt, one layer at a time (the glimpse
    /// embedding of each layer is added before it). Returns the layer-K hidden
    /// states, the cache of layers 0..=K and the glimpse query at layer K.
    pub fn prefill_to_layer_k(
        &self,
        model: &LlavaModel,
        prompt: &Prompt,
    ) -> Result<(Tensor, KvCache, Tensor)> {
        let dec = &model.decoder;
        let mask = prompt.mask()?;
        let mut cache = dec.new_cache();
        let mut h = prompt.embeds.clone();
        for l in 0..self.cfg.layer {
            if l > 0 {
                h = self.add_glimpse_embedding(&h, l)?;
            }
            h = dec.forward_layers(&h, &prompt.positions, Some(&mask), l..l + 1, &mut cache)?;
        }
        let k = self.cfg.layer;
        if k > 0 {
            h = self.add_glimpse_embedding(&h, k)?;
        }
        let (h, captured) =
            dec.forward_layers_capture(&h, &prompt.positions, Some(&mask), k..k + 1, &mut cache)?;
        Ok((h, cache, captured.last_query))
    }

    /// The importance logits `[B, Nv]` of the visual tokens from the
    /// glimpse query and layer K's keys.
    pub fn importance(
        &self,
        model: &LlavaModel,
        prompt: &Prompt,
        query: &Tensor,
        cache: &KvCache,
        vit_states: &[Tensor],
    ) -> Result<Tensor> {
        let rows = prompt.row_layout().map_err(candle_core::Error::wrap)?;
        let Some((k, _)) = cache.layer(self.cfg.layer) else {
            candle_core::bail!("GlimpsePrune: layer K's cache is empty")
        };
        let scores = ops::glimpse_scores(query, k, &rows, None, self.cfg.mode)?;
        let side = model.config.vision.patches_per_side();
        let grid: Vec<(usize, usize)> = (0..side * side).map(|i| (i / side, i % side)).collect();
        let features = self
            .cfg
            .feature_layers
            .iter()
            .map(|&l| vit_states[l].clone())
            .collect::<Vec<_>>();
        let nv: Vec<usize> = prompt.visual.iter().map(Vec::len).collect();
        self.vip.forward(&scores, &features, &grid, &nv)
    }

    /// GlimpsePrune generation of `max_new_tokens` greedy tokens per row for
    /// images `pixels [B, 3, H, W]` with one question each.
    pub fn generate(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
        max_new_tokens: usize,
    ) -> Result<GlimpseRun> {
        self.refuse_emptiable_rows(system, questions)?;
        let t0 = Instant::now();
        let dec = &model.decoder;
        let vit_states = model.vision.forward(pixels)?;
        let image_embeds = model
            .projector
            .forward(&vit_states[model.config.feature_layer_index()])?;
        let prompt = self.prompt(model, &image_embeds, system, questions)?;
        let (h, mut cache, query) = self.prefill_to_layer_k(model, &prompt)?;
        let logits = self.importance(model, &prompt, &query, &cache, &vit_states)?;

        // One-shot pruning: the kept set, then one compaction of layers 0..=K.
        let rows = prompt.row_layout().map_err(candle_core::Error::wrap)?;
        let mut plan = ops::plan_keep(&logits, &rows, &self.cfg.rule, true)?;
        let kept = Reduced::gather(&prompt, &h, &mut plan, "GlimpsePrune")?;
        let k = self.cfg.layer;
        let caches = (0..=k)
            .map(|l| cache.layer(l).cloned())
            .collect::<Option<Vec<_>>>();
        let Some(caches) = caches else {
            candle_core::bail!("GlimpsePrune: a layer before K has no cache")
        };
        for (l, (kc, vc)) in ops::compact_kv(&caches, &plan, Padding::Left)?
            .into_iter()
            .enumerate()
        {
            cache.set_layer(l, kc, vc);
        }

        // The remaining layers on the shorter sequence, then decoding at the
        // end of the dense layout (the glimpse token's position).
        let layers = dec.num_layers();
        let first = kept.forward(dec, k + 1..layers, &mut cache)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        let generation = dec.greedy(
            &first,
            &prompt.next_positions(),
            &kept.starts,
            &mut cache,
            max_new_tokens,
        )?;
        let decode = t1.elapsed();
        Ok(GlimpseRun {
            generation,
            kept: plan.kept_visual()?,
            visual: prompt.visual.iter().map(Vec::len).collect(),
            kv_entries: kept.lengths.iter().map(|n| n * layers).collect(),
            prefill,
            decode,
        })
    }

    /// No row may be left with nothing to attend (docs/architecture.md):
    /// a row that is only its image and the glimpse token (no system
    /// prompt, no question) keeps nothing but visual tokens, so a rule that
    /// may keep none of them (`min_keep` 0) is refused before the model runs.
    fn refuse_emptiable_rows(&self, system: &[u32], questions: &[Vec<u32>]) -> Result<()> {
        if self.cfg.rule.min_keep > 0 || !system.is_empty() {
            return Ok(());
        }
        match questions.iter().position(Vec::is_empty) {
            Some(b) => candle_core::bail!(
                "GlimpsePrune: row {b} is only its image and the glimpse token, and the keep rule (min_keep 0) may drop every visual token, leaving the row nothing to attend; keep one (min_keep >= 1) or give the row text"
            ),
            None => Ok(()),
        }
    }
}
