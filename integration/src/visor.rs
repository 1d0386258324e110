//! VISOR (seeds/002) end to end: the visual tokens reach the language model
//! only through a few layers. Text-only layers run the text stream alone;
//! cross-attention layers (`L_CA`) let the text query the current visual
//! tokens (foveal cross_attention); self-attention layers (the chosen
//! configuration's `L_SA`) run the standard layer over the visual tokens and
//! the text in the dense layout, refining the visual tokens (Eq. 3). The
//! visual tokens get a conditional position embedding first (foveal
//! pos_conv1d). A routing token after each question and an MLP at the
//! block before the first skippable self-attention layer choose the
//! configuration per row (§4.3); rows that chose differently run as
//! separate groups. VISOR-TR packs the tower's tokens (foveal token_pack)
//! before a projector of `4C` inputs.
//!
//! The schedule is data ([`VisorConfig`]); the layers are in
//! `visor_layers.rs` (private), the prompt's two streams in
//! [`crate::visor_prompt`]. docs/architecture.md ("VISOR in the model")
//! gives every choice the paper leaves open.

use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::decoder::{argmax, Generation};
use crate::method::{ImageQuestions, Method, Panel, Report, TokenMaps};
use crate::model::LlavaModel;
use crate::ops::{self, AttendLens};
use crate::projector::Projector;
use crate::vision_sampler::{grid_crops, stitch_tiles};
use crate::visor_config::{Route, VisorConfig};
use crate::visor_layers::{CrossBlock, Router, Stack, State};
use crate::visor_prompt::{row_index, Streams, VisorPrompt, VisorText};

/// VISOR's learned parts: the position convolution, the cross-attention
/// blocks, the routing token and router (two or more configurations), and
/// VISOR-TR's projector of packed tokens.
#[derive(Debug, Clone)]
pub struct Visor {
    /// `[Dm, 7]` and `[Dm]` (`visor.pos_conv.{weight [Dm, 1, 7], bias}`).
    pos_conv: (Tensor, Tensor),
    /// `[Dm]` (`visor.routing_token`) and the router, with two or more
    /// configurations.
    routing: Option<(Tensor, Router)>,
    /// Per decoder layer, its cross-attention block (layers in `L_CA`).
    cross: Vec<Option<CrossBlock>>,
    /// VISOR-TR: `4 C_vision -> Dm`
    /// (`multi_modal_projector.packed.{linear_1,linear_2}`).
    packed_projector: Option<Projector>,
    cfg: VisorConfig,
    checkpoint: Checkpoint,
}

/// Images and their questions: row `b` is `[system][image b]` then each of
/// `questions[b]` (followed by a routing token when the router chooses).
#[derive(Debug, Clone)]
pub struct VisorInput {
    /// `[B, 3, rows * s, cols * s]`.
    pub pixels: Tensor,
    pub grid: (usize, usize),
    pub system: Vec<u32>,
    pub questions: Vec<Vec<Vec<u32>>>,
}

impl VisorInput {
    /// Each row's text, with `answers[b]` appended after its last question
    /// (none: `answers` empty).
    pub fn text(&self, answers: &[Vec<u32>]) -> Vec<VisorText> {
        self.questions
            .iter()
            .enumerate()
            .map(|(b, q)| VisorText {
                system: self.system.clone(),
                questions: q.clone(),
                answer: answers.get(b).cloned().unwrap_or_default(),
            })
            .collect()
    }
}

/// Attention FLOPs of one row's prefill, per layer type (QK^T and PV, a
/// multiply-add counted as 2: `4 Hq D` per query-key pair; causal
/// self-attention over `n` tokens has `n (n + 1) / 2` pairs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionFlops {
    /// The configuration's self-attention layers over the dense layout.
    pub self_attention: f64,
    /// Cross-attention: every text token over every visual token.
    pub cross_attention: f64,
    /// The text stream's own attention in the other layers.
    pub text: f64,
    /// The dense model on the same image and questions (every layer
    /// self-attention over the tower's tokens, unpacked, and the text
    /// without routing tokens).
    pub dense: f64,
}

impl AttentionFlops {
    pub fn total(&self) -> f64 {
        self.self_attention + self.cross_attention + self.text
    }
}

/// One row's recorded attention: per cross-attention layer (ascending),
/// the layer and the weights over the row's visual tokens.
pub type LayerAttention = Vec<(usize, Vec<f32>)>;

