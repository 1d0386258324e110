//! A Qwen2-style decoder: `embed_tokens`, layers of RMSNorm, grouped-query
//! attention with rotary embeddings (q/k/v projections with bias, `o_proj`
//! without), SwiGLU MLP, the final norm and `lm_head`. HF names under the
//! prefix the [`VarBuilder`] is given: `model.embed_tokens`,
//! `model.layers.{i}.…`, `model.norm`, `lm_head` (a Qwen2 checkpoint loads at
//! its root, a LLaVA one under `language_model`).
//!
//! Rotary embeddings are computed from explicit position ids per token
//! (`[B, S]`), so a sequence with gaps (pruned tokens keep their original
//! positions) or left padding runs as it is. The KV cache ([`KvCache`]) holds
//! per layer K and V as `[B, Hkv, S, D]` (contiguous, the candle/HF order that
//! foveal reads in place), keys after RoPE.
//!
//! A method changes how queries read the cache through [`AttentionCore`]:
//! the `_with` variants of the layer, decode-step and greedy functions hand
//! every layer's projected heads (after RoPE, the cache already appended) to
//! the given core; the others use [`DenseAttention`].

use std::ops::Range;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{
    embedding, linear, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder,
};

use crate::config::TextConfig;
use crate::nn::SwiGlu;

/// The additive mask value of a hidden key. Finite, so that a query row with
/// every key hidden (a padding slot) gets a uniform softmax, not NaN; any key
/// that is visible outweighs it completely (its weight underflows to 0).
pub const MASK_MIN: f32 = f32::MIN;

/// Per layer K and V, each `[B, Hkv, S, D]` contiguous, keys after RoPE; a
/// layer not yet run is `None`. The caller may read, take and replace any
/// layer (e.g. with the caches foveal's `compact_kv` gathered).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a decoder of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `l`'s `(k, v)`, if it has been run.
    pub fn layer(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(l).and_then(|x| x.as_ref())
    }

    /// Replaces layer `l`'s `(k, v)` (each `[B, Hkv, S, D]`).
    pub fn set_layer(&mut self, l: usize, k: Tensor, v: Tensor) {
        self.layers[l] = Some((k, v));
    }

    /// Removes and returns layer `l`'s `(k, v)`.
    pub fn take_layer(&mut self, l: usize) -> Option<(Tensor, Tensor)> {
        self.layers[l].take()
    }

    pub fn layers(&self) -> &[Option<(Tensor, Tensor)>] {
        &self.layers
    }

    pub fn layers_mut(&mut self) -> &mut Vec<Option<(Tensor, Tensor)>> {
        &mut self.layers
    }

    /// Cached positions (capacity `S`) of layer `l`; 0 when it is empty.
    pub fn seq_len(&self, l: usize) -> usize {
        self.layer(l).map_or(0, |(k, _)| k.dims()[2])
    }

    /// Empties every layer.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|x| *x = None);
    }
}

