//! A batch after a token reduction inside the decoder (GlimpsePrune's
//! pruning, FocusLLaVA's text-guided sampler): the kept tokens of each row,
//! left-padded to the longest, at their original position ids, and the rest
//! of the prefill over them.
//!
//! The rules every method keeps after a reduction (docs/architecture.md,
//! "Every method in the model"):
//! - decoding continues at the end of each row's dense layout,
//!   [`Prompt::next_positions`], never at a position derived from what was
//!   kept (a pooled or dropped last token would otherwise move it);
//! - no row is left with nothing to attend: a method refuses, before the
//!   model runs, settings that could empty a row; [`Reduced::gather`]
//!   refuses a row emptied anyway (the same alone and in a batch).

use std::ops::Range;

use candle_core::{Result, Tensor};
use foveal::Padding;

use crate::decoder::{attention_mask, Decoder, KvCache};
use crate::ops::{self, KeepPlan};
use crate::prompt::Prompt;

/// The rows after a reduction.
#[derive(Debug, Clone)]
pub struct Reduced {
    /// The kept hidden states `[B, S', Dm]`, left-padded.
    pub hidden: Tensor,
    /// Their position ids `[B, S']` (the prompt's, unchanged).
    pub positions: Tensor,
    /// Per row, its first valid slot ...
    pub starts: Vec<usize>,
    /// ... and its kept tokens (`S' - starts[b]`).
    pub lengths: Vec<usize>,
}

impl Reduced {
    /// `hidden` `[B, S, Dm]` over `prompt`, gathered by `plan` (foveal's row
    /// gather, left padding), with the prompt's position ids. `what` names
    /// the reduction in the error for a row with nothing kept.
    pub fn gather(
        prompt: &Prompt,
        hidden: &Tensor,
        plan: &mut KeepPlan,
        what: &str,
    ) -> Result<Reduced> {
        let s_new = plan.fetch_max_len()?;
        let kept = plan.positions()?;
        let lengths: Vec<usize> = (0..prompt.batch()).map(|b| kept.row(b).len()).collect();
        if let Some(b) = lengths.iter().position(|&n| n == 0) {
            candle_core::bail!(
                "{what}: row {b} has nothing left to attend (every token dropped; a reduction must leave each row a token)"
            );
        }
        let (b, s) = prompt.positions.dims2()?;
        let positions = prompt.positions.reshape((b, s, 1))?;
        Ok(Reduced {
            hidden: ops::gather_rows(hidden, plan, Padding::Left)?,
            positions: ops::gather_rows(&positions, plan, Padding::Left)?.reshape((b, s_new))?,
            starts: lengths.iter().map(|&n| s_new - n).collect(),
            lengths,
        })
    }

    /// Runs `layers` over the kept tokens (causal with left padding),
    /// appending to `cache`; returns the logits `[B, vocab]` of each row's
    /// last kept token.
    pub fn forward(
        &self,
        decoder: &Decoder,
        layers: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let s = self.hidden.dim(1)?;
        let mask = attention_mask(&self.starts, s, s, self.hidden.device())?;
        let h =
            decoder.forward_layers(&self.hidden, &self.positions, Some(&mask), layers, cache)?;
        decoder.last_logits(&h)
    }
}