/// One VISOR generation and what it did.
#[derive(Debug)]
pub struct VisorRun {
    pub generation: Generation,
    /// Per row, the configuration it ran (an index into the list).
    pub configuration: Vec<usize>,
    /// Per row and routing token, the router's logits ...
    pub router_logits: Vec<Vec<Vec<f32>>>,
    /// ... and their argmax (empty without the router).
    pub predictions: Vec<Vec<usize>>,
    /// Per row: visual tokens of the tower's grid, after VISOR-TR's packing
    /// (`None` without), text tokens.
    pub visual: Vec<usize>,
    pub packed: Option<Vec<usize>>,
    pub text: Vec<usize>,
    /// KV entries per row after the prefill: the dense layout in each
    /// self-attention layer, the text stream in the others, and the visual
    /// K/V each cross-attention layer keeps.
    pub kv_entries: Vec<usize>,
    pub flops: Vec<AttentionFlops>,
    /// The grid `(rows, cols)` of the visual tokens (the stitched map,
    /// after VISOR-TR's packing), in raster order.
    pub grid: (usize, usize),
    /// Per row and cross-attention layer of its prefill (ascending): the
    /// layer and the attention probabilities of the row's last text token
    /// over its visual tokens, mean over heads (each sums to 1). Recorded
    /// by [`Visor::generate_recording`] (the report's pictures); empty
    /// from [`Visor::generate`].
    pub attention: Vec<LayerAttention>,
    pub prefill: Duration,
    pub decode: Duration,
}

/// The prefill of one group of rows that chose one configuration.
struct Group {
    /// The batch rows it holds, in order.
    rows: Vec<usize>,
    configuration: usize,
    streams: Streams,
    state: State,
}

/// The router's logits and argmax per row and routing token.
struct Routed {
    logits: Vec<Vec<Vec<f32>>>,
    picks: Vec<Vec<usize>>,
}

/// A prefill of every group, and what the router chose.
struct Prefilled {
    groups: Vec<Group>,
    configuration: Vec<usize>,
    router_logits: Vec<Vec<Vec<f32>>>,
    predictions: Vec<Vec<usize>>,
}

impl VisorRun {
    /// Per row, a panel per recorded cross-attention layer: the last text
    /// token's attention over the visual tokens, scaled to its largest
    /// ([`VisorRun::attention`]); no panel where nothing was recorded.
    pub fn token_maps(&self) -> Vec<TokenMaps> {
        self.attention
            .iter()
            .map(|layers| TokenMaps {
                grid: self.grid,
                panels: layers
                    .iter()
                    .map(|(l, w)| Panel::scaled(format!("CA layer {l}"), w))
                    .collect(),
            })
            .collect()
    }
}

impl Method for Visor {
    type Config = VisorConfig;
    const NAME: &'static str = "VISOR";

    fn parts(&self) -> (&VisorConfig, &Checkpoint) {
        (&self.cfg, &self.checkpoint)
    }

    /// From `vb` at the root of a LLaVA checkpoint: `visor.pos_conv.*`,
    /// `language_model.model.layers.{l}.cross_attn*` for `l` in `L_CA`,
    /// `visor.routing_token` and `visor.router.*` (two or more
    /// configurations), `multi_modal_projector.packed.*` (VISOR-TR).
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &VisorConfig) -> Result<Self> {
        model.validate()?;
        cfg.validate(model)?;
        let t = &model.text;
        let dm = t.hidden_size;
        let built = Checkpoint::record(vb, |vb| {
            let conv = vb.pp("visor.pos_conv");
            let weight = conv.get((dm, 1, foveal::pos_conv1d::KERNEL_SIZE), "weight")?;
            let pos_conv = (weight.reshape((dm, ()))?, conv.get(dm, "bias")?);
            let routing = if cfg.configurations.len() > 1 {
                let token = vb.pp("visor").get(dm, "routing_token")?;
                let router = Router::new(vb.pp("visor.router"), t, cfg.configurations.len())?;
                Some((token, router))
            } else {
                None
            };
            let layers = vb.pp("language_model.model.layers");
            let cross = (0..t.num_layers)
                .map(|l| {
                    cfg.cross_attention_layers
                        .contains(&l)
                        .then(|| CrossBlock::new(layers.pp(l), t))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()?;
            let packed_projector = cfg
                .pack_ratio
                .map(|_| {
                    Projector::new(
                        vb.pp("multi_modal_projector.packed"),
                        4 * model.vision.hidden_size,
                        dm,
                        model.projector_act,
                    )
                })
                .transpose()?;
            Ok((pos_conv, routing, cross, packed_projector))
        })?;
        let ((pos_conv, routing, cross, packed_projector), checkpoint) = built;
        Ok(Visor {
            pos_conv,
            routing,
            cross,
            packed_projector,
            cfg: cfg.clone(),
            checkpoint,
        })
    }

    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        let input = VisorInput {
            pixels: input.pixels.clone(),
            grid: input.grid,
            system: input.system.clone(),
            questions: input.questions.iter().map(|q| vec![q.clone()]).collect(),
        };
        let run = self.generate_recording(model, &input, tokens)?;
        Ok(self.report(run))
    }
}

