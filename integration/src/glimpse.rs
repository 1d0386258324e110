//! GlimpsePrune (seeds/001) end to end, as its authors run it: a glimpse
//! token appended after the prompt, its input `norm(le_proj(E_0))` and
//! `norm(le_proj(E_l))` added to its hidden state before every other layer
//! `l` of `le_layers`; the prefill of layers 0..=K; the glimpse token's
//! attention to the visual tokens at every selected layer (foveal
//! glimpse_scores, one call per layer); the Visual Importance Predictor
//! ([`crate::vip`]) or the training-free baseline map; the kept set (foveal
//! select_keep, then the always-kept anchors); one compaction of the KV
//! caches of layers 0..=K, of the layer-K hidden states and of the position
//! ids (foveal compact_kv / gather_rows), the glimpse token dropped; the
//! remaining layers on the shorter sequence; greedy decoding on the
//! compacted cache. Kept tokens keep their original position ids.
//!
//! The learned parts have the authors' names (`learnable_embeddings`,
//! `le_proj.*`, `le_norm.*`, `attn_fuser.*`), so their saved modules load as
//! they are: [`GlimpsePrune::load_upstream`] (their directory: config.json
//! and new_modules_gp.pt), [`Method::load_pth`], [`Method::load_safetensors`].

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, rms_norm, LayerNormConfig, VarBuilder};
use foveal::Padding;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::decoder::{Generation, KvCache};
pub use crate::glimpse_config::GlimpseConfig;
use crate::glimpse_config::{EmbeddingConfig, LeNorm, Predictor, UpstreamConfig};
use crate::method::{ImageQuestions, Method, Panel, Report, TokenMaps};
use crate::model::LlavaModel;
use crate::ops;
use crate::prompt::{image_question_rows, Prompt, Segment};
use crate::reduce::Reduced;
use crate::vip::{baseline_map, Vip};

/// The glimpse token's embeddings, `norm(le_proj(E_i))` for the i-th layer
/// of `le_layers` (computed once: they depend on nothing else).
#[derive(Debug, Clone)]
struct GlimpseEmbeddings {
    /// Per decoder layer, the embedding added before it `[1, Dm]` (layer
    /// 0's is the token's input).
    per_layer: Vec<Option<Tensor>>,
}

impl GlimpseEmbeddings {
    /// From `vb` at the root of the authors' modules: `learnable_embeddings`
    /// `[len(le_layers), 1, Dm]`, `le_proj`, `le_norm`.
    fn new(vb: VarBuilder, cfg: &EmbeddingConfig, model: &ModelConfig) -> Result<Self> {
        let dm = model.text.hidden_size;
        let table = vb.get((cfg.layers.len(), 1, dm), "learnable_embeddings")?;
        let proj = linear(dm, dm, vb.pp("le_proj"))?.forward(&table.squeeze(1)?)?;
        let normed = match cfg.norm {
            LeNorm::RmsNorm { eps } => rms_norm(dm, eps, vb.pp("le_norm"))?.forward(&proj)?,
            LeNorm::LayerNorm { eps } => {
                layer_norm(dm, LayerNormConfig::from(eps), vb.pp("le_norm"))?.forward(&proj)?
            }
        };
        let mut per_layer = vec![None; model.text.num_layers];
        for (i, &l) in cfg.layers.iter().enumerate() {
            per_layer[l] = Some(normed.narrow(0, i, 1)?);
        }
        Ok(GlimpseEmbeddings { per_layer })
    }
}

/// The learned parts: the glimpse embeddings and the predictor (either may
/// be absent: no glimpse token, the baseline map).
#[derive(Debug, Clone)]
pub struct GlimpsePrune {
    embeddings: Option<GlimpseEmbeddings>,
    predictor: Option<Vip>,
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

