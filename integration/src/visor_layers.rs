//! VISOR's layers over the two streams (seeds/002 Eq. 3): the
//! cross-attention block, the router, and one group of rows run through
//! the decoder under one configuration, at prefill and decode.
//!
//! - Self-attention layers (`LayerKind::SelfAttention`): the decoder's own
//!   layer over the dense layout `[V; T]` (merged from the streams), with
//!   the dense causal mask and position ids; the result is split back, so
//!   the visual tokens are updated. Its cache is the dense layout's.
//! - Cross-attention layers: `T + o_proj(CrossAttn(q_proj(norm_q(T)),
//!   k_proj(norm_kv(V)), v_proj(norm_kv(V))))` (foveal cross_attention, the
//!   decoder's head layout, no mask, no rotary embedding), then the layer
//!   over the text stream alone. The visual K/V are computed once, at
//!   prefill, and kept for every decode step.
//! - Text layers: the decoder's layer over the text stream alone, with its
//!   own cache.

use std::ops::Range;

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, linear_no_bias, rms_norm, Linear, RmsNorm, VarBuilder};
use foveal::cross_attention::SeqLens;

use crate::config::TextConfig;
use crate::decoder::{attention_mask, Decoder, KvCache};
use crate::ops::{self, AttendLens};
use crate::visor_config::LayerKind;
use crate::visor_prompt::Streams;

/// The cross-attention block of a layer in `L_CA` (HF names under the
/// layer: `cross_attn.{q,k,v,o}_proj`, `cross_attn_layernorm` for the text
/// queries, `cross_attn_kv_layernorm` for the visual keys and values).
#[derive(Debug, Clone)]
pub(crate) struct CrossBlock {
    norm_q: RmsNorm,
    norm_kv: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    hq: usize,
    hkv: usize,
    d: usize,
}

impl CrossBlock {
    /// From `vb` at the layer (`language_model.model.layers.{l}`).
    pub(crate) fn new(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, d, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (hq, hkv) = (cfg.num_heads, cfg.num_kv_heads);
        let a = vb.pp("cross_attn");
        Ok(CrossBlock {
            norm_q: rms_norm(h, eps, vb.pp("cross_attn_layernorm"))?,
            norm_kv: rms_norm(h, eps, vb.pp("cross_attn_kv_layernorm"))?,
            q_proj: linear(h, hq * d, a.pp("q_proj"))?,
            k_proj: linear(h, hkv * d, a.pp("k_proj"))?,
            v_proj: linear(h, hkv * d, a.pp("v_proj"))?,
            o_proj: linear_no_bias(hq * d, h, a.pp("o_proj"))?,
            hq,
            hkv,
            d,
        })
    }

    /// The keys and values `[B, Nv, Hkv, D]` of the visual tokens `v [B, Nv, Dm]`.
    pub(crate) fn visual_kv(&self, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = self.norm_kv.forward(v)?;
        let (b, n, _) = x.dims3()?;
        let heads = |p: &Linear| p.forward(&x)?.reshape((b, n, self.hkv, self.d));
        Ok((heads(&self.k_proj)?, heads(&self.v_proj)?))
    }

    /// The text stream `t [B, St, Dm]` plus its cross-attention over the
    /// visual keys and values `kv` (every text slot a query; `lens` gives
    /// each row's visual tokens).
    pub(crate) fn forward(
        &self,
        t: &Tensor,
        kv: &(Tensor, Tensor),
        lens: &AttendLens,
    ) -> Result<Tensor> {
        let (b, s, _) = t.dims3()?;
        let q = self
            .q_proj
            .forward(&self.norm_q.forward(t)?)?
            .reshape((b, s, self.hq, self.d))?;
        let o = ops::cross_attention(&q, &kv.0, &kv.1, lens, None)?;
        t + self.o_proj.forward(&o.reshape((b, s, self.hq * self.d))?)?
    }