impl Visor {
    /// The visual tokens the decoder receives, `[B, Nv, Dm]` in raster order
    /// of the stitched map, after the position convolution; and the tower's
    /// tokens per image (before VISOR-TR's packing).
    pub fn visual_tokens(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        grid: (usize, usize),
    ) -> Result<(Tensor, usize)> {
        let (tokens, per_image, _) = self.visual_map(model, pixels, grid)?;
        Ok((tokens, per_image))
    }

    /// [`Visor::visual_tokens`] and the grid `(h, w)` of the stitched map
    /// they are the raster order of.
    fn visual_map(
        &self,
        model: &LlavaModel,
        pixels: &Tensor,
        grid: (usize, usize),
    ) -> Result<(Tensor, usize, (usize, usize))> {
        let crops = grid_crops(model, pixels, grid)?;
        let layer = model.config.feature_layer_index();
        let features = model.vision.forward_upto(&crops, layer)?.swap_remove(layer);
        let p = model.config.vision.patches_per_side();
        let (n, _, c) = features.dims3()?;
        let grid_features = features.reshape((n, p, p, c))?;
        let tiles = match (&self.packed_projector, self.cfg.pack_ratio) {
            (Some(projector), Some(rho)) => {
                projector.forward(&ops::token_pack(&grid_features, rho)?)?
            }
            _ => model.projector.forward(&grid_features)?,
        };
        let map = stitch_tiles(&tiles, grid)?;
        let (b, h, w, dm) = map.dims4()?;
        let tokens = map.reshape((b, h * w, dm))?;
        let (weight, bias) = &self.pos_conv;
        let tokens = ops::pos_conv1d(&tokens, &vec![h * w; b], weight, bias)?;
        Ok((tokens, grid.0 * grid.1 * p * p, (h, w)))
    }

    /// The prompt of `visual` `[B, Nv, Dm]` and each row's `text`, with a
    /// routing token after each question when the router chooses.
    pub fn prompt(
        &self,
        model: &LlavaModel,
        visual: &Tensor,
        text: &[VisorText],
    ) -> Result<VisorPrompt> {
        let rows = (0..visual.dim(0)?)
            .map(|b| visual.get(b))
            .collect::<Result<Vec<_>>>()?;
        let routing = match (self.cfg.route, &self.routing) {
            (Route::Router, Some((token, _))) => Some(token),
            _ => None,
        };
        VisorPrompt::build(&model.decoder, &rows, text, routing)
    }

