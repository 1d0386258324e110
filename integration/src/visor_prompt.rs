//! VISOR's prompts: one dense layout, two streams.
//!
//! Row `b` is laid out as the dense model lays it out, `[system][image b]
//! [question 1][R][question 2][R]...` (`R`: the routing token, present only
//! when the router chooses), left-padded, with the dense model's position
//! ids. VISOR processes it as two streams ([`Streams`]): the visual tokens
//! `V [B, Nv, Dm]` (row `b`'s first `nv[b]` slots valid) and the text
//! stream `T [B, St, Dm]` (every other token in order, left-padded), each
//! token keeping its dense position id. A self-attention layer merges them
//! back into the dense layout ([`Streams::merge`]), runs the standard layer
//! with the dense causal mask, and splits the result ([`Streams::split`]);
//! text-only and cross-attention layers see the text stream alone.
//! Decoding continues at the end of the dense layout (the library's rule).

use candle_core::{Device, Result, Tensor};

use crate::decoder::{attention_mask, Decoder};
use crate::prompt::{Prompt, Segment};

/// Row `b`'s text: a system prompt, then after the image its questions,
/// and after the last question (and its routing token) `answer` tokens, the
/// tokens a generation appended (for a full recompute of a longer prompt).
#[derive(Debug, Clone)]
pub struct VisorText {
    pub system: Vec<u32>,
    pub questions: Vec<Vec<u32>>,
    pub answer: Vec<u32>,
}

/// Where each row's tokens sit in the dense layout and in the two streams,
/// and the index maps between them (see the module docs).
#[derive(Debug, Clone)]
pub struct Streams {
    /// Per row, the dense layout's sequence indices of its text tokens
    /// (ascending) ...
    text: Vec<Vec<usize>>,
    /// ... and of its visual tokens.
    visual: Vec<Vec<usize>>,
    /// Per row, the dense position ids (`S` of them, 0 at padding).
    position_ids: Vec<Vec<u32>>,
    /// The text stream's length `St` and the visual stream's width `Nv`.
    widths: (usize, usize),
    /// Per row, the text-stream slots of its routing tokens.
    pub routes: Vec<Vec<usize>>,
    /// Per row, where decoding continues: the dense layout's end.
    pub next: Vec<u32>,
    /// Per row, the first valid slot of the dense layout ...
    pub dense_starts: Vec<usize>,
    /// ... and of the text stream.
    pub text_starts: Vec<usize>,
    /// `[B, S]` and `[B, St]` u32 position ids.
    pub dense_positions: Tensor,
    pub text_positions: Tensor,
    /// `[B * S]` u32: each dense slot's row of `[T flattened; V flattened;
    /// a zero row]`.
    merge_index: Tensor,
    /// `[B * St]` and `[B * Nv]` u32: each stream slot's row of the dense
    /// layout flattened (padding slots read their row's first slot).
    text_index: Tensor,
    visual_index: Tensor,
}

impl Streams {
    /// The streams of a dense `prompt` whose routing tokens are at
    /// `routes` (text-stream slots per row, counted from the row's first
    /// text token). Refuses a row without text: VISOR predicts from the
    /// text stream, so such a row would have nothing to attend from.
    pub fn new(prompt: &Prompt, routes: &[Vec<usize>]) -> Result<Self> {
        let seq = prompt.seq();
        let text: Vec<Vec<usize>> = (0..prompt.batch())
            .map(|b| {
                (prompt.starts[b]..seq)
                    .filter(|i| prompt.visual[b].binary_search(i).is_err())
                    .collect()
            })
            .collect();
        if let Some(b) = text.iter().position(Vec::is_empty) {
            candle_core::bail!(
                "VISOR: row {b} has no text token (no system prompt, question or routing token): VISOR predicts from the text stream, so the row would have nothing to attend (give it text, or route it)"
            );
        }
        let st = text.iter().map(Vec::len).max().unwrap_or(0);
        let nv = prompt.visual.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let routes = routes
            .iter()
            .zip(&text)
            .map(|(r, t)| r.iter().map(|&i| st - t.len() + i).collect())
            .collect();
        Self::from_parts(
            (st, nv),
            text,
            prompt.visual.clone(),
            prompt.position_ids.clone(),
            routes,
            prompt.next_positions(),
            prompt.embeds.device(),
        )
    }

