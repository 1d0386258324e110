//! Glance2Gaze (seeds/000; SPEC "Glance2Gaze") end to end: Glance Fusion
//! in the vision path ([`crate::glance`]: several ViT layers fused per
//! token under the instruction, foveal glance_fusion), then Gaze
//! Compression inside the decoder ([`crate::gaze_compression`]: from layer
//! r on, before each layer `l` every unit's visual tokens are compressed
//! to `p_l` by learned queries, foveal cross_attention), the text tokens
//! untouched. A unit is an image, a sub-image of a grid (LLaVA-NeXT) or a
//! video frame: fusion and compression run per unit.
//!
//! Layout. Layers before r run over the dense layout `[system][visual
//! tokens][question]` (a grid's tokens as the stitched map, as the dense
//! model lays them out; frames one after another). Before a compressed
//! layer the units' tokens are gathered from the hidden states, compressed,
//! and laid back between the same text hidden states as a
//! [`Segment::SampledImage`]: compressed token `i` of a unit takes the
//! position id of the patch under its query's cell centre
//! ([`query_cell`]), the tokens of all units in the order of those ids, so
//! the text keeps its position ids and decoding continues at the dense
//! layout's end. Every compressed layer runs alone over its own layout and
//! caches exactly it: the caches hold a different number of visual entries
//! per layer (`U p_l`), one [`CacheSpan`] per layer while decoding.

use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::decoder::{CacheSpan, Decoder, DenseAttention, Generation, KvCache};
use crate::gaze_compression::{query_cell, GazeCompression};
use crate::glance::GlanceFusion;
use crate::glance2gaze_schedule::{paper_schedule, GazeSchedule};
use crate::method::{ImageQuestions, Method, Panel, Report, TokenMaps};
use crate::model::LlavaModel;
use crate::prompt::{image_question_rows, Prompt, Segment};

/// The paper's fused ViT layers (hidden-state indices of a 24-layer ViT;
/// 23 is LLaVA's feature layer, the penultimate).
pub const PAPER_GLANCE_LAYERS: [usize; 4] = [7, 13, 19, 23];

/// How Glance2Gaze runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Glance2GazeConfig {
    /// The fused ViT hidden states (0 the embeddings, `i` encoder layer
    /// `i`'s output), ascending.
    pub glance_layers: Vec<usize>,
    pub schedule: GazeSchedule,
    /// The name reports use.
    pub label: &'static str,
}

impl Glance2GazeConfig {
    /// The paper's fused layers scaled to `model`'s tower: each index times
    /// `F / 23` (F the model's feature layer, LLaVA's penultimate like the
    /// paper's 23), rounded, repeats dropped. The tiny model's 4-layer tower
    /// (F = 3) fuses {1, 2, 3}.
    pub fn glance_layers_for(model: &ModelConfig) -> Vec<usize> {
        let f = model.feature_layer_index() as f64;
        let mut layers: Vec<usize> = PAPER_GLANCE_LAYERS
            .iter()
            .map(|&l| (l as f64 * f / 23.0).round() as usize)
            .collect();
        layers.dedup();
        layers
    }

    /// The paper's setting for `model`: its fused layers and the paper
    /// schedule `name` scaled to the model's depth and tokens per image.
    pub fn for_model(model: &ModelConfig, name: &str) -> Result<Self> {
        let paper = paper_schedule(name)?;
        Ok(Glance2GazeConfig {
            glance_layers: Self::glance_layers_for(model),
            schedule: paper.scaled_to(model.text.num_layers, model.vision.num_patches()),
            label: paper.label,
        })
    }

    /// The LLaVA model itself: the feature layer alone, nothing compressed.
    pub fn dense(model: &ModelConfig) -> Self {
        Glance2GazeConfig {
            glance_layers: vec![model.feature_layer_index()],
            schedule: GazeSchedule::none(model.text.num_layers),
            label: "Glance2Gaze",
        }
    }
}

/// How a row's units (tower-sized images) sit in the dense layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Units {
    /// One image cut into `rows x cols` sub-images (raster order), its
    /// tokens laid out as the stitched map in raster order, as the dense
    /// model does; `(1, 1)`: one image.
    Grid(usize, usize),
    /// Video frames, one after another.
    Frames(usize),
}