    /// The prefill: layers up to the router's block for the whole batch,
    /// the router, then the rest of the layers per group of rows that chose
    /// one configuration; `record`: keeping each cross-attention layer's
    /// attention ([`State::attention`]).
    fn prefill(&self, model: &LlavaModel, prompt: &VisorPrompt, record: bool) -> Result<Prefilled> {
        let dec = &model.decoder;
        let layers = dec.num_layers();
        let (v, t) = prompt.initial()?;
        let streams = &prompt.streams;
        let mut state = State {
            v,
            t,
            cache: dec.new_cache(),
            visual_kv: vec![None; layers],
            attention: vec![None; layers],
        };
        let b = streams.batch();
        let (configuration, router_logits, predictions, done) =
            match (self.cfg.route, &self.routing, self.cfg.router_layer()) {
                (Route::Fixed(c), _, _) => {
                    (vec![c; b], vec![Vec::new(); b], vec![Vec::new(); b], 0)
                }
                (Route::Router, Some((_, router)), Some(r)) => {
                    // Layers 0..=r are the same in every configuration.
                    let kinds = self.cfg.kinds(0, layers);
                    let lens = self.prefill_lens(streams, dec.device())?;
                    self.stack(model, &kinds, record).prefill(
                        streams,
                        &mut state,
                        0..r + 1,
                        &lens,
                    )?;
                    let routed = self.route(router, streams, &state.t)?;
                    let configuration = routed
                        .picks
                        .iter()
                        .map(|p| self.cfg.costliest_of(p))
                        .collect();
                    (configuration, routed.logits, routed.picks, r + 1)
                }
                _ => candle_core::bail!("VISOR: the router needs two or more configurations"),
            };
        let mut groups = Vec::new();
        let mut chosen: Vec<usize> = configuration.clone();
        chosen.sort_unstable();
        chosen.dedup();
        for c in chosen {
            let rows: Vec<usize> = (0..b).filter(|&r| configuration[r] == c).collect();
            let (streams, mut state, lens) = if rows.len() == b {
                (
                    streams.clone(),
                    state.clone(),
                    self.prefill_lens(streams, dec.device())?,
                )
            } else {
                let sub = streams.select(&rows, dec.device())?;
                let lens = self.prefill_lens(&sub, dec.device())?;
                (sub, state.select(&row_index(&rows, dec.device())?)?, lens)
            };
            let kinds = self.cfg.kinds(c, layers);
            self.stack(model, &kinds, record)
                .prefill(&streams, &mut state, done..layers, &lens)?;
            groups.push(Group {
                rows,
                configuration: c,
                streams,
                state,
            });
        }
        Ok(Prefilled {
            groups,
            configuration,
            router_logits,
            predictions,
        })
    }

    /// Cross-attention lengths of a prefill: every text slot a query over
    /// its row's visual tokens.
    fn prefill_lens(&self, streams: &Streams, device: &candle_core::Device) -> Result<AttendLens> {
        let b = streams.batch();
        AttendLens::new(
            &vec![streams.text_len(); b],
            &streams.visual_counts(),
            device,
        )
    }