/// The additive attention mask `[B, 1, q_len, kv_len]` (f32) for `q_len` new
/// tokens after `kv_len - q_len` cached ones, rows left-padded: query `i`
/// (cache slot `kv_len - q_len + i`) of row `b` sees key `j` iff
/// `starts[b] <= j <= kv_len - q_len + i`; other keys get [`MASK_MIN`].
/// Prefill: `q_len = kv_len = S`; a decode step: `q_len = 1`.
pub fn attention_mask(
    starts: &[usize],
    q_len: usize,
    kv_len: usize,
    device: &Device,
) -> Result<Tensor> {
    if q_len > kv_len {
        candle_core::bail!("attention_mask: q_len {q_len} > kv_len {kv_len}");
    }
    let offset = kv_len - q_len;
    let mut m = vec![0f32; starts.len() * q_len * kv_len];
    for (b, &s) in starts.iter().enumerate() {
        for i in 0..q_len {
            let row = &mut m[(b * q_len + i) * kv_len..][..kv_len];
            for (j, x) in row.iter_mut().enumerate() {
                if j < s || j > offset + i {
                    *x = MASK_MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (starts.len(), 1, q_len, kv_len), device)
}

/// What [`Decoder::forward_layers_capture`] returns besides the hidden states.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The last layer of the range's query at the last position, after RoPE:
    /// `[B, Hq, D]` (model dtype, contiguous).
    pub last_query: Tensor,
    /// The same layer's queries at every position of the call, after RoPE:
    /// `[B, Hq, S_q, D]` (model dtype, contiguous).
    pub queries: Tensor,
}

/// Layers whose caches share one row layout while decoding: `starts[b]` is
/// the first valid cache slot of row `b` in each of them. After a token
/// reduction inside the decoder the layers before and after it hold caches
/// of different lengths (FocusLLaVA: the full prompt up to the sampler's
/// layer, the kept tokens after it).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSpan {
    pub layers: Range<usize>,
    pub starts: Vec<usize>,
}

/// A greedy generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Per row, the generated tokens ...
    pub tokens: Vec<Vec<u32>>,
    /// ... and their position ids (the first: where decoding began).
    pub positions: Vec<Vec<u32>>,
    /// Per step, the logits `[B, vocab]` (f32) the step's token was chosen from.
    pub logits: Vec<Tensor>,
}

/// The attention of one layer over its projected heads: what a method
/// replaces to change how queries read the cache (Gaze Attention's sparse
/// decode), the projections, RoPE, the cache and the rest of the layer
/// staying the decoder's. [`DenseAttention`] is the model's own.
pub trait AttentionCore {
    /// `q` `[B, Hq, Sq, D]` (after RoPE) of this call's `Sq` tokens at layer
    /// `layer`; `k`, `v` `[B, Hkv, S_kv, D]` the layer's whole cache, this
    /// call's tokens last; `mask` the additive mask the decoder was given
    /// (see [`Decoder::forward_layers`]). Returns `[B, Hq, Sq, D]`, q's dtype.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// Dense softmax attention with an additive mask `[B, 1, Sq, S_kv]` (`None`:
/// causal among the new tokens, every cached key visible), scale
/// `1/sqrt(D)`, GQA without repeating K/V, scores and softmax in f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct DenseAttention;

impl AttentionCore for DenseAttention {
    fn attend(
        &mut self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, hq, sq, d) = q.dims4()?;
        let (_, hkv, skv, _) = k.dims4()?;
        // The G query heads of a KV head become G*Sq query rows of that head.
        let g = hq / hkv;
        let dtype = q.dtype();
        let qg = q.reshape((b, hkv, g * sq, d))?;
        let scores = (qg.matmul(&k.t()?)?.to_dtype(DType::F32)? * (d as f64).powf(-0.5))?;
        let scores = scores.reshape(vec![b, hkv, g, sq, skv])?;
        let scores = match mask {
            Some(m) => {
                let m = m.to_dtype(DType::F32)?;
                if m.dims() != [b, 1, sq, skv] {
                    candle_core::bail!(
                        "Decoder: mask {:?}, expected [{b}, 1, {sq}, {skv}]",
                        m.dims()
                    );
                }
                scores.broadcast_add(&m.unsqueeze(1)?)?
            }
            None if sq > 1 => {
                let m = attention_mask(&vec![0; b], sq, skv, q.device())?;
                scores.broadcast_add(&m.unsqueeze(1)?)?
            }
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.contiguous()?)?.to_dtype(dtype)?;
        probs
            .reshape((b, hkv, g * sq, skv))?
            .matmul(v)?
            .reshape((b, hq, sq, d))
    }
}