    /// [`CrossBlock::forward`], and the last text slot's attention
    /// probabilities over each row's visual tokens, mean over heads: `[B,
    /// Nv]` f32 (0 past a row's visual tokens), from the call's lse
    /// ([`ops::cross_attention_probs`]). For pictures.
    pub(crate) fn forward_recording(
        &self,
        t: &Tensor,
        kv: &(Tensor, Tensor),
        lens: &AttendLens,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s, _) = t.dims3()?;
        let q = self
            .q_proj
            .forward(&self.norm_q.forward(t)?)?
            .reshape((b, s, self.hq, self.d))?;
        let (o, lse) = ops::cross_attention_lse(&q, &kv.0, &kv.1, lens, None)?;
        // The text stream is left-padded: slot s - 1 is every row's last token.
        let last = SeqLens::new(&vec![1; b], lens.host().kv()).map_err(candle_core::Error::wrap)?;
        let p = ops::cross_attention_probs(
            &q.narrow(1, s - 1, 1)?,
            &kv.0,
            &lse.narrow(2, s - 1, 1)?,
            &last,
            None,
        )?;
        let attention = p.mean(1)?.squeeze(1)?;
        let t = (t + self.o_proj.forward(&o.reshape((b, s, self.hq * self.d))?)?)?;
        Ok((t, attention))
    }
}

/// The router (§4.3): an MLP over the routing token's hidden state after
/// its block, one logit per configuration: `fc2(gelu(fc1(norm(h))))`
/// (names `visor.router.{norm,fc1,fc2}`).
#[derive(Debug, Clone)]
pub(crate) struct Router {
    norm: RmsNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Router {
    pub(crate) fn new(vb: VarBuilder, cfg: &TextConfig, configurations: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Router {
            norm: rms_norm(h, cfg.rms_norm_eps, vb.pp("norm"))?,
            fc1: linear(h, h, vb.pp("fc1"))?,
            fc2: linear(h, configurations, vb.pp("fc2"))?,
        })
    }

    /// Logits `[n, configurations]` (f32) of hidden states `[n, Dm]`.
    pub(crate) fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let x = self.fc1.forward(&self.norm.forward(h)?)?.gelu_erf()?;
        self.fc2.forward(&x)?.to_dtype(candle_core::DType::F32)
    }
}

/// A group of rows mid-generation: the two streams, every layer's cache
/// (dense layout for self-attention layers, text stream otherwise) and the
/// visual K/V of each cross-attention layer already run.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub v: Tensor,
    pub t: Tensor,
    pub cache: KvCache,
    pub visual_kv: Vec<Option<(Tensor, Tensor)>>,
    /// Per layer, when recorded (pictures), the cross-attention of each
    /// row's last text token over its visual tokens, mean over heads: `[B,
    /// Nv]` f32 ([`CrossBlock::forward_recording`]).
    pub attention: Vec<Option<Tensor>>,
}

impl State {
    /// The rows `idx` (`[n]` u32) of every tensor.
    pub(crate) fn select(&self, idx: &Tensor) -> Result<State> {
        let pick = |t: &Tensor| t.index_select(idx, 0);
        let one = |a: &Option<Tensor>| a.as_ref().map(pick).transpose();
        let pair = |kv: &Option<(Tensor, Tensor)>| -> Result<Option<(Tensor, Tensor)>> {
            kv.as_ref()
                .map(|(k, v)| Ok((pick(k)?, pick(v)?)))
                .transpose()
        };
        let mut cache = KvCache::new(self.cache.num_layers());
        for (l, kv) in self.cache.layers().iter().enumerate() {
            if let Some((k, v)) = pair(kv)? {
                cache.set_layer(l, k, v);
            }
        }
        Ok(State {
            v: pick(&self.v)?,
            t: pick(&self.t)?,
            cache,
            visual_kv: self.visual_kv.iter().map(pair).collect::<Result<_>>()?,
            attention: self.attention.iter().map(one).collect::<Result<_>>()?,
        })
    }
}

/// The decoder under one configuration: what each layer does, and the
/// cross-attention blocks; `record`: the prefill keeps each
/// cross-attention layer's attention ([`State::attention`]).
pub(crate) struct Stack<'a> {
    pub dec: &'a Decoder,
    pub kinds: &'a [LayerKind],
    pub cross: &'a [Option<CrossBlock>],
    pub record: bool,
}