    fn stack<'a>(
        &'a self,
        model: &'a LlavaModel,
        kinds: &'a [crate::visor_config::LayerKind],
        record: bool,
    ) -> Stack<'a> {
        Stack {
            dec: &model.decoder,
            kinds,
            cross: &self.cross,
            record,
        }
    }

    /// The router over every routing token's hidden state `t` (the text
    /// stream after the router's block): per row and token its logits and
    /// their argmax (ties to the lower index).
    fn route(&self, router: &Router, streams: &Streams, t: &Tensor) -> Result<Routed> {
        let st = streams.text_len();
        let slots: Vec<usize> = streams
            .routes
            .iter()
            .enumerate()
            .flat_map(|(b, r)| r.iter().map(move |&s| b * st + s))
            .collect();
        if streams.routes.iter().any(Vec::is_empty) {
            candle_core::bail!("VISOR: the router needs a routing token (a question) in every row");
        }
        let (b, _, dm) = t.dims3()?;
        let h = t
            .reshape((b * st, dm))?
            .index_select(&row_index(&slots, t.device())?, 0)?;
        let logits = router.logits(&h)?;
        let picks = argmax(&logits)?;
        let rows = logits.to_vec2::<f32>()?;
        let (mut out_logits, mut out_picks, mut i) = (Vec::new(), Vec::new(), 0);
        for r in &streams.routes {
            out_logits.push(rows[i..i + r.len()].to_vec());
            out_picks.push(picks[i..i + r.len()].iter().map(|&p| p as usize).collect());
            i += r.len();
        }
        Ok(Routed {
            logits: out_logits,
            picks: out_picks,
        })
    }

    /// VISOR generation of `max_new_tokens` greedy tokens per row.
    pub fn generate(
        &self,
        model: &LlavaModel,
        input: &VisorInput,
        max_new_tokens: usize,
    ) -> Result<VisorRun> {
        self.run(model, input, max_new_tokens, false)
    }

    /// [`Visor::generate`], keeping each cross-attention layer's attention
    /// of the last text token over the visual tokens
    /// ([`VisorRun::attention`]; what the report's pictures show).
    pub fn generate_recording(
        &self,
        model: &LlavaModel,
        input: &VisorInput,
        max_new_tokens: usize,
    ) -> Result<VisorRun> {
        self.run(model, input, max_new_tokens, true)
    }

    fn run(
        &self,
        model: &LlavaModel,
        input: &VisorInput,
        max_new_tokens: usize,
        record: bool,
    ) -> Result<VisorRun> {
        let t0 = Instant::now();
        let dec = &model.decoder;
        let (visual, per_image, grid) = self.visual_map(model, &input.pixels, input.grid)?;
        let prompt = self.prompt(model, &visual, &input.text(&[]))?;
        let Prefilled {
            mut groups,
            configuration,
            router_logits,
            predictions,
        } = self.prefill(model, &prompt, record)?;
        let attention = self.attention(&groups, &prompt.streams.visual_counts())?;
        let firsts = groups
            .iter()
            .map(|g| dec.last_logits(&g.state.t))
            .collect::<Result<Vec<_>>>()?;
        let prefill = t0.elapsed();

        let t1 = Instant::now();
        let b = prompt.streams.batch();
        let mut generation = Generation {
            tokens: vec![Vec::new(); b],
            positions: vec![Vec::new(); b],
            logits: Vec::new(),
        };
        let mut step_logits: Vec<Vec<Tensor>> = Vec::new();
        for (g, first) in groups.iter_mut().zip(firsts) {
            let gen = self.greedy(model, g, first, max_new_tokens)?;
            for (i, &row) in g.rows.iter().enumerate() {
                generation.tokens[row] = gen.tokens[i].clone();
                generation.positions[row] = gen.positions[i].clone();
            }
            step_logits.push(gen.logits);
        }
        // Every step's logits back in batch order.
        let order: Vec<usize> = groups.iter().flat_map(|g| g.rows.clone()).collect();
        let mut inverse = vec![0; b];
        for (i, &row) in order.iter().enumerate() {
            inverse[row] = i;
        }
        let inverse = row_index(&inverse, dec.device())?;
        for step in 0..max_new_tokens {
            let parts: Vec<&Tensor> = step_logits.iter().map(|l| &l[step]).collect();
            generation
                .logits
                .push(Tensor::cat(&parts, 0)?.index_select(&inverse, 0)?);
        }
        let decode = t1.elapsed();

        let streams = &prompt.streams;
        let (text, nv) = (streams.text_counts(), streams.visual_counts());
        let (kv_entries, flops) = (0..b)
            .map(|r| {
                // The dense model's prompt: the tower's tokens, no routing token.
                let dense = text[r] - streams.routes[r].len() + per_image;
                self.costs(model, configuration[r], (text[r], nv[r]), dense)
            })
            .unzip();
        Ok(VisorRun {
            generation,
            configuration,
            router_logits,
            predictions,
            visual: vec![per_image; b],
            packed: self.cfg.pack_ratio.map(|_| nv.clone()),
            text,
            kv_entries,
            flops,
            grid,
            attention,
            prefill,
            decode,
        })
    }

    /// Per row, the attention each group's prefill recorded, per
    /// cross-attention layer: (layer, weights over the row's `nv[row]`
    /// visual tokens). Empty where nothing was recorded.
    fn attention(&self, groups: &[Group], nv: &[usize]) -> Result<Vec<LayerAttention>> {
        let mut rows = vec![Vec::new(); nv.len()];
        for g in groups {
            for (l, a) in g.state.attention.iter().enumerate() {
                let Some(a) = a else { continue };
                for (i, w) in a.to_vec2::<f32>()?.into_iter().enumerate() {
                    let row = g.rows[i];
                    rows[row].push((l, w[..nv[row]].to_vec()));
                }
            }
        }
        Ok(rows)
    }

    /// Greedy decoding of one group from its prefill (`first`: the logits
    /// of its rows' last text tokens), at the end of each row's dense layout.
    fn greedy(
        &self,
        model: &LlavaModel,
        group: &mut Group,
        first: Tensor,
        max_new_tokens: usize,
    ) -> Result<Generation> {
        let dec = &model.decoder;
        let kinds = self.cfg.kinds(group.configuration, dec.num_layers());
        let stack = self.stack(model, &kinds, false);
        let n = group.rows.len();
        let lens = AttendLens::new(&vec![1; n], &group.streams.visual_counts(), dec.device())?;
        let mut gen = Generation {
            tokens: vec![Vec::with_capacity(max_new_tokens); n],
            positions: vec![Vec::with_capacity(max_new_tokens); n],
            logits: Vec::with_capacity(max_new_tokens),
        };
        let mut logits = first;
        let mut pos = group.streams.next.clone();
        for step in 0..max_new_tokens {
            let next = argmax(&logits)?;
            for (row, (&t, &p)) in next.iter().zip(&pos).enumerate() {
                gen.tokens[row].push(t);
                gen.positions[row].push(p);
            }
            gen.logits.push(logits);
            if step + 1 == max_new_tokens {
                break;
            }
            logits = stack.decode_step(&group.streams, &mut group.state, &next, &pos, &lens)?;
            pos.iter_mut().for_each(|p| *p += 1);
        }
        Ok(gen)
    }

    /// The logits `[t_b, vocab]` (f32) of every text token of each row of a
    /// full prefill of `input` with `answers[b]` appended after row `b`'s
    /// last question (the longer prompt a generation makes); and the
    /// configuration each row ran.
    pub fn text_logits(
        &self,
        model: &LlavaModel,
        input: &VisorInput,
        answers: &[Vec<u32>],
    ) -> Result<(Vec<Tensor>, Vec<usize>)> {
        let (visual, _) = self.visual_tokens(model, &input.pixels, input.grid)?;
        let prompt = self.prompt(model, &visual, &input.text(answers))?;
        let prefilled = self.prefill(model, &prompt, false)?;
        let mut rows = vec![None; prompt.streams.batch()];
        for g in &prefilled.groups {
            let logits = model.decoder.logits(&g.state.t)?;
            let st = g.streams.text_len();
            for (i, (&row, &start)) in g.rows.iter().zip(&g.streams.text_starts).enumerate() {
                rows[row] = Some(logits.get(i)?.narrow(0, start, st - start)?);
            }
        }
        let rows = rows
            .into_iter()
            .map(|r| r.ok_or_else(|| candle_core::Error::msg("VISOR: a row left no group")))
            .collect::<Result<Vec<_>>>()?;
        Ok((rows, prefilled.configuration))
    }

    /// KV entries and attention FLOPs of a row of `text` text and `nv`
    /// visual tokens under configuration `c`, beside the dense model's
    /// attention over its prompt of `dense` tokens.
    fn costs(
        &self,
        model: &LlavaModel,
        c: usize,
        (text, nv): (usize, usize),
        dense: usize,
    ) -> (usize, AttentionFlops) {
        let t = &model.config.text;
        let layers = t.num_layers;
        let sa = self.cfg.configurations[c].len();
        let ca = self
            .cfg
            .cross_attention_layers
            .iter()
            .filter(|l| !self.cfg.configurations[c].contains(l))
            .count();
        let n = text + nv;
        let pair = 4.0 * (t.num_heads * t.head_dim) as f64;
        let causal = |n: usize| (n * (n + 1) / 2) as f64;
        let kv = sa * n + (layers - sa) * text + ca * nv;
        let flops = AttentionFlops {
            self_attention: sa as f64 * pair * causal(n),
            cross_attention: ca as f64 * pair * (text * nv) as f64,
            text: (layers - sa) as f64 * pair * causal(text),
            dense: layers as f64 * pair * causal(dense),
        };
        (kv, flops)
    }

    /// The run in the terms every method shares; each row's detail names
    /// its configuration (and the router's picks) and its attention FLOPs
    /// per layer type against the dense model's.
    pub fn report(&self, run: VisorRun) -> Report {
        let name = match (self.cfg.pack_ratio, self.cfg.route) {
            (Some(_), _) => "VISOR-TR",
            (None, Route::Router) => "VISOR",
            (None, Route::Fixed(_)) => "VISOR fixed",
        };
        let detail = (0..run.visual.len())
            .map(|b| {
                let c = run.configuration[b];
                let f = &run.flops[b];
                let how = if run.predictions[b].is_empty() {
                    "fixed".to_string()
                } else {
                    format!("router picked {:?}", run.predictions[b])
                };
                format!(
                    "SA layers {:?} (configuration {c}, {how}); attention MFLOP: SA {:.2} + CA {:.2} + text {:.2} = {:.2} (dense {:.2}, {:.1}x)",
                    self.cfg.configurations[c],
                    f.self_attention / 1e6,
                    f.cross_attention / 1e6,
                    f.text / 1e6,
                    f.total() / 1e6,
                    f.dense / 1e6,
                    f.dense / f.total()
                )
            })
            .collect();
        let kept = run.packed.clone().unwrap_or_else(|| run.visual.clone());
        let maps = run.token_maps();
        Report {
            sampled: run.packed.clone(),
            kept,
            detail,
            maps,
            ..Report::new(
                name,
                run.visual,
                run.kv_entries,
                (run.prefill, run.decode),
                run.generation.tokens,
            )
        }
    }
}