/// What every layer of one decoder call shares: the rotary tables of its
/// positions, the mask, the attention core, and the layer whose queries to
/// return.
struct Pass<'a> {
    rope: (Tensor, Tensor),
    mask: Option<&'a Tensor>,
    core: &'a mut dyn AttentionCore,
    capture: Option<usize>,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    hq: usize,
    hkv: usize,
    d: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Attention {
            q_proj: linear(h, cfg.num_heads * d, vb.pp("q_proj"))?,
            k_proj: linear(h, cfg.num_kv_heads * d, vb.pp("k_proj"))?,
            v_proj: linear(h, cfg.num_kv_heads * d, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(cfg.num_heads * d, h, vb.pp("o_proj"))?,
            hq: cfg.num_heads,
            hkv: cfg.num_kv_heads,
            d,
        })
    }

    /// `xs` `[B, Sq, Dm]` (normed); appends this call's K/V to `kv` and
    /// lets the pass's core attend. Returns the output `[B, Sq, Dm]` and, at
    /// the pass's capture layer, the queries `[B, Hq, Sq, D]`.
    fn forward(
        &self,
        xs: &Tensor,
        kv: &mut Option<(Tensor, Tensor)>,
        layer: usize,
        pass: &mut Pass,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, sq, _) = xs.dims3()?;
        let (hq, hkv, d) = (self.hq, self.hkv, self.d);
        let heads = |t: Tensor, h: usize| t.reshape((b, sq, h, d))?.transpose(1, 2)?.contiguous();
        let q = heads(self.q_proj.forward(xs)?, hq)?;
        let k = heads(self.k_proj.forward(xs)?, hkv)?;
        let v = heads(self.v_proj.forward(xs)?, hkv)?;
        let (cos, sin) = &pass.rope;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k, v) = match kv.as_ref() {
            Some((k0, v0)) => (Tensor::cat(&[k0, &k], 2)?, Tensor::cat(&[v0, &v], 2)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let captured = if pass.capture == Some(layer) {
            Some(q.contiguous()?)
        } else {
            None
        };
        let out = pass.core.attend(layer, &q, &k, &v, pass.mask)?;
        if out.dims() != [b, hq, sq, d] {
            candle_core::bail!(
                "Decoder: the attention core returned {:?}, expected [{b}, {hq}, {sq}, {d}]",
                out.dims()
            );
        }
        let out = out.transpose(1, 2)?.reshape((b, sq, hq * d))?;
        Ok((self.o_proj.forward(&out)?, captured))
    }
}