impl Stack<'_> {
    /// The runs of consecutive layers of one kind in `layers` (a
    /// cross-attention layer is a run of its own).
    fn runs(&self, layers: Range<usize>) -> Vec<(LayerKind, Range<usize>)> {
        let mut runs: Vec<(LayerKind, Range<usize>)> = Vec::new();
        for l in layers {
            let kind = self.kinds[l];
            match runs.last_mut() {
                Some((k, r)) if *k == kind && kind != LayerKind::CrossAttention => r.end = l + 1,
                _ => runs.push((kind, l..l + 1)),
            }
        }
        runs
    }

    fn block(&self, l: usize) -> Result<&CrossBlock> {
        match self.cross.get(l) {
            Some(Some(b)) => Ok(b),
            _ => candle_core::bail!("VISOR: layer {l} has no cross-attention block"),
        }
    }

    /// The prefill of `layers` over `state`'s streams (`lens`: every text
    /// slot a query, each row's visual tokens the keys).
    pub(crate) fn prefill(
        &self,
        streams: &Streams,
        state: &mut State,
        layers: Range<usize>,
        lens: &AttendLens,
    ) -> Result<()> {
        let dev = self.dec.device();
        let dense_mask = streams.dense_mask(dev)?;
        let text_mask = streams.text_mask(dev)?;
        for (kind, run) in self.runs(layers) {
            match kind {
                LayerKind::SelfAttention => {
                    let x = streams.merge(&state.v, &state.t)?;
                    let x = self.dec.forward_layers(
                        &x,
                        &streams.dense_positions,
                        Some(&dense_mask),
                        run,
                        &mut state.cache,
                    )?;
                    (state.v, state.t) = streams.split(&x)?;
                }
                LayerKind::CrossAttention | LayerKind::Text => {
                    if kind == LayerKind::CrossAttention {
                        let block = self.block(run.start)?;
                        let kv = block.visual_kv(&state.v)?;
                        if self.record {
                            let (t, attention) = block.forward_recording(&state.t, &kv, lens)?;
                            state.t = t;
                            state.attention[run.start] = Some(attention);
                        } else {
                            state.t = block.forward(&state.t, &kv, lens)?;
                        }
                        state.visual_kv[run.start] = Some(kv);
                    }
                    state.t = self.dec.forward_layers(
                        &state.t,
                        &streams.text_positions,
                        Some(&text_mask),
                        run,
                        &mut state.cache,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// One decode step: `tokens[b]` at `positions[b]` through every layer,
    /// appended to each layer's cache; cross-attention reads the visual K/V
    /// kept from the prefill (`lens`: one query per row). Returns the
    /// logits `[B, vocab]` (f32).
    pub(crate) fn decode_step(
        &self,
        streams: &Streams,
        state: &mut State,
        tokens: &[u32],
        positions: &[u32],
        lens: &AttendLens,
    ) -> Result<Tensor> {
        let (dev, b) = (self.dec.device(), tokens.len());
        let ids = Tensor::from_slice(tokens, (b, 1), dev)?;
        let pos = Tensor::from_slice(positions, (b, 1), dev)?;
        let mut h = self.dec.embed(&ids)?;
        for (kind, run) in self.runs(0..self.kinds.len()) {
            let starts = match kind {
                LayerKind::SelfAttention => &streams.dense_starts,
                _ => &streams.text_starts,
            };
            if kind == LayerKind::CrossAttention {
                let Some(kv) = &state.visual_kv[run.start] else {
                    candle_core::bail!("VISOR: layer {} decodes before its prefill", run.start)
                };
                h = self.block(run.start)?.forward(&h, kv, lens)?;
            }
            let kv_len = state.cache.seq_len(run.start) + 1;
            let mask = if starts.iter().any(|&s| s > 0) {
                Some(attention_mask(starts, 1, kv_len, dev)?)
            } else {
                None
            };
            h = self
                .dec
                .forward_layers(&h, &pos, mask.as_ref(), run, &mut state.cache)?;
        }
        self.dec.last_logits(&h)
    }
}