    /// `(st, nv)`: the text stream's length and the visual stream's width.
    fn from_parts(
        (st, nv): (usize, usize),
        text: Vec<Vec<usize>>,
        visual: Vec<Vec<usize>>,
        position_ids: Vec<Vec<u32>>,
        routes: Vec<Vec<usize>>,
        next: Vec<u32>,
        device: &Device,
    ) -> Result<Self> {
        let b = text.len();
        let seq = position_ids.first().map_or(0, Vec::len);
        let dense_starts: Vec<usize> = (0..b)
            .map(|r| (text[r].len() + visual[r].len()).min(seq))
            .map(|n| seq - n)
            .collect();
        let text_starts: Vec<usize> = text.iter().map(|t| st - t.len()).collect();
        let zero = (b * (st + nv)) as u32;
        let mut merge = vec![zero; b * seq];
        let (mut text_index, mut visual_index) = (vec![0u32; b * st], vec![0u32; b * nv]);
        let mut text_pos = vec![0u32; b * st];
        for r in 0..b {
            let first = (r * seq) as u32;
            text_index[r * st..(r + 1) * st].fill(first);
            visual_index[r * nv..(r + 1) * nv].fill(first);
            for (i, &j) in text[r].iter().enumerate() {
                let slot = r * st + text_starts[r] + i;
                merge[r * seq + j] = slot as u32;
                text_index[slot] = (r * seq + j) as u32;
                text_pos[slot] = position_ids[r][j];
            }
            for (i, &j) in visual[r].iter().enumerate() {
                merge[r * seq + j] = (b * st + r * nv + i) as u32;
                visual_index[r * nv + i] = (r * seq + j) as u32;
            }
        }
        let u32s = |v: Vec<u32>, shape: &[usize]| Tensor::from_vec(v, shape, device);
        Ok(Streams {
            dense_positions: u32s(position_ids.concat(), &[b, seq])?,
            text_positions: u32s(text_pos, &[b, st])?,
            merge_index: u32s(merge, &[b * seq])?,
            text_index: u32s(text_index, &[b * st])?,
            visual_index: u32s(visual_index, &[b * nv])?,
            text,
            visual,
            position_ids,
            widths: (st, nv),
            routes,
            next,
            dense_starts,
            text_starts,
        })
    }

    /// The rows `rows` (in that order) of these streams, their widths and
    /// padding kept (the states selected with them keep theirs).
    pub fn select(&self, rows: &[usize], device: &Device) -> Result<Self> {
        let pick = |v: &[Vec<usize>]| rows.iter().map(|&r| v[r].clone()).collect::<Vec<_>>();
        Self::from_parts(
            (self.text_len(), self.visual_width()),
            pick(&self.text),
            pick(&self.visual),
            rows.iter().map(|&r| self.position_ids[r].clone()).collect(),
            pick(&self.routes),
            rows.iter().map(|&r| self.next[r]).collect(),
            device,
        )
    }

    pub fn batch(&self) -> usize {
        self.text.len()
    }

    /// The dense layout's length `S`.
    pub fn seq(&self) -> usize {
        self.position_ids.first().map_or(0, Vec::len)
    }

    /// The text stream's length `St`.
    pub fn text_len(&self) -> usize {
        self.widths.0
    }

    /// The visual stream's width `Nv` (at least 1).
    pub fn visual_width(&self) -> usize {
        self.widths.1
    }