impl Units {
    pub fn count(&self) -> usize {
        match *self {
            Units::Grid(r, c) => r * c,
            Units::Frames(f) => f,
        }
    }

    /// The place in the row's dense visual tokens of patch `(y, x)` of
    /// unit `u` (units of `side x side` patches).
    pub fn offset(&self, u: usize, (y, x): (usize, usize), side: usize) -> usize {
        match *self {
            Units::Grid(_, cols) => ((u / cols) * side + y) * cols * side + (u % cols) * side + x,
            Units::Frames(_) => u * side * side + y * side + x,
        }
    }
}

/// A batch for Glance2Gaze: row `b` is `[system][its units][questions[b]]`.
#[derive(Debug, Clone)]
pub struct Glance2GazeInput {
    /// `[B * U, 3, s, s]`: row `b`'s units at `b * U..(b + 1) * U`
    /// (sub-images in raster order, or frames).
    pub pixels: Tensor,
    pub units: Units,
    pub system: Vec<u32>,
    pub questions: Vec<Vec<u32>>,
}

impl Glance2GazeInput {
    /// Image questions, each image cut into its grid of `s`-pixel sub-images.
    pub fn from_images(input: &ImageQuestions, s: usize) -> Result<Self> {
        let (b, _, h, w) = input.pixels.dims4()?;
        let (rows, cols) = input.grid;
        if rows == 0 || cols == 0 || h != rows * s || w != cols * s {
            candle_core::bail!("Glance2Gaze: images of {h} x {w} pixels for a {rows} x {cols} grid of {s}-pixel sub-images");
        }
        let crops = (0..b)
            .flat_map(|i| (0..rows).flat_map(move |r| (0..cols).map(move |c| (i, r, c))))
            .map(|(i, r, c)| {
                input
                    .pixels
                    .narrow(0, i, 1)?
                    .narrow(2, r * s, s)?
                    .narrow(3, c * s, s)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Glance2GazeInput {
            pixels: Tensor::cat(&crops, 0)?,
            units: Units::Grid(rows, cols),
            system: input.system.clone(),
            questions: input.questions.clone(),
        })
    }

    /// Video questions: `frames [B, F, 3, s, s]`.
    pub fn video(frames: &Tensor, system: &[u32], questions: &[Vec<u32>]) -> Result<Self> {
        let (b, f, c, h, w) = frames.dims5()?;
        Ok(Glance2GazeInput {
            pixels: frames.reshape((b * f, c, h, w))?,
            units: Units::Frames(f),
            system: system.to_vec(),
            questions: questions.to_vec(),
        })
    }

    pub fn batch(&self) -> usize {
        self.questions.len()
    }
}

/// The learned parts: Glance Fusion's projections and instruction maps,
/// Gaze Compression's pool and projections (none without compression).
#[derive(Debug, Clone)]
pub struct Glance2Gaze {
    glance: GlanceFusion,
    compression: Option<GazeCompression>,
    cfg: Glance2GazeConfig,
    checkpoint: Checkpoint,
}

/// The prefill: the dense layout, each compressed layer's layout, the caches.
#[derive(Debug)]
pub struct Glance2GazePrefill {
    /// The dense layout, which layers before r ran over.
    pub prompt: Prompt,
    /// The layout of each compressed layer `r - 1 + i` (0-based): its
    /// input hidden states (`embeds`), position ids, rows and visual tokens.
    pub compressed: Vec<Prompt>,
    pub cache: KvCache,
    /// The last layer's hidden states `[B, S_L, Dm]` (before the final norm).
    pub hidden: Tensor,
    /// The logits `[B, vocab]` of each row's last position.
    pub first_logits: Tensor,
    /// When recorded (pictures), the first compression's attention over
    /// each row's dense visual tokens (in the dense layout's order), mean
    /// over its queries and heads: `[B, U * N]` f32, each unit's part
    /// summing to 1 ([`GazeCompression::forward_recording`]).
    pub attention: Option<Tensor>,
}

impl Glance2GazePrefill {
    /// The layout the 0-based layer `l` ran over.
    pub fn layout(&self, l: usize) -> &Prompt {
        let first = self.first_compressed();
        match l.checked_sub(first) {
            Some(i) => &self.compressed[i],
            None => &self.prompt,
        }
    }

