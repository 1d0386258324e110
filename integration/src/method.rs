//! One shape for every token-reduction method on the LLaVA model.
//!
//! - [`Method`]: how a method is built, seeded, saved and loaded, and one
//!   generation over a batch of image questions ([`ImageQuestions`]) with
//!   what it did per row ([`Report`]). A method writes one constructor,
//!   [`Method::new`], which checks its settings against the model and
//!   fetches its learned parts from a [`VarBuilder`] through
//!   [`Checkpoint::record`] (names given once, at the fetch); the seeded
//!   initialisation, safetensors and PyTorch loading and safetensors saving
//!   come with the trait.
//! - [`ImageMethod`]: every [`Method`] as a trait object, so that the main
//!   job holds the methods, the dense baseline [`Dense`] first, in one list.
//!
//! The rules every method keeps after a reduction ([`crate::reduce`];
//! docs/architecture.md, "Every method in the model"): decoding continues at
//! the end of each row's dense layout
//! ([`Prompt::next_positions`](crate::prompt::Prompt::next_positions)), and
//! no row is ever left with nothing to attend.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{self, Checkpoint, Named};
use crate::config::ModelConfig;
use crate::model::LlavaModel;
use crate::vision_sampler::encode_grid;

/// A token-reduction method: its settings, its learned parameters, and one
/// generation over a batch of image questions.
pub trait Method: Sized {
    /// The method's settings.
    type Config: Clone + std::fmt::Debug;
    /// The name reports use.
    const NAME: &'static str;
    /// Whether it takes images cut into sub-images (`grid` other than `(1, 1)`).
    const TAKES_GRIDS: bool = true;

    /// The learned parts from `vb` (at the root of a checkpoint: the names
    /// are the method's own), after checking `cfg` against `model`; what it
    /// fetches is recorded ([`Checkpoint::record`]) for saving.
    fn new(vb: VarBuilder, model: &ModelConfig, cfg: &Self::Config) -> Result<Self>;

    /// Its settings and the parameters [`Method::new`] fetched.
    fn parts(&self) -> (&Self::Config, &Checkpoint);

    /// Generates `tokens` greedy tokens per row of `input`; reports what
    /// the method did.
    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report>;

    fn config(&self) -> &Self::Config {
        self.parts().0
    }

    /// A deterministic random initialisation ([`checkpoint::seeded`]).
    fn seeded(
        model: &ModelConfig,
        cfg: &Self::Config,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::new(checkpoint::seeded(seed, dtype, device), model, cfg)
    }

    /// Loads the method's parameters from a safetensors file (tensors it
    /// does not use are ignored), converting to `dtype`.
    fn load_safetensors(
        path: impl AsRef<Path>,
        model: &ModelConfig,
        cfg: &Self::Config,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::new(checkpoint::load(path, dtype, device)?, model, cfg)
    }

    /// Loads the method's parameters from a PyTorch checkpoint (`torch.save`;
    /// nested state dicts flattened with dots, [`checkpoint::load_pth`]),
    /// converting to `dtype`.
    fn load_pth(
        path: impl AsRef<Path>,
        model: &ModelConfig,
        cfg: &Self::Config,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::new(checkpoint::load_pth(path, dtype, device)?, model, cfg)
    }

    /// Every learned parameter with its name.
    fn named_tensors(&self) -> Named {
        self.parts().1.named().clone()
    }

    /// Writes every learned parameter to a safetensors file.
    fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        self.parts().1.save(path)
    }
}

/// A batch of image questions: row `b` is `[system][image b][questions[b]]`
/// (an empty question leaves the image last). Each image is a `grid` of
/// `rows x cols` tower-sized sub-images (`(1, 1)`: one image of the tower's
/// size), stitched into one map where a method takes sub-images.
#[derive(Debug, Clone)]
pub struct ImageQuestions {
    /// `[B, 3, rows * s, cols * s]`, `s` the tower's image size.
    pub pixels: Tensor,
    pub grid: (usize, usize),
    pub system: Vec<u32>,
    pub questions: Vec<Vec<u32>>,
}

/// What one generation did, per row, in the terms every method shares.
#[derive(Debug, Clone)]
pub struct Report {
    pub method: &'static str,
    /// Visual tokens in (the image's, or the stitched map's).
    pub visual: Vec<usize>,
    /// Tokens after a sampler in the vision path (FocusLLaVA's), if any.
    pub sampled: Option<Vec<usize>>,
    /// Visual tokens the decoder keeps after every reduction.
    pub kept: Vec<usize>,
    /// KV entries (positions x layers) after the prefill.
    pub kv_entries: Vec<usize>,
    /// Vision encoding and prefill, to the first token's logits.
    pub prefill: Duration,
    pub decode: Duration,
    pub tokens: Vec<Vec<u32>>,
    /// Per row, what else the method reports (none: empty).
    pub detail: Vec<String>,
    /// Per row, what the method kept or attended over the image's visual
    /// tokens, for pictures ([`crate::pictures`]); empty where it records
    /// none (the dense baseline keeps everything).
    pub maps: Vec<TokenMaps>,
}