#[derive(Debug, Clone)]
struct Layer {
    self_attn: Attention,
    mlp: SwiGlu,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl Layer {
    fn new(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        Ok(Layer {
            self_attn: Attention::new(vb.pp("self_attn"), cfg)?,
            mlp: SwiGlu::new(vb.pp("mlp"), cfg.hidden_size, cfg.intermediate_size)?,
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        kv: &mut Option<(Tensor, Tensor)>,
        layer: usize,
        pass: &mut Pass,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let normed = self.input_layernorm.forward(xs)?;
        let (attn, q) = self.self_attn.forward(&normed, kv, layer, pass)?;
        let xs = (xs + attn)?;
        let out = (&xs
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&xs)?)?)?;
        Ok((out, q))
    }
}

/// The decoder. Build it at the root of a Qwen2 checkpoint, or under
/// `language_model` of a LLaVA one.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    /// `[D/2]` f32.
    inv_freq: Tensor,
    cfg: TextConfig,
    device: Device,
    dtype: DType,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::new(m.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(linear_no_bias(
                cfg.hidden_size,
                cfg.vocab_size,
                vb.pp("lm_head"),
            )?)
        };
        let d = cfg.head_dim;
        // As HF: inv_freq = 1 / theta^(2i / D), in f32.
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| (1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv, d / 2, vb.device())?;
        Ok(Decoder {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights, hidden states and KV cache.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty cache sized for this decoder.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings: ids `[...]` (u32) -> `[..., Dm]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }

    /// cos and sin `[B, S, D/2]` (model dtype) of the position ids `[B, S]`
    /// (any integer or float dtype).
    pub fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b, s, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, self.cfg.head_dim / 2))?)?;
        Ok((
            freqs.cos()?.to_dtype(self.dtype)?.contiguous()?,
            freqs.sin()?.to_dtype(self.dtype)?.contiguous()?,
        ))
    }

    /// Runs `layers` over `hidden` `[B, S_q, Dm]` at position ids `positions`
    /// `[B, S_q]`, appending each layer's new K/V to `cache` (whatever the
    /// layer already holds, `S_kv - S_q` positions, comes first). `mask` is
    /// additive `[B, 1, S_q, S_kv]` (see [`attention_mask`]); `None` means
    /// causal among the new tokens, every cached key visible. Returns the
    /// hidden states after the last layer of the range (no final norm).
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        layers: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_layers_with(hidden, positions, mask, layers, cache, &mut DenseAttention)
    }

    /// [`Decoder::forward_layers`] with every layer's attention done by
    /// `core` (called once per layer, in order).
    pub fn forward_layers_with(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        layers: Range<usize>,
        cache: &mut KvCache,
        core: &mut dyn AttentionCore,
    ) -> Result<Tensor> {
        Ok(self
            .run_layers(hidden, positions, mask, layers, cache, core, false)?
            .0)
    }

    /// [`Decoder::forward_layers`], also returning the queries (after RoPE)
    /// of the last layer of the range: GlimpsePrune's glimpse query at layer K
    /// is the last position's of `forward_layers_capture(.., 0..K + 1, ..)`,
    /// FocusLLaVA's text queries its instruction tokens'.
    pub fn forward_layers_capture(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        layers: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Captured)> {
        let (h, q) = self.run_layers(
            hidden,
            positions,
            mask,
            layers,
            cache,
            &mut DenseAttention,
            true,
        )?;
        match q {
            Some(queries) => {
                let s = queries.dim(2)?;
                let last_query = queries.narrow(2, s - 1, 1)?.squeeze(2)?.contiguous()?;
                Ok((
                    h,
                    Captured {
                        last_query,
                        queries,
                    },
                ))
            }
            None => candle_core::bail!("Decoder::forward_layers_capture: the layer range is empty"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        hidden: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        layers: Range<usize>,
        cache: &mut KvCache,
        core: &mut dyn AttentionCore,
        capture: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if layers.end > self.layers.len() || cache.num_layers() != self.layers.len() {
            candle_core::bail!(
                "Decoder: layers {layers:?} of {} (cache of {} layers)",
                self.layers.len(),
                cache.num_layers()
            );
        }
        let (b, s, _) = hidden.dims3()?;
        if positions.dims() != [b, s] {
            candle_core::bail!(
                "Decoder: positions {:?}, expected [{b}, {s}]",
                positions.dims()
            );
        }
        let mut pass = Pass {
            rope: self.rope_tables(positions)?,
            mask,
            core,
            capture: capture.then(|| layers.end.saturating_sub(1)),
        };
        let (mut xs, mut q) = (hidden.clone(), None);
        for l in layers {
            let (out, ql) = self.layers[l].forward(&xs, &mut cache.layers[l], l, &mut pass)?;
            xs = out;
            q = q.or(ql);
        }
        Ok((xs, q))
    }

    /// The final norm and `lm_head`: hidden `[B, S, Dm]` -> logits `[B, S, vocab]` (f32).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(hidden)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => h.broadcast_matmul(&self.embed_tokens.embeddings().t()?)?,
        };
        logits.to_dtype(DType::F32)
    }

    /// Logits `[B, vocab]` (f32) of the last position of `hidden` `[B, S, Dm]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let s = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, s - 1, 1)?)?.squeeze(1)
    }

    /// One decode step of every layer: token `tokens[b]` at position
    /// `positions[b]` appended after the cached entries (rows left-padded,
    /// valid from `starts[b]`). Returns the logits `[B, vocab]` (f32).
    pub fn decode_step(
        &self,
        tokens: &[u32],
        positions: &[u32],
        starts: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.decode_step_with(
            tokens,
            positions,
            &[self.span_all(starts)],
            cache,
            &mut DenseAttention,
        )
    }

    /// One span over every layer, valid from `starts`: the layout of a cache
    /// no method has reduced inside the decoder.
    pub fn span_all(&self, starts: &[usize]) -> CacheSpan {
        CacheSpan {
            layers: 0..self.layers.len(),
            starts: starts.to_vec(),
        }
    }

    /// [`Decoder::decode_step`] over caches of different layouts, with every
    /// layer's attention done by `core`: `spans` cover the layers in order,
    /// each with its own left-padding starts (and its own cache length, read
    /// from its first layer); `core` gets each span's left-padding mask, or
    /// `None` when no row of the span is padded.
    pub fn decode_step_with(
        &self,
        tokens: &[u32],
        positions: &[u32],
        spans: &[CacheSpan],
        cache: &mut KvCache,
        core: &mut dyn AttentionCore,
    ) -> Result<Tensor> {
        let b = tokens.len();
        if positions.len() != b || spans.iter().any(|s| s.starts.len() != b) {
            candle_core::bail!(
                "Decoder::decode_step: {b} tokens, {} positions, spans with starts for another batch",
                positions.len()
            );
        }
        let mut next = 0;
        for span in spans {
            if span.layers.start != next || span.layers.end < span.layers.start {
                candle_core::bail!(
                    "Decoder::decode_step: spans {:?} must cover layers 0..{} in order",
                    spans.iter().map(|s| &s.layers).collect::<Vec<_>>(),
                    self.layers.len()
                );
            }
            next = span.layers.end;
        }
        if next != self.layers.len() {
            candle_core::bail!(
                "Decoder::decode_step: the spans end at layer {next}, the decoder has {}",
                self.layers.len()
            );
        }
        let ids = Tensor::from_slice(tokens, (b, 1), &self.device)?;
        let pos = Tensor::from_slice(positions, (b, 1), &self.device)?;
        let mut h = self.embed(&ids)?;
        for span in spans.iter().filter(|s| !s.layers.is_empty()) {
            let kv_len = cache.seq_len(span.layers.start) + 1;
            let mask = if span.starts.iter().any(|&s| s > 0) {
                Some(attention_mask(&span.starts, 1, kv_len, &self.device)?)
            } else {
                None
            };
            h = self.forward_layers_with(
                &h,
                &pos,
                mask.as_ref(),
                span.layers.clone(),
                cache,
                core,
            )?;
        }
        self.last_logits(&h)
    }

    /// Greedy decoding from a filled cache: the first token is the argmax of
    /// `first_logits` `[B, vocab]` (the prefill's last position), at position
    /// `next_positions[b]`, then each step feeds the previous token at the next
    /// position. `max_new_tokens` tokens per row, no stop token.
    pub fn greedy(
        &self,
        first_logits: &Tensor,
        next_positions: &[u32],
        starts: &[usize],
        cache: &mut KvCache,
        max_new_tokens: usize,
    ) -> Result<Generation> {
        let spans = [self.span_all(starts)];
        self.greedy_with(
            first_logits,
            next_positions,
            &spans,
            cache,
            max_new_tokens,
            &mut DenseAttention,
        )
    }

    /// [`Decoder::greedy`] over caches of different layouts, every decode
    /// step's attention done by `core` (see [`Decoder::decode_step_with`]).
    pub fn greedy_with(
        &self,
        first_logits: &Tensor,
        next_positions: &[u32],
        spans: &[CacheSpan],
        cache: &mut KvCache,
        max_new_tokens: usize,
        core: &mut dyn AttentionCore,
    ) -> Result<Generation> {
        let b = next_positions.len();
        let mut gen = Generation {
            tokens: vec![Vec::with_capacity(max_new_tokens); b],
            positions: vec![Vec::with_capacity(max_new_tokens); b],
            logits: Vec::with_capacity(max_new_tokens),
        };
        let mut logits = first_logits.to_dtype(DType::F32)?;
        let mut pos = next_positions.to_vec();
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
            logits = self.decode_step_with(&next, &pos, spans, cache, core)?;
            pos.iter_mut().for_each(|p| *p += 1);
        }
        Ok(gen)
    }
}

/// Per row, the index of the largest logit of `logits` `[B, vocab]`.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}