    fn first_compressed(&self) -> usize {
        self.cache.num_layers() - self.compressed.len()
    }

    /// The cache layouts for decoding: the dense layers in one span, each
    /// compressed layer in its own.
    pub fn spans(&self) -> Vec<CacheSpan> {
        let first = self.first_compressed();
        let dense = CacheSpan {
            layers: 0..first,
            starts: self.prompt.starts.clone(),
        };
        let compressed = self.compressed.iter().enumerate().map(|(i, p)| CacheSpan {
            layers: first + i..first + i + 1,
            starts: p.starts.clone(),
        });
        std::iter::once(dense).chain(compressed).collect()
    }
}

/// Attention FLOPs of one row's prefill (`4 Hq D` per query-key pair, causal).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Glance2GazeFlops {
    /// The decoder's self-attention over each layer's layout.
    pub attention: f64,
    /// Gaze Compression's cross-attention (`p_l` queries over `p_{l-1}`
    /// keys per unit and compressed layer).
    pub compression: f64,
    /// The dense model's self-attention over the dense layout.
    pub dense: f64,
}

impl Glance2GazeFlops {
    pub fn total(&self) -> f64 {
        self.attention + self.compression
    }
}

/// One Glance2Gaze generation and what it did.
#[derive(Debug)]
pub struct Glance2GazeRun {
    pub generation: Generation,
    /// Per row, the dense layout's visual tokens (units x tokens per unit).
    pub visual: Vec<usize>,
    /// Per row, the visual tokens in each layer's input and cache.
    pub visual_per_layer: Vec<Vec<usize>>,
    /// KV entries (valid positions x layers) per row after the prefill.
    pub kv_entries: Vec<usize>,
    pub flops: Vec<Glance2GazeFlops>,
    /// The dense visual tokens' grid `(rows, cols)` where the units are a
    /// grid of sub-images (the stitched map), `None` for video frames.
    pub grid: Option<(usize, usize)>,
    /// Recorded by [`Glance2Gaze::generate_recording`] (empty otherwise,
    /// and without compression): per row, the first compression's
    /// attention over the dense visual tokens, mean over its queries and
    /// heads (each unit's part sums to 1).
    pub attention: Vec<Vec<f32>>,
    /// Likewise, per row and fused ViT layer (ascending), Glance Fusion's
    /// weight of that layer per dense visual token (empty with one fused
    /// layer).
    pub glance_weights: Vec<Vec<Vec<f32>>>,
    pub prefill: Duration,
    pub decode: Duration,
}

impl Glance2GazeRun {
    /// Per row (units a grid of sub-images; none for video), its panels:
    /// the first compression's attention scaled to its largest, and the
    /// weight Glance Fusion gave the deepest of `glance_layers` (as it is,
    /// in [0, 1]); a panel only where the run recorded it.
    pub fn token_maps(&self, glance_layers: &[usize]) -> Vec<TokenMaps> {
        let Some(grid) = self.grid else {
            return Vec::new();
        };
        (0..self.visual.len())
            .map(|b| {
                let mut panels = Vec::new();
                if !self.attention[b].is_empty() {
                    panels.push(Panel::scaled("compression attention", &self.attention[b]));
                }
                if let (Some(w), Some(l)) = (self.glance_weights[b].last(), glance_layers.last()) {
                    panels.push(Panel {
                        title: format!("ViT layer {l} weight"),
                        weight: w.clone(),
                        boxes: Vec::new(),
                    });
                }
                TokenMaps { grid, panels }
            })
            .collect()
    }
}

impl Method for Glance2Gaze {
    type Config = Glance2GazeConfig;
    const NAME: &'static str = "Glance2Gaze";

    fn parts(&self) -> (&Glance2GazeConfig, &Checkpoint) {
        (&self.cfg, &self.checkpoint)
    }