/// What a method kept or attended in one row's image: panels over the
/// grid of its visual tokens, drawn over the image by [`crate::pictures`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenMaps {
    /// The visual-token grid `(rows, cols)` the panels cover: the tower's
    /// patch grid, or the stitched map of a grid of sub-images.
    pub grid: (usize, usize),
    pub panels: Vec<Panel>,
}

/// One picture of a [`TokenMaps`]: a weight per grid cell and outlined
/// rectangles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Panel {
    /// What it shows ("kept", "scale", "layer 3", ...).
    pub title: String,
    /// Per grid cell (row-major, `rows * cols`), in `[0, 1]`: 1 drawn as
    /// the image is, 0 dimmed (kept 1, dropped 0; attention scaled to its
    /// largest cell).
    pub weight: Vec<f32>,
    /// Rectangles to outline, in grid cells: `[y0, x0, y1, x1)`.
    pub boxes: Vec<[usize; 4]>,
}

impl Panel {
    /// 1 on the `kept` cells of a grid of `cells`, 0 elsewhere.
    pub fn kept(title: impl Into<String>, cells: usize, kept: &[usize]) -> Panel {
        let mut weight = vec![0.0; cells];
        for &i in kept.iter().filter(|&&i| i < cells) {
            weight[i] = 1.0;
        }
        Panel {
            title: title.into(),
            weight,
            boxes: Vec::new(),
        }
    }

    /// `values` scaled so that the largest is 1 (all 0 when none is positive).
    pub fn scaled(title: impl Into<String>, values: &[f32]) -> Panel {
        let max = values.iter().copied().fold(0.0f32, f32::max);
        Panel {
            title: title.into(),
            weight: values
                .iter()
                .map(|&v| {
                    if max > 0.0 {
                        (v / max).clamp(0.0, 1.0)
                    } else {
                        0.0
                    }
                })
                .collect(),
            boxes: Vec::new(),
        }
    }
}

impl Report {
    /// The report of a generation that kept every visual token in `visual`
    /// (refine with struct update syntax).
    pub fn new(
        method: &'static str,
        visual: Vec<usize>,
        kv_entries: Vec<usize>,
        times: (Duration, Duration),
        tokens: Vec<Vec<u32>>,
    ) -> Report {
        Report {
            method,
            kept: visual.clone(),
            visual,
            sampled: None,
            kv_entries,
            prefill: times.0,
            decode: times.1,
            tokens,
            detail: Vec::new(),
            maps: Vec::new(),
        }
    }
}

/// Any [`Method`], as callers that compare methods hold them (`dyn`).
pub trait ImageMethod {
    /// [`Method::NAME`].
    fn name(&self) -> &'static str;
    /// [`Method::TAKES_GRIDS`].
    fn takes_grids(&self) -> bool;
    /// [`Method::answer`], refusing a grid where the method takes none.
    fn run(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report>;
}

impl<M: Method> ImageMethod for M {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn takes_grids(&self) -> bool {
        M::TAKES_GRIDS
    }

    fn run(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        if !M::TAKES_GRIDS && input.grid != (1, 1) {
            candle_core::bail!(
                "{}: images of one tile, not a {:?} grid",
                M::NAME,
                input.grid
            );
        }
        self.answer(model, input, tokens)
    }
}

/// The dense baseline: every visual token (of the stitched map, for a grid)
/// in every layer; no learned parts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dense;

/// The empty checkpoint of [`Dense`].
static NOTHING: Checkpoint = Checkpoint::empty();

impl Method for Dense {
    type Config = ();
    const NAME: &'static str = "dense";

    fn new(_vb: VarBuilder, _model: &ModelConfig, _cfg: &()) -> Result<Self> {
        Ok(Dense)
    }

    fn parts(&self) -> (&(), &Checkpoint) {
        (&(), &NOTHING)
    }

    fn answer(&self, model: &LlavaModel, input: &ImageQuestions, tokens: usize) -> Result<Report> {
        let dec = &model.decoder;
        let t0 = Instant::now();
        let (map, _) = encode_grid(model, &input.pixels, input.grid)?;
        let (b, h, w, c) = map.dims4()?;
        let prompt = model.build_prompt_from_embeds(
            &map.reshape((b, h * w, c))?,
            &input.system,
            &input.questions,
        )?;
        let (hidden, mut cache) = model.prefill(&prompt)?;
        let first = dec.last_logits(&hidden)?;
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        let generation = dec.greedy(
            &first,
            &prompt.next_positions(),
            &prompt.starts,
            &mut cache,
            tokens,
        )?;
        let kv_entries = prompt
            .starts
            .iter()
            .map(|s| (prompt.seq() - s) * dec.num_layers());
        Ok(Report::new(
            Self::NAME,
            vec![h * w; b],
            kv_entries.collect(),
            (prefill, t1.elapsed()),
            generation.tokens,
        ))
    }
}