    /// Per row, its text tokens ...
    pub fn text_counts(&self) -> Vec<usize> {
        self.text.iter().map(Vec::len).collect()
    }

    /// ... and its visual tokens.
    pub fn visual_counts(&self) -> Vec<usize> {
        self.visual.iter().map(Vec::len).collect()
    }

    /// The dense prefill mask `[B, 1, S, S]` (causal, left padding).
    pub fn dense_mask(&self, device: &Device) -> Result<Tensor> {
        attention_mask(&self.dense_starts, self.seq(), self.seq(), device)
    }

    /// The text stream's prefill mask `[B, 1, St, St]` (causal, left padding).
    pub fn text_mask(&self, device: &Device) -> Result<Tensor> {
        let st = self.text_len();
        attention_mask(&self.text_starts, st, st, device)
    }

    /// The dense layout `[B, S, Dm]` of the streams `v [B, Nv, Dm]`, `t
    /// [B, St, Dm]` (padding slots zero).
    pub fn merge(&self, v: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (b, st, dm) = t.dims3()?;
        let nv = v.dim(1)?;
        let zero = Tensor::zeros((1, dm), t.dtype(), t.device())?;
        let rows = Tensor::cat(
            &[&t.reshape((b * st, dm))?, &v.reshape((b * nv, dm))?, &zero],
            0,
        )?;
        rows.index_select(&self.merge_index, 0)?
            .reshape((b, self.seq(), dm))
    }

    /// The streams `(v, t)` of a dense layout `x [B, S, Dm]`.
    pub fn split(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s, dm) = x.dims3()?;
        let rows = x.reshape((b * s, dm))?;
        let v = rows
            .index_select(&self.visual_index, 0)?
            .reshape((b, self.visual_width(), dm))?;
        let t = rows
            .index_select(&self.text_index, 0)?
            .reshape((b, self.text_len(), dm))?;
        Ok((v, t))
    }
}

/// A VISOR prompt: the dense layout and its streams.
#[derive(Debug, Clone)]
pub struct VisorPrompt {
    pub dense: Prompt,
    pub streams: Streams,
}

impl VisorPrompt {
    /// Row `b`: `[system][visual[b]][question][R]...[answer]`, with the
    /// routing token `routing` `[Dm]` after each question when given.
    /// `visual[b]` is `[nv_b, Dm]`.
    pub fn build(
        decoder: &Decoder,
        visual: &[Tensor],
        text: &[VisorText],
        routing: Option<&Tensor>,
    ) -> Result<VisorPrompt> {
        if visual.len() != text.len() {
            candle_core::bail!(
                "VISOR: {} images, {} rows of text",
                visual.len(),
                text.len()
            );
        }
        let mut rows = Vec::with_capacity(text.len());
        let mut routes = Vec::with_capacity(text.len());
        for (v, t) in visual.iter().zip(text) {
            let mut row = vec![Segment::Text(t.system.clone()), Segment::Image(v.clone())];
            let (mut n, mut r) = (t.system.len(), Vec::new());
            for q in &t.questions {
                row.push(Segment::Text(q.clone()));
                n += q.len();
                if let Some(token) = routing {
                    row.push(Segment::Embeds(token.reshape((1, ()))?));
                    r.push(n);
                    n += 1;
                }
            }
            row.push(Segment::Text(t.answer.clone()));
            rows.push(row);
            routes.push(r);
        }
        let dense = Prompt::build(decoder, &rows)?;
        let streams = Streams::new(&dense, &routes)?;
        Ok(VisorPrompt { dense, streams })
    }

    /// The initial streams `(V, T)` of the prompt's embeddings.
    pub fn initial(&self) -> Result<(Tensor, Tensor)> {
        self.streams.split(&self.dense.embeds)
    }
}

/// `[n]` u32 row indices on `device`.
pub(crate) fn row_index(rows: &[usize], device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Tensor::from_vec(idx, rows.len(), device)
}