    /// From `vb` at the root of a LLaVA checkpoint (`glance.projectors.{l}.*`,
    /// `glance.instruction.{l}.*`, `gaze_compression.*`), after checking the
    /// fused layers and the schedule against `model`.
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &Glance2GazeConfig) -> Result<Self> {
        let t = &model.text;
        cfg.schedule
            .check(t.num_layers, model.vision.num_patches())?;
        let ((glance, compression), checkpoint) = Checkpoint::record(vb, |vb| {
            let glance = GlanceFusion::new(vb.clone(), model, &cfg.glance_layers)?;
            let compression = cfg
                .schedule
                .pool_size()
                .map(|p| {
                    GazeCompression::new(
                        vb.pp("gaze_compression"),
                        t.hidden_size,
                        t.num_heads,
                        t.head_dim,
                        p,
                    )
                })
                .transpose()?;
            Ok((glance, compression))
        })?;
        Ok(Glance2Gaze {
            glance,
            compression,
            cfg: cfg.clone(),
            checkpoint,
        })
    }

    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        let input = Glance2GazeInput::from_images(input, model.config.vision.image_size)?;
        Ok(self.report(self.generate_recording(model, &input, tokens)?))
    }
}

/// Where each unit's tokens sit at one size `p` per unit: unit-major
/// (unit `u`'s token `i` at `u p + i`) offsets into the dense visual
/// tokens, and the layout order (ascending offsets).
struct UnitLayout {
    /// Per unit-major token, its offset.
    offsets: Vec<usize>,
    /// The unit-major index of the `j`-th token in the layout.
    order: Vec<u32>,
    /// The place in the layout of each unit-major token.
    rank: Vec<u32>,
}

impl UnitLayout {
    fn new(units: Units, side: usize, p: usize) -> Self {
        let offsets: Vec<usize> = (0..units.count())
            .flat_map(|u| (0..p).map(move |i| units.offset(u, query_cell(i, p, side).1, side)))
            .collect();
        let mut order: Vec<u32> = (0..offsets.len() as u32).collect();
        order.sort_by_key(|&i| offsets[i as usize]);
        let mut rank = vec![0u32; order.len()];
        for (j, &i) in order.iter().enumerate() {
            rank[i as usize] = j as u32;
        }
        UnitLayout {
            offsets,
            order,
            rank,
        }
    }

    /// The offsets in layout order.
    fn sorted_offsets(&self) -> Vec<u32> {
        self.order
            .iter()
            .map(|&i| self.offsets[i as usize] as u32)
            .collect()
    }
}

impl Glance2Gaze {
    pub fn glance(&self) -> &GlanceFusion {
        &self.glance
    }

    /// Gaze Compression (`None` without compression).
    pub fn compression(&self) -> Option<&GazeCompression> {
        self.compression.as_ref()
    }

