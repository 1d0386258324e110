//! Glance2Gaze's Gaze Compression schedules as data (seeds/000, A.3):
//! from decoder layer `r` on (numbered from 1, as the paper does), the
//! input of layer `l` holds `p_l` visual tokens per unit (an image, a
//! sub-image or a video frame), the list `P = [p_r, ..., p_L]`.
//!
//! The paper's schedules load by name ([`paper_schedule`]): Table 7
//! (LLaVA-1.5-7B), Table 8 (LLaVA-NeXT-7B, per sub-image) and the video
//! setting (Video-LLaVA, per frame: r = 3, p_r = 10, A.3.2; the seed gives
//! no list, so it decays like the tables, see [`GazeSchedule::geometric`]).
//! [`PaperSchedule::scaled_to`] gives a model of other depth and tokens
//! per unit (the built-in tiny one) a schedule of the same shape. Any `(r,
//! P)` is accepted whose length matches the depth and that never grows
//! ([`GazeSchedule::check`]).

use candle_core::{bail, Result};

/// A compression schedule: the paper's `r` and `P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GazeSchedule {
    /// The first decoder layer whose input is compressed, numbered from 1
    /// (the paper's r); `num_layers + 1` compresses nothing.
    pub r: usize,
    /// `p_l` for the layers `r..=num_layers`: visual tokens per unit in
    /// the input of each of them (the paper's P; `P[0] = p_r` is also the
    /// size of the query pool).
    pub tokens: Vec<usize>,
}

impl GazeSchedule {
    pub fn new(r: usize, tokens: Vec<usize>) -> Self {
        GazeSchedule { r, tokens }
    }

    /// No compression in a decoder of `num_layers` layers (r past the last).
    pub fn none(num_layers: usize) -> Self {
        GazeSchedule {
            r: num_layers + 1,
            tokens: Vec::new(),
        }
    }

    /// From layer `r` of `num_layers`, `p_r` tokens decaying geometrically
    /// to `end` at the last layer: `p_l = round(p_r (end / p_r)^(i / (n -
    /// 1)))` for the `n = num_layers - r + 1` layers, `i = l - r`. The
    /// paper's tables have this shape (each step keeps about the same
    /// fraction, 0.82 of the 33% schedule, 0.85, 0.87 and 0.92 of the
    /// others, and every list ends at 2).
    pub fn geometric(r: usize, p_r: usize, end: usize, num_layers: usize) -> Self {
        let n = (num_layers + 1).saturating_sub(r);
        let (p, end) = (p_r as f64, end.min(p_r) as f64);
        let tokens = (0..n)
            .map(|i| match n {
                1 => p_r,
                _ => (p * (end / p).powf(i as f64 / (n - 1) as f64)).round() as usize,
            })
            .collect();
        GazeSchedule { r, tokens }
    }

    /// The 0-based index of the first compressed layer (`r - 1`).
    pub fn first_layer(&self) -> usize {
        self.r.saturating_sub(1)
    }

    /// Whether any layer is compressed.
    pub fn compresses(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The query pool's size, `p_r` (`None` without compression).
    pub fn pool_size(&self) -> Option<usize> {
        self.tokens.first().copied()
    }

    /// Visual tokens per unit in the input of the 0-based layer `l`, for
    /// units of `unit_tokens` tokens.
    pub fn tokens_at(&self, l: usize, unit_tokens: usize) -> usize {
        match l.checked_sub(self.first_layer()) {
            Some(i) if self.compresses() => self.tokens[i],
            _ => unit_tokens,
        }
    }

    /// Checks the schedule against a decoder of `num_layers` layers and
    /// units of `unit_tokens` visual tokens: `1 <= r <= num_layers + 1`,
    /// one `p_l` per layer `r..=num_layers`, every `p_l >= 1` (a row keeps
    /// a visual token: no row is ever left with nothing to attend), `p_r`
    /// at most the unit's tokens, and `P` never growing.
    pub fn check(&self, num_layers: usize, unit_tokens: usize) -> Result<()> {
        let GazeSchedule { r, tokens } = self;
        if *r == 0 || *r > num_layers + 1 {
            bail!(
                "GazeSchedule: r = {r} is outside 1..={} (layers are numbered from 1; {} compresses nothing)",
                num_layers + 1,
                num_layers + 1
            );
        }
        let want = num_layers + 1 - r;
        if tokens.len() != want {
            bail!(
                "GazeSchedule: P has {} entries, the layers r = {r}..={num_layers} of this decoder need {want}",
                tokens.len()
            );
        }
        if let Some(i) = tokens.iter().position(|&p| p == 0) {
            bail!(
                "GazeSchedule: p_{} = 0 would leave a unit no visual token (a row of only its image nothing to attend); every p_l must be at least 1",
                r + i
            );
        }
        if let Some(&p_r) = tokens.first() {
            if p_r > unit_tokens {
                bail!(
                    "GazeSchedule: p_r = {p_r} exceeds the {unit_tokens} visual tokens of a unit (compression never adds tokens)"
                );
            }
        }
        if let Some(i) = tokens.windows(2).position(|w| w[1] > w[0]) {
            bail!(
                "GazeSchedule: P grows from p_{} = {} to p_{} = {} (a layer can only compress what the previous one kept)",
                r + i,
                tokens[i],
                r + i + 1,
                tokens[i + 1]
            );
        }
        Ok(())
    }
}

/// How a paper schedule gives its `P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaperTokens {
    /// Listed in the seed (Tables 7 and 8).
    Listed(&'static [usize]),
    /// Only `p_r` given (the video setting): [`GazeSchedule::geometric`]
    /// down to 2, as every listed schedule ends.
    Decay { p_r: usize },
}

/// A schedule of the paper, for the model it was given for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaperSchedule {
    /// The model and the FLOPs against dense, as the paper names them ...
    pub name: &'static str,
    /// ... and in a report's method column.
    pub label: &'static str,
    /// That model's decoder layers ...
    pub num_layers: usize,
    /// ... and visual tokens per unit (576 per image or sub-image at 336px,
    /// 256 per Video-LLaVA frame).
    pub unit_tokens: usize,
    pub r: usize,
    pub tokens: PaperTokens,
}

