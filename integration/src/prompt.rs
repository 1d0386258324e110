//! Prompts as input embeddings: per row a list of segments (text tokens,
//! an image's visual embeddings, any other embeddings such as a learned
//! glimpse token), laid out left-padded into one batch, with the position ids,
//! the sequence indices of the visual tokens and the valid range of each row
//! (what foveal's `RowLayout` describes), and where each row's decoding
//! continues: the end of its dense layout, whatever a method later keeps.

use candle_core::{DType, Result, Tensor};
use foveal::{RowLayout, RowSpec};

use crate::decoder::{attention_mask, Decoder};

/// A piece of a prompt row.
#[derive(Debug, Clone)]
pub enum Segment {
    /// Text token ids.
    Text(Vec<u32>),
    /// An image's visual embeddings `[N, Dm]`; their positions are listed in
    /// [`Prompt::visual`].
    Image(Tensor),
    /// Other embeddings `[n, Dm]` (not visual), e.g. Gaze Attention's
    /// context tokens.
    Embeds(Tensor),
    /// Embeddings `[n, Dm]` a method appends after a row to read something
    /// and drops before decoding (GlimpsePrune's glimpse token). They take
    /// the position ids from the row's end on, but the row's end, where
    /// decoding continues, stays before them. Only at the end of a row.
    Transient(Tensor),
    /// Visual embeddings `[N, Dm]` sampled from a feature map of `span`
    /// cells (FocusLLaVA's vision-guided sampler): token `i` gets the position
    /// id `base + offsets[i]` (its source cell), where `base` is the segment's
    /// first position id, and the segment takes `span` position ids (the next
    /// segment starts at `base + span`). With every cell kept, in order, it
    /// is [`Segment::Image`] of the whole map.
    SampledImage {
        embeds: Tensor,
        offsets: Vec<u32>,
        span: usize,
    },
}

/// A left-padded batch of prompts. Row `b` is valid at sequence indices
/// `starts[b]..seq`; its position ids count from 0 at `starts[b]`, one per
/// token except inside a [`Segment::SampledImage`] (padding slots get 0, hold
/// zero embeddings and are masked). Decoding continues at
/// [`Prompt::next_positions`].
#[derive(Debug, Clone)]
pub struct Prompt {
    /// `[B, S, Dm]`, the decoder's dtype.
    pub embeds: Tensor,
    /// `[B, S]` u32.
    pub positions: Tensor,
    /// The same position ids on the host, per row.
    pub position_ids: Vec<Vec<u32>>,
    /// Per row, the first valid sequence index.
    pub starts: Vec<usize>,
    /// Per row, the sequence indices of the visual tokens (ascending).
    pub visual: Vec<Vec<usize>>,
    /// Per row, the position id after its dense layout.
    ends: Vec<u32>,
}

impl Prompt {
    /// Lays out `rows` (each non-empty) left-padded to the longest.
    pub fn build(decoder: &Decoder, rows: &[Vec<Segment>]) -> Result<Prompt> {
        if rows.is_empty() {
            candle_core::bail!("Prompt::build: no rows");
        }
        let (dev, dtype, dm) = (
            decoder.device(),
            decoder.dtype(),
            decoder.config().hidden_size,
        );
        let (mut parts, mut ends) = (Vec::with_capacity(rows.len()), Vec::new());
        for (b, row) in rows.iter().enumerate() {
            let (mut pieces, mut visual, mut ids, mut len, mut next) =
                (Vec::new(), Vec::new(), Vec::<u32>::new(), 0usize, 0u32);
            // The dense layout's end: where the first transient segment starts.
            let mut end = None;
            for seg in row {
                match (seg, end) {
                    (Segment::Transient(_), None) => end = Some(next),
                    (Segment::Transient(_), Some(_)) => {}
                    (Segment::Text(t), Some(_)) if t.is_empty() => {}
                    (_, Some(_)) => candle_core::bail!(
                        "Prompt::build: row {b}: a transient segment must end its row"
                    ),
                    _ => {}
                }
                let t = match seg {
                    Segment::Text(ids) if ids.is_empty() => continue,
                    Segment::Text(ids) => {
                        decoder.embed(&Tensor::from_slice(ids, ids.len(), dev)?)?
                    }
                    Segment::Image(e)
                    | Segment::Embeds(e)
                    | Segment::Transient(e)
                    | Segment::SampledImage { embeds: e, .. } => {
                        let (n, d) = e.dims2()?;
                        if d != dm {
                            candle_core::bail!("Prompt::build: row {b}: embeddings of width {d}, the decoder's is {dm}");
                        }
                        if matches!(seg, Segment::Image(_) | Segment::SampledImage { .. }) {
                            visual.extend(len..len + n);
                        }
                        e.to_dtype(dtype)?
                    }
                };
                let n = t.dim(0)?;
                if let Segment::SampledImage { offsets, span, .. } = seg {
                    if offsets.len() != n || offsets.iter().any(|&o| o as usize >= *span) {
                        candle_core::bail!("Prompt::build: row {b}: {n} sampled tokens need {n} offsets below the span {span}");
                    }
                    ids.extend(offsets.iter().map(|&o| next + o));
                    next += *span as u32;
                } else {
                    ids.extend(next..next + n as u32);
                    next += n as u32;
                }
                len += n;
                pieces.push(t);
            }
            if len == 0 {
                candle_core::bail!("Prompt::build: row {b} is empty");
            }
            parts.push((Tensor::cat(&pieces, 0)?, visual, ids, len));
            ends.push(end.unwrap_or(next));
        }
        let seq = parts.iter().map(|p| p.3).max().unwrap_or(0);
        let (mut embeds, mut position_ids, mut starts, mut vis) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (e, visual, ids, len) in parts {
            let start = seq - len;
            let e = if start > 0 {
                Tensor::cat(&[&Tensor::zeros((start, dm), dtype, dev)?, &e], 0)?
            } else {
                e
            };
            embeds.push(e);
            position_ids.push(
                std::iter::repeat_n(0, start)
                    .chain(ids)
                    .collect::<Vec<u32>>(),
            );
            vis.push(visual.into_iter().map(|v| v + start).collect());
            starts.push(start);
        }
        let flat: Vec<u32> = position_ids.concat();
        Ok(Prompt {
            embeds: Tensor::stack(&embeds, 0)?,
            positions: Tensor::from_vec(flat, (starts.len(), seq), dev)?,
            position_ids,
            starts,
            visual: vis,
            ends,
        })
    }