    /// From `vb` with the authors' names (`learnable_embeddings`,
    /// `le_proj.*`, `le_norm.*`, `attn_fuser.*`).
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &GlimpseConfig) -> Result<Self> {
        cfg.validate()?;
        check_against(cfg, model)?;
        let ((embeddings, predictor), checkpoint) = Checkpoint::record(vb, |vb| {
            let embeddings = match &cfg.embeddings {
                Some(e) => Some(GlimpseEmbeddings::new(vb.clone(), e, model)?),
                None => None,
            };
            let predictor = match &cfg.predictor {
                Predictor::Vip(v) => Some(Vip::new(vb.pp("attn_fuser"), v)?),
                Predictor::Baseline => None,
            };
            Ok((embeddings, predictor))
        })?;
        Ok(GlimpsePrune {
            embeddings,
            predictor,
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
        let side = model.config.vision.patches_per_side();
        let maps = run
            .kept
            .iter()
            .map(|kept| TokenMaps {
                grid: (side, side),
                panels: vec![Panel::kept("kept", side * side, kept)],
            })
            .collect();
        Ok(Report {
            kept: run.kept.iter().map(Vec::len).collect(),
            maps,
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

/// The settings against foveal's LLaVA-style model.
fn check_against(cfg: &GlimpseConfig, model: &ModelConfig) -> Result<()> {
    let (layers, heads) = (model.text.num_layers, model.text.num_heads);
    if cfg.merge_unit != 1 {
        candle_core::bail!(
            "GlimpseConfig: conditioning features averaged over {}-patch merge units (Qwen2.5-VL's tower); this LLaVA-style model maps one patch to one token (run the predictor alone: vip::merge_unit_mean, Vip::forward)",
            cfg.merge_unit
        );
    }
    if let Some(&l) = cfg.selected_layers.iter().find(|&&l| l >= layers) {
        candle_core::bail!("GlimpseConfig: selected layer {l} of a {layers}-layer decoder");
    }
    if let Some(e) = &cfg.embeddings {
        if let Some(&l) = e.layers.iter().find(|&&l| l >= layers) {
            candle_core::bail!(
                "GlimpseConfig: glimpse embedding for layer {l} of a {layers}-layer decoder"
            );
        }
    }
    if let Predictor::Vip(v) = &cfg.predictor {
        if v.in_features != cfg.selected_layers.len() * heads {
            candle_core::bail!(
                "GlimpseConfig: predictor input of {} for {} selected layers of {heads} query heads",
                v.in_features,
                cfg.selected_layers.len()
            );
        }
        if v.cond.is_some() {
            if v.vision_hidden != model.vision.hidden_size {
                candle_core::bail!("GlimpseConfig: predictor conditioned on features of width {}, the tower's are {}", v.vision_hidden, model.vision.hidden_size);
            }
            if let Some(&l) = cfg
                .visual_layers
                .iter()
                .find(|&&l| l > model.vision.num_layers)
            {
                candle_core::bail!(
                    "GlimpseConfig: ViT hidden state {l} of a {}-layer tower",
                    model.vision.num_layers
                );
            }
        }
    }
    Ok(())
}

impl GlimpsePrune {
    /// The authors' saved modules as they release them: a directory with
    /// their `config.json` (the settings, [`UpstreamConfig`]) and
    /// `new_modules_gp.pt` (the parameters), for `model`.
    pub fn load_upstream(
        dir: impl AsRef<Path>,
        model: &ModelConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let up = UpstreamConfig::from_file(dir.join("config.json"))?;
        let cfg = GlimpseConfig::from_upstream(&up, Some(model))?;
        Self::load_pth(dir.join("new_modules_gp.pt"), model, &cfg, device, dtype)
    }

    /// K, within the decoder.
    fn reduce_layer(&self, layers: usize) -> usize {
        self.cfg.reduce_layer.min(layers - 1)
    }

    /// The prompt rows `[system][image b][question b]`, then the glimpse
    /// token with its layer-0 embedding (none without glimpse embeddings).
    pub fn prompt(
        &self,
        model: &LlavaModel,
        image_embeds: &Tensor,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Prompt> {
        let image = |b| Ok(Segment::Image(image_embeds.get(b)?));
        let n = image_embeds.dim(0)?;
        let mut rows = image_question_rows(n, system, questions, Segment::Text, image)?;
        if let Some(glimpse) = self.embedding(0) {
            let glimpse = glimpse.to_dtype(model.decoder.dtype())?;
            for row in &mut rows {
                row.push(Segment::Transient(glimpse.clone()));
            }
        }
        Prompt::build(&model.decoder, &rows)
    }

    /// The embedding added before layer `l` `[1, Dm]`, if any.
    fn embedding(&self, l: usize) -> Option<&Tensor> {
        self.embeddings.as_ref()?.per_layer.get(l)?.as_ref()
    }

    /// Adds `emb` `[1, Dm]` to the last position (the glimpse token of every
    /// left-padded row).
    fn add_to_last(hidden: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let (b, s, dm) = hidden.dims3()?;
        let emb = emb
            .to_dtype(hidden.dtype())?
            .reshape((1, 1, dm))?
            .broadcast_as((b, 1, dm))?;
        let before = hidden.narrow(1, 0, s - 1)?;
        let last = (hidden.narrow(1, s - 1, 1)? + emb)?;
        Tensor::cat(&[&before, &last], 1)
    }

    /// Layers 0..=K over the glimpse prompt, one layer at a time (each
    /// layer's glimpse embedding added before it). Returns the layer-K
    /// hidden states, the cache of layers 0..=K and the glimpse attention
    /// `[B, Nv_max, selected layers x Hq]` f32 (layer-major, in the order of
    /// `selected_layers`; the last prompt token's without a glimpse token).
    pub fn prefill_to_layer_k(
        &self,
        model: &LlavaModel,
        prompt: &Prompt,
    ) -> Result<(Tensor, KvCache, Tensor)> {
        let dec = &model.decoder;
        let mask = prompt.mask()?;
        let rows = prompt.row_layout().map_err(candle_core::Error::wrap)?;
        let selected = &self.cfg.selected_layers;
        let mut scores = vec![None; selected.len()];
        let mut cache = dec.new_cache();
        let mut h = prompt.embeds.clone();
        for l in 0..=self.reduce_layer(dec.num_layers()) {
            if let Some(emb) = self.embedding(l).filter(|_| l > 0) {
                h = Self::add_to_last(&h, emb)?;
            }
            let layer = l..l + 1;
            if !selected.contains(&l) {
                h = dec.forward_layers(&h, &prompt.positions, Some(&mask), layer, &mut cache)?;
                continue;
            }
            let (out, captured) =
                dec.forward_layers_capture(&h, &prompt.positions, Some(&mask), layer, &mut cache)?;
            let Some((k, _)) = cache.layer(l) else {
                candle_core::bail!("GlimpsePrune: layer {l}'s cache is empty")
            };
            let s = ops::glimpse_scores(&captured.last_query, k, &rows, None, self.cfg.mode)?;
            for (slot, _) in scores.iter_mut().zip(selected).filter(|(_, &sl)| sl == l) {
                *slot = Some(s.clone());
            }
            h = out;
        }
        let scores = scores.into_iter().collect::<Option<Vec<_>>>();
        let Some(scores) = scores else {
            candle_core::bail!("GlimpsePrune: a selected layer was not run")
        };
        Ok((h, cache, Tensor::cat(&scores, 2)?))
    }

    /// The importance logits `[B, Nv]` of the visual tokens (one tower-sized
    /// image per row) from the glimpse attention and the ViT hidden states.
    pub fn importance(
        &self,
        model: &LlavaModel,
        attention: &Tensor,
        vit_states: &[Tensor],
    ) -> Result<Tensor> {
        let side = model.config.vision.patches_per_side();
        let grids = vec![vec![(side, side)]; attention.dim(0)?];
        match &self.predictor {
            None => baseline_map(attention, &grids, self.cfg.mode),
            Some(vip) => {
                let features: Vec<Tensor> = match vip.config().cond {
                    Some(_) => self
                        .cfg
                        .visual_layers
                        .iter()
                        .map(|&l| vit_states[l].clone())
                        .collect(),
                    None => Vec::new(),
                };
                vip.forward(attention, &features, &grids)
            }
        }
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
        let feature = model.config.feature_layer_index();
        let deepest = self
            .cfg
            .visual_layers
            .iter()
            .copied()
            .fold(feature, usize::max);
        let vit_states = model.vision.forward_upto(pixels, deepest)?;
        let image_embeds = model.projector.forward(&vit_states[feature])?;
        let prompt = self.prompt(model, &image_embeds, system, questions)?;
        let (h, mut cache, attention) = self.prefill_to_layer_k(model, &prompt)?;
        let logits = self.importance(model, &attention, &vit_states)?;

        // One-shot pruning: the kept set, then one compaction of layers 0..=K.
        let mut plan = self.plan(model, &prompt, &logits)?;
        let kept = Reduced::gather(&prompt, &h, &mut plan, "GlimpsePrune")?;
        let k = self.reduce_layer(dec.num_layers());
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

    /// The kept set: select_keep over `logits`, then each image's anchors
    /// (kept whatever the rule says, after its cap and minimum, as upstream).
    fn plan(&self, model: &LlavaModel, prompt: &Prompt, logits: &Tensor) -> Result<ops::KeepPlan> {
        let rows = prompt.row_layout().map_err(candle_core::Error::wrap)?;
        let drop_last = self.embeddings.is_some();
        let plan = ops::plan_keep(logits, &rows, &self.cfg.rule, drop_last)?;
        if self.cfg.anchors.is_empty() {
            return Ok(plan);
        }
        let side = model.config.vision.patches_per_side();
        let mut kept = plan.kept_visual()?;
        for row in &mut kept {
            row.extend(self.cfg.anchors.iter().map(|a| a.index(side, side)));
            row.sort_unstable();
            row.dedup();
        }
        ops::plan_from_kept(&rows, &kept, drop_last, model.decoder.device())
    }

    /// No row may be left with nothing to attend (docs/architecture.md): a
    /// row that is only its image and the glimpse token (no system prompt,
    /// no question) keeps nothing but visual tokens, so a rule that may keep
    /// none of them (`min_keep` 0, no anchors) is refused before the model
    /// runs. Without a glimpse token the last prompt token's attention is
    /// read, which must be text: a row must not end with its image.
    fn refuse_emptiable_rows(&self, system: &[u32], questions: &[Vec<u32>]) -> Result<()> {
        let Some(b) = questions.iter().position(Vec::is_empty) else {
            return Ok(());
        };
        if self.embeddings.is_none() {
            candle_core::bail!(
                "GlimpsePrune: row {b} ends with its image; without a glimpse token the last prompt token's attention is read, and it must be text (give the row a question)"
            );
        }
        if self.cfg.rule.min_keep > 0 || !self.cfg.anchors.is_empty() || !system.is_empty() {
            return Ok(());
        }
        candle_core::bail!(
            "GlimpsePrune: row {b} is only its image and the glimpse token, and the keep rule (min_keep 0, no anchors) may drop every visual token, leaving the row nothing to attend; keep one (min_keep >= 1) or give the row text"
        )
    }
}
