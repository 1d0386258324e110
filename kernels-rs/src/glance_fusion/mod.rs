//! glance_fusion: Glance2Gaze's Glance Fusion (SPEC "Glance2Gaze /
//! glance_fusion"): S ViT layers' visual tokens fused into one, each layer
//! weighted per token by its agreement with the instruction.
//!
//! In: `vq [S, B, N, dt]`, the S layers' tokens after their projections to
//! the decoder width `dt` (one strided view: any layer, row and token
//! strides, `dt` contiguous; a layer stride of 0 repeats one layer), and
//! `e [S, B, M, dt]`, the instruction's token embeddings after each layer's
//! linear map; per row `n_len[b] <= N` valid visual tokens and
//! `1 <= m_len[b] <= M` instruction tokens ([`Lengths`]).
//!
//! Per row `b` and valid token `n < n_len[b]`:
//!
//! - `g[s] = (1 / m_len) sum_{m < m_len} (vq[s, n] . e[s, m]) / sqrt(dt)`,
//!   computed as `(vq[s, n] . ebar[s]) / sqrt(dt)` with the mean instruction
//!   vector `ebar[s] = (1 / m_len) sum_m e[s, m]` (equal in real arithmetic);
//! - `w = softmax_s(g)`: `w[s] = exp((g[s] - max) - ln(sum_s' exp(g[s'] - max)))`;
//! - `out[n] = sum_s w[s] vq[s, n]`, in the input type.
//!
//! f32 accumulation throughout. Out: `out [B, N, dt]` and optionally the
//! weights `w [B, N, S]` f32; rows `n >= n_len[b]` of both are written as 0.
//! With one layer the weights are 1 and `out` equals `vq` bit for bit.
//!
//! Non-finite values follow IEEE arithmetic, as `torch.softmax` does: a
//! `-inf` score gives its layer weight 0 while another score is finite; a
//! NaN or `+inf` score, or every score `-inf`, makes the token's weights and
//! output NaN; a NaN or infinity in `vq` reaches `out` through the sum.
//!
//! Errors (nothing written): no layers (`S = 0`) or `dt = 0` (`vq`); `e`'s
//! layers, batch or width different from `vq`'s (`e`); a row without
//! instruction tokens (`m_len`: Glance Fusion weighs the layers by the
//! instruction, and an empty one gives no weights); lengths past the tensors
//! (`n_len`, `m_len`); the outputs' shapes (`out`, `weights`). The CUDA path
//! takes `S <= 8` and `dt <= 4,096` (`Unsupported` past them).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{ensure, Error, Result};

pub(crate) const OP: &str = "glance_fusion";

/// The valid visual and instruction tokens of each row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lengths {
    n_len: Vec<usize>,
    m_len: Vec<usize>,
}

impl Lengths {
    /// Per row `n_len[b]` visual and `m_len[b]` instruction tokens (checked
    /// against the tensors by the op).
    pub fn new(n_len: &[usize], m_len: &[usize]) -> Result<Self> {
        ensure(n_len.len() == m_len.len(), || {
            Error::shape(
                OP,
                "lengths",
                format!(
                    "{} visual lengths, {} instruction lengths",
                    n_len.len(),
                    m_len.len()
                ),
            )
        })?;
        Ok(Lengths {
            n_len: n_len.to_vec(),
            m_len: m_len.to_vec(),
        })
    }

    /// Every row full: `n` visual and `m` instruction tokens.
    pub fn full(batch: usize, n: usize, m: usize) -> Self {
        Lengths {
            n_len: vec![n; batch],
            m_len: vec![m; batch],
        }
    }

    /// Rows, `B`.
    pub fn batch(&self) -> usize {
        self.n_len.len()
    }

    /// Valid visual tokens per row.
    pub fn n_len(&self) -> &[usize] {
        &self.n_len
    }

    /// Instruction tokens per row.
    pub fn m_len(&self) -> &[usize] {
        &self.m_len
    }
}

/// The sizes of one call, after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub layers: usize,
    pub batch: usize,
    pub tokens: usize,
    pub instr: usize,
    pub dim: usize,
    /// `1 / sqrt(dt)`.
    pub scale: f32,
}

/// Checks `vq [S, B, N, dt]`, `e [S, B, M, dt]`, the lengths and the outputs
/// `out [B, N, dt]`, `weights [B, N, S]`.
pub(crate) fn check(
    vq: [usize; 4],
    e: [usize; 4],
    lengths: &Lengths,
    out: [usize; 3],
    weights: Option<[usize; 3]>,
) -> Result<Dims> {
    let [s, b, n, dt] = vq;
    ensure(s >= 1, || {
        Error::shape(OP, "vq", "no layers (S = 0): fusion needs at least one")
    })?;
    ensure(dt >= 1, || Error::shape(OP, "vq", "the width dt is 0"))?;
    let [es, eb, m, edt] = e;
    ensure(es == s, || {
        Error::shape(OP, "e", format!("{es} layers, vq has {s}"))
    })?;
    ensure(eb == b, || {
        Error::shape(OP, "e", format!("batch {eb}, vq has {b}"))
    })?;
    ensure(edt == dt, || {
        Error::shape(OP, "e", format!("width {edt}, vq has dt = {dt}"))
    })?;
    ensure(lengths.batch() == b, || {
        Error::shape(
            OP,
            "lengths",
            format!("{} rows, the batch has {b}", lengths.batch()),
        )
    })?;
    for row in 0..b {
        let (nl, ml) = (lengths.n_len[row], lengths.m_len[row]);
        ensure(nl <= n, || {
            Error::index(
                OP,
                "n_len",
                format!("row {row}: {nl} visual tokens, vq holds {n}"),
            )
        })?;
        ensure(ml >= 1, || {
            Error::value(
                OP,
                "m_len",
                format!(
                    "row {row} has no instruction token: Glance Fusion weighs the layers by \
                     the instruction, and an empty one gives no weights"
                ),
            )
        })?;
        ensure(ml <= m, || {
            Error::index(
                OP,
                "m_len",
                format!("row {row}: {ml} instruction tokens, e holds {m}"),
            )
        })?;
    }
    ensure(out == [b, n, dt], || {
        Error::shape(
            OP,
            "out",
            format!("shape {out:?}, expected {:?}", [b, n, dt]),
        )
    })?;
    if let Some(w) = weights {
        ensure(w == [b, n, s], || {
            Error::shape(
                OP,
                "weights",
                format!("shape {w:?}, expected {:?}", [b, n, s]),
            )
        })?;
    }
    ensure(
        [s, n, m, dt].iter().all(|&x| x <= i32::MAX as usize),
        || Error::Unsupported {
            op: OP,
            msg: "sizes past the kernels' 32-bit indices".into(),
        },
    )?;
    Ok(Dims {
        layers: s,
        batch: b,
        tokens: n,
        instr: m,
        dim: dt,
        scale: 1.0 / (dt as f32).sqrt(),
    })
}

/// The softmax over the layers of one token, as both backends compute it:
/// `max` (NaN skipped), `sum = sum_s exp(g[s] - max)` in layer order, then
/// `w[s] = exp((g[s] - max) - ln(sum))`.
pub fn layer_softmax(g: &[f32], w: &mut [f32]) {
    let max = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = g.iter().map(|&x| (x - max).exp()).sum();
    let ln_sum = sum.ln();
    for (w, &x) in w.iter_mut().zip(g) {
        *w = ((x - max) - ln_sum).exp();
    }
}