    pub fn batch(&self) -> usize {
        self.starts.len()
    }

    /// Sequence length `S` (the longest row).
    pub fn seq(&self) -> usize {
        self.position_ids.first().map_or(0, |p| p.len())
    }

    /// The causal + left-padding additive mask `[B, 1, S, S]` (f32) of a prefill.
    pub fn mask(&self) -> Result<Tensor> {
        attention_mask(&self.starts, self.seq(), self.seq(), self.embeds.device())
    }

    /// Per row, where decoding continues: the position id after the row's
    /// dense layout (a [`Segment::SampledImage`] counts its whole span,
    /// [`Segment::Transient`] segments do not count). Every method decodes
    /// from here whatever it kept: the next position is never derived from
    /// the kept tokens.
    pub fn next_positions(&self) -> Vec<u32> {
        self.ends.clone()
    }

    /// The rows as foveal describes them: valid `start..S`, visual positions.
    pub fn row_specs(&self) -> Vec<RowSpec> {
        self.starts
            .iter()
            .zip(&self.visual)
            .map(|(&start, v)| RowSpec {
                start,
                end: self.seq(),
                visual: v.clone(),
            })
            .collect()
    }

    /// foveal's checked [`RowLayout`] of the rows (cache capacity `S`).
    pub fn row_layout(&self) -> foveal::Result<RowLayout> {
        RowLayout::new(self.seq(), &self.row_specs())
    }

    /// This prompt with `tokens[b]` appended to row `b` (every row the same
    /// count), positions continuing from [`Prompt::next_positions`] (after a
    /// transient segment, the tokens follow it in the sequence and take its
    /// position ids, as decoding after dropping it does).
    pub fn append_tokens(&self, decoder: &Decoder, tokens: &[Vec<u32>]) -> Result<Prompt> {
        let b = self.batch();
        let n = tokens.first().map_or(0, |t| t.len());
        if tokens.len() != b || tokens.iter().any(|t| t.len() != n) {
            candle_core::bail!("Prompt::append_tokens: need {b} rows of equal length");
        }
        if n == 0 {
            return Ok(self.clone());
        }
        let ids = Tensor::from_vec(tokens.concat(), (b, n), self.embeds.device())?;
        let embeds = Tensor::cat(
            &[
                &self.embeds,
                &decoder.embed(&ids)?.to_dtype(self.embeds.dtype())?,
            ],
            1,
        )?;
        let position_ids: Vec<Vec<u32>> = self
            .position_ids
            .iter()
            .zip(&self.ends)
            .map(|(p, &q)| p.iter().copied().chain(q..q + n as u32).collect())
            .collect();
        let positions = Tensor::from_vec(
            position_ids.concat(),
            (b, self.seq() + n),
            self.embeds.device(),
        )?;
        Ok(Prompt {
            embeds,
            positions,
            position_ids,
            starts: self.starts.clone(),
            visual: self.visual.clone(),
            ends: self.ends.iter().map(|&e| e + n as u32).collect(),
        })
    }

    /// The position ids as `[B, S]` of `dtype` (e.g. I64 as HF uses, I32 for foveal's `gather_rows`).
    pub fn positions_as(&self, dtype: DType) -> Result<Tensor> {
        self.positions.to_dtype(dtype)
    }
}

/// The rows `[system][image b][questions[b]]` of a batch of `images` image
/// questions, in any segment type: `text` wraps token ids, `image(b)` makes
/// row `b`'s image segment. One question per image, or an error.
pub fn image_question_rows<S>(
    images: usize,
    system: &[u32],
    questions: &[Vec<u32>],
    text: impl Fn(Vec<u32>) -> S,
    image: impl Fn(usize) -> Result<S>,
) -> Result<Vec<Vec<S>>> {
    if questions.len() != images {
        candle_core::bail!("{images} images, {} questions", questions.len());
    }
    questions
        .iter()
        .enumerate()
        .map(|(b, q)| Ok(vec![text(system.to_vec()), image(b)?, text(q.clone())]))
        .collect()
}

/// A stand-in tokenizer: the bytes of `text` as token ids (0..256; the
/// built-in vocabulary has 512).
pub fn byte_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}