/// The last `p_l` of every listed schedule.
const PAPER_END: usize = 2;

const T7_33: &[usize] = &[
    256, 209, 170, 139, 114, 93, 76, 62, 50, 41, 33, 27, 22, 18, 15, 12, 10, 8, 6, 5, 4, 3, 2, 2,
];
const T7_22: &[usize] = &[
    121, 103, 88, 75, 64, 54, 46, 40, 34, 29, 24, 21, 18, 15, 13, 11, 9, 8, 7, 6, 5, 4, 3, 3, 2, 2,
];
const T7_11: &[usize] = &[
    100, 87, 77, 67, 59, 52, 45, 40, 35, 30, 27, 23, 20, 18, 16, 14, 12, 10, 9, 8, 7, 6, 5, 4, 4,
    3, 3, 2, 2, 2,
];
const T8_5: &[usize] = &[
    25, 23, 21, 19, 18, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 7, 6, 6, 5, 5, 4, 4, 4, 3, 3, 3, 3, 2,
    2, 2, 2,
];

/// Every schedule of the seed: Table 7 (LLaVA-1.5-7B), Table 8
/// (LLaVA-NeXT-7B, per sub-image; its 22% and 11% lists are Table 7's) and
/// the video setting (Video-LLaVA, per frame, A.3.2).
pub const PAPER_SCHEDULES: [PaperSchedule; 7] = [
    paper(
        ("LLaVA-1.5-7B 33%", "G2G 33%"),
        576,
        9,
        PaperTokens::Listed(T7_33),
    ),
    paper(
        ("LLaVA-1.5-7B 22%", "G2G 22%"),
        576,
        7,
        PaperTokens::Listed(T7_22),
    ),
    paper(
        ("LLaVA-1.5-7B 11%", "G2G 11%"),
        576,
        3,
        PaperTokens::Listed(T7_11),
    ),
    paper(
        ("LLaVA-NeXT-7B 22%", "G2G-NeXT 22%"),
        576,
        7,
        PaperTokens::Listed(T7_22),
    ),
    paper(
        ("LLaVA-NeXT-7B 11%", "G2G-NeXT 11%"),
        576,
        3,
        PaperTokens::Listed(T7_11),
    ),
    paper(
        ("LLaVA-NeXT-7B 5%", "G2G-NeXT 5%"),
        576,
        2,
        PaperTokens::Listed(T8_5),
    ),
    paper(
        ("Video-LLaVA 6%", "G2G video 6%"),
        256,
        3,
        PaperTokens::Decay { p_r: 10 },
    ),
];

/// A schedule of a 32-layer 7B model (Vicuna-7B, every model of the seed).
const fn paper(
    (name, label): (&'static str, &'static str),
    unit_tokens: usize,
    r: usize,
    tokens: PaperTokens,
) -> PaperSchedule {
    PaperSchedule {
        name,
        label,
        num_layers: 32,
        unit_tokens,
        r,
        tokens,
    }
}

/// The paper's schedule called `name` (case-insensitive, e.g.
/// `"LLaVA-1.5-7B 33%"`), or an error listing the names.
pub fn paper_schedule(name: &str) -> Result<&'static PaperSchedule> {
    PAPER_SCHEDULES
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name.trim()))
        .ok_or_else(|| {
            let names: Vec<&str> = PAPER_SCHEDULES.iter().map(|s| s.name).collect();
            candle_core::Error::Msg(format!(
                "no Glance2Gaze schedule named {name:?}; the seed's are {names:?}"
            ))
        })
}

impl PaperSchedule {
    /// The schedule as the paper gives it, for its own model.
    pub fn schedule(&self) -> GazeSchedule {
        match self.tokens {
            PaperTokens::Listed(p) => GazeSchedule::new(self.r, p.to_vec()),
            PaperTokens::Decay { p_r } => {
                GazeSchedule::geometric(self.r, p_r, PAPER_END, self.num_layers)
            }
        }
    }

    /// The same shape for a decoder of `num_layers` layers and units of
    /// `unit_tokens` tokens: the paper's `r - 1` dense layers scaled by
    /// depth and rounded down (`floor((r - 1) L' / L)`), `p_r` scaled by
    /// tokens per unit (rounded, 1 to `unit_tokens`), and the geometric
    /// decay of the tables down to 2 at the last layer. For the tiny model
    /// (6 layers, 64 tokens) Table 7 gives 31%, 25% and 9% of the dense
    /// visual token-layers for its 33%, 22% and 11% schedules.
    pub fn scaled_to(&self, num_layers: usize, unit_tokens: usize) -> GazeSchedule {
        let p_r = match self.tokens {
            PaperTokens::Listed(p) => p[0],
            PaperTokens::Decay { p_r } => p_r,
        };
        let dense = (self.r - 1) * num_layers / self.num_layers;
        let p = ((p_r * unit_tokens) as f64 / self.unit_tokens as f64).round() as usize;
        GazeSchedule::geometric(
            dense + 1,
            p.clamp(1, unit_tokens.max(1)),
            PAPER_END,
            num_layers,
        )
    }
}