    /// Per row, the instruction Glance Fusion weighs the layers by: its
    /// question, or where the image ends the row its system text (the only
    /// text it has). `None` with one fused layer (no weights to compute).
    pub fn instructions(
        &self,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Option<Vec<Vec<u32>>>> {
        if !self.glance.needs_instruction() {
            return Ok(None);
        }
        questions
            .iter()
            .enumerate()
            .map(|(b, q)| match (q.is_empty(), system.is_empty()) {
                (false, _) => Ok(q.clone()),
                (true, false) => Ok(system.to_vec()),
                (true, true) => candle_core::bail!(
                    "Glance2Gaze: row {b} has no text: Glance Fusion weighs its {} ViT layers by the instruction, and this row gives none (fuse one layer, or give the row text)",
                    self.glance.layers().len()
                ),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The fused visual tokens of every row in the dense layout's order:
    /// `[B, U * N, Dm]`.
    pub fn fuse(&self, model: &LlavaModel, input: &Glance2GazeInput) -> Result<Tensor> {
        Ok(self.fuse_with(model, input, false)?.0)
    }

    /// [`Glance2Gaze::fuse`], and with `weights` Glance Fusion's layer
    /// weights in the same order, `[B, U * N, S]` f32 (none with one fused
    /// layer).
    pub fn fuse_with(
        &self,
        model: &LlavaModel,
        input: &Glance2GazeInput,
        weights: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dec = &model.decoder;
        let (b, units) = (input.batch(), input.units.count());
        if input.pixels.dim(0)? != b * units {
            candle_core::bail!(
                "Glance2Gaze: {} images for {b} rows of {units} units",
                input.pixels.dim(0)?
            );
        }
        let instruction = match self.instructions(&input.system, &input.questions)? {
            None => None,
            Some(rows) => {
                let m = rows.iter().map(Vec::len).max().unwrap_or(0);
                let per_row = rows
                    .iter()
                    .map(|ids| {
                        let e = dec.embed(&Tensor::from_slice(ids, ids.len(), dec.device())?)?;
                        e.pad_with_zeros(0, 0, m - ids.len())
                    })
                    .collect::<Result<Vec<_>>>()?;
                // Every unit of a row shares its instruction.
                let idx: Vec<u32> = (0..b * units).map(|i| (i / units) as u32).collect();
                let idx = Tensor::from_vec(idx, b * units, dec.device())?;
                let embeds = Tensor::stack(&per_row, 0)?.index_select(&idx, 0)?;
                let m_len: Vec<usize> = (0..b * units).map(|i| rows[i / units].len()).collect();
                Some((embeds, m_len))
            }
        };
        let (fused, w) = self.glance.fuse_with(
            model,
            &input.pixels,
            instruction.as_ref().map(|(e, m)| (e, m.as_slice())),
            weights,
        )?;
        let (_, n, dm) = fused.dims3()?;
        let side = model.config.vision.patches_per_side();
        let dense = UnitLayout::new(input.units, side, n);
        let order = Tensor::from_vec(dense.order, units * n, dec.device())?;
        let fused = fused.reshape((b, units * n, dm))?.index_select(&order, 1)?;
        let w = w
            .map(|w| {
                let s = w.dim(2)?;
                w.reshape((b, units * n, s))?.index_select(&order, 1)
            })
            .transpose()?;
        Ok((fused, w))
    }

    /// The prefill over rows `[system][visual b][questions[b]]`, `visual`
    /// the fused tokens in the dense layout's order (`[B, U * N, Dm]`, as
    /// [`Glance2Gaze::fuse`] gives them) of `units` per row: the dense
    /// layers, then each compressed layer over its own layout.
    pub fn prefill(
        &self,
        model: &LlavaModel,
        visual: &Tensor,
        units: Units,
        system: &[u32],
        questions: &[Vec<u32>],
    ) -> Result<Glance2GazePrefill> {
        self.prefill_with(model, visual, units, (system, questions), false)
    }

    /// [`Glance2Gaze::prefill`]; `record`: keeping the first compression's
    /// attention ([`Glance2GazePrefill::attention`]).
    fn prefill_with(
        &self,
        model: &LlavaModel,
        visual: &Tensor,
        units: Units,
        (system, questions): (&[u32], &[Vec<u32>]),
        record: bool,
    ) -> Result<Glance2GazePrefill> {
        let dec = &model.decoder;
        let layers = dec.num_layers();
        let side = model.config.vision.patches_per_side();
        let unit_tokens = side * side;
        let (b, nv, _) = visual.dims3()?;
        if nv != units.count() * unit_tokens {
            candle_core::bail!(
                "Glance2Gaze: {nv} visual tokens per row for {} units of {unit_tokens}",
                units.count()
            );
        }
        let image = |row| Ok(Segment::Image(visual.get(row)?));
        let rows = image_question_rows(b, system, questions, Segment::Text, image)?;
        let prompt = Prompt::build(dec, &rows)?;
        let first = self.cfg.schedule.first_layer().min(layers);
        let mut cache = dec.new_cache();
        let mut hidden = dec.forward_layers(
            &prompt.embeds,
            &prompt.positions,
            Some(&prompt.mask()?),
            0..first,
            &mut cache,
        )?;
        let mut compressed: Vec<Prompt> = Vec::new();
        let mut attention = None;
        let mut before = UnitLayout::new(units, side, unit_tokens);
        for l in first..layers {
            let p = self.cfg.schedule.tokens_at(l, unit_tokens);
            let after = UnitLayout::new(units, side, p);
            let current = compressed.last().unwrap_or(&prompt);
            let step = (&before, &after, record && l == first);
            let (layout, attended) = self.compress(dec, current, &hidden, step, units, side)?;
            attention = attention.or(attended);
            hidden = dec.forward_layers(
                &layout.embeds,
                &layout.positions,
                Some(&layout.mask()?),
                l..l + 1,
                &mut cache,
            )?;
            compressed.push(layout);
            before = after;
        }
        let first_logits = dec.last_logits(&hidden)?;
        Ok(Glance2GazePrefill {
            prompt,
            compressed,
            cache,
            hidden,
            first_logits,
            attention,
        })
    }

    /// The layout of a compressed layer: the units' tokens of `hidden`
    /// (laid out as `current`, `before` per unit) compressed to `after`'s
    /// size and put back between the same text hidden states; with
    /// `record`, the compression's attention over the tokens it read
    /// (mean over queries and heads, `[B, U n]` in `current`'s order).
    fn compress(
        &self,
        dec: &Decoder,
        current: &Prompt,
        hidden: &Tensor,
        (before, after, record): (&UnitLayout, &UnitLayout, bool),
        units: Units,
        side: usize,
    ) -> Result<(Prompt, Option<Tensor>)> {
        let Some(gc) = &self.compression else {
            candle_core::bail!("Glance2Gaze: a compressed layer without Gaze Compression")
        };
        let (b, seq, dm) = hidden.dims3()?;
        let (u, count) = (units.count(), before.order.len());
        let (n, p) = (count / u, after.order.len() / u);
        // Each row's visual tokens (one run of `count` in layout order), unit-major.
        let firsts: Vec<usize> = current.visual.iter().map(|v| v[0]).collect();
        let visual = firsts
            .iter()
            .enumerate()
            .map(|(row, &v0)| hidden.get(row)?.narrow(0, v0, count))
            .collect::<Result<Vec<_>>>()?;
        let rank = Tensor::from_slice(&before.rank, count, hidden.device())?;
        let grouped = Tensor::stack(&visual, 0)?
            .index_select(&rank, 1)?
            .reshape((b * u, n, dm))?;
        let (squeezed, attention) = if record {
            let (squeezed, a) = gc.forward_recording(&grouped, p, side)?;
            // Unit-major back to the layout's order.
            let order = Tensor::from_slice(&before.order, count, hidden.device())?;
            let a = a.reshape((b, count))?.index_select(&order, 1)?;
            (squeezed, Some(a))
        } else {
            (gc.forward(&grouped, p, side)?, None)
        };
        let squeezed = squeezed.reshape((b, u * p, dm))?;
        let order = Tensor::from_slice(&after.order, u * p, hidden.device())?;
        let squeezed = squeezed.index_select(&order, 1)?;
        let offsets = after.sorted_offsets();
        let span = u * side * side;
        let rows = (0..b)
            .map(|row| {
                let (start, v0) = (current.starts[row], firsts[row]);
                let h = hidden.get(row)?;
                let mut segs = Vec::with_capacity(3);
                if v0 > start {
                    segs.push(Segment::Embeds(h.narrow(0, start, v0 - start)?));
                }
                segs.push(Segment::SampledImage {
                    embeds: squeezed.get(row)?,
                    offsets: offsets.clone(),
                    span,
                });
                if v0 + count < seq {
                    segs.push(Segment::Embeds(h.narrow(
                        0,
                        v0 + count,
                        seq - v0 - count,
                    )?));
                }
                Ok(segs)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((Prompt::build(dec, &rows)?, attention))
    }

    /// Glance2Gaze generation of `max_new_tokens` greedy tokens per row.
    pub fn generate(
        &self,
        model: &LlavaModel,
        input: &Glance2GazeInput,
        max_new_tokens: usize,
    ) -> Result<Glance2GazeRun> {
        self.run(model, input, max_new_tokens, false)
    }

    /// [`Glance2Gaze::generate`], keeping what the report's pictures show:
    /// the first compression's attention and Glance Fusion's layer weights
    /// ([`Glance2GazeRun::attention`], [`Glance2GazeRun::glance_weights`]).
    pub fn generate_recording(
        &self,
        model: &LlavaModel,
        input: &Glance2GazeInput,
        max_new_tokens: usize,
    ) -> Result<Glance2GazeRun> {
        self.run(model, input, max_new_tokens, true)
    }

    fn run(
        &self,
        model: &LlavaModel,
        input: &Glance2GazeInput,
        max_new_tokens: usize,
        record: bool,
    ) -> Result<Glance2GazeRun> {
        let dec = &model.decoder;
        let t0 = Instant::now();
        let (visual, weights) = self.fuse_with(model, input, record)?;
        let text = (input.system.as_slice(), input.questions.as_slice());
        let prefilled = self.prefill_with(model, &visual, input.units, text, record)?;
        let prefill = t0.elapsed();
        let rows = |t: Option<&Tensor>| -> Result<Vec<Vec<f32>>> {
            t.map_or(Ok(vec![Vec::new(); input.batch()]), |t| t.to_vec2())
        };
        let attention = rows(prefilled.attention.as_ref())?;
        let glance_weights = match &weights {
            // Per row, per fused layer, per token.
            Some(w) => w.permute((0, 2, 1))?.to_vec3::<f32>()?,
            None => vec![Vec::new(); input.batch()],
        };
        let t1 = Instant::now();
        let spans = prefilled.spans();
        let Glance2GazePrefill {
            prompt,
            compressed,
            mut cache,
            first_logits,
            ..
        } = prefilled;
        let generation = dec.greedy_with(
            &first_logits,
            &prompt.next_positions(),
            &spans,
            &mut cache,
            max_new_tokens,
            &mut DenseAttention,
        )?;
        let decode = t1.elapsed();

        let t = &model.config.text;
        let pair = 4.0 * (t.num_heads * t.head_dim) as f64;
        let causal = |n: usize| (n * (n + 1) / 2) as f64;
        let len = |p: &Prompt, row: usize| p.seq() - p.starts[row];
        let layers = dec.num_layers();
        let first = layers - compressed.len();
        let units = input.units.count();
        let unit_tokens = model.config.vision.num_patches();
        let (mut kv_entries, mut flops, mut visual_per_layer) =
            (Vec::new(), Vec::new(), Vec::new());
        for row in 0..prompt.batch() {
            let dense = len(&prompt, row);
            let mut per_layer = vec![prompt.visual[row].len(); first];
            per_layer.extend(compressed.iter().map(|p| p.visual[row].len()));
            let mut keys = unit_tokens;
            let mut compression = 0.0;
            for l in first..layers {
                let q = self.cfg.schedule.tokens_at(l, unit_tokens);
                compression += pair * (units * q * keys) as f64;
                keys = q;
            }
            kv_entries.push(first * dense + compressed.iter().map(|p| len(p, row)).sum::<usize>());
            flops.push(Glance2GazeFlops {
                attention: pair
                    * (first as f64 * causal(dense)
                        + compressed.iter().map(|p| causal(len(p, row))).sum::<f64>()),
                compression,
                dense: layers as f64 * pair * causal(dense),
            });
            visual_per_layer.push(per_layer);
        }
        let side = model.config.vision.patches_per_side();
        Ok(Glance2GazeRun {
            generation,
            grid: match input.units {
                Units::Grid(r, c) => Some((r * side, c * side)),
                Units::Frames(_) => None,
            },
            attention,
            glance_weights,
            visual: prompt.visual.iter().map(Vec::len).collect(),
            visual_per_layer,
            kv_entries,
            flops,
            prefill,
            decode,
        })
    }

    /// The run in the terms every method shares; each row's detail gives
    /// the schedule, the visual tokens per layer and the attention FLOPs
    /// against the dense model's.
    pub fn report(&self, run: Glance2GazeRun) -> Report {
        let s = &self.cfg.schedule;
        let detail = (0..run.visual.len())
            .map(|b| {
                let f = &run.flops[b];
                format!(
                    "fused ViT layers {:?}, r = {}, P = {:?}: visual tokens per layer {:?}; attention MFLOP {:.2} + compression {:.2} = {:.2} (dense {:.2}, {:.0}%)",
                    self.cfg.glance_layers,
                    s.r,
                    s.tokens,
                    run.visual_per_layer[b],
                    f.attention / 1e6,
                    f.compression / 1e6,
                    f.total() / 1e6,
                    f.dense / 1e6,
                    100.0 * f.total() / f.dense
                )
            })
            .collect();
        let maps = run.token_maps(&self.cfg.glance_layers);
        Report {
            maps,
            kept: run
                .visual_per_layer
                .iter()
                .map(|v| v.last().copied().unwrap_or(0))
                .collect(),
            detail,
            ..Report::new(
                self.cfg.label,
                run.visual,
                run.kv_entries,
                (run.prefill, run.decode),
                run.generation.tokens,
            )
        }
    }
}
