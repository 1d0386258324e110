//! Inputs and baseline of the glimpse_scores benchmarks.
//!
//! A case is one GlimpsePrune batch at the pruning layer: the glimpse token's
//! query `q [B, Hq, D]` and the layer's key cache `k [B, S, Hkv, D]` (either
//! memory order), with the ragged rows of [`crate::rows::vlm_rows`].

use foveal::{Element, Layout, RowLayout, ScoreMode, View};

use crate::rows::{total_valid, total_visual, vlm_rows, RowsConfig};
use crate::{random_elems, rng, KvLayout, ModelDims, QWEN25_VL_7B};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub dims: ModelDims,
    pub rows: RowsConfig,
    pub kv_layout: KvLayout,
    pub mode: ScoreMode,
    pub seed: u64,
}

impl Case {
    /// Qwen2.5-VL-7B, one image per row, LogSoftmax (the LLaVA configuration,
    /// which needs the whole row's log-sum-exp).
    pub fn new(batch: usize, nv: usize, kv_layout: KvLayout) -> Self {
        Case {
            dims: QWEN25_VL_7B,
            rows: RowsConfig::new(batch, nv),
            kv_layout,
            mode: ScoreMode::LogSoftmax,
            seed: 0x61_1a_5c,
        }
    }

    pub fn with_mode(mut self, mode: ScoreMode) -> Self {
        self.mode = mode;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A short label: `B4 Nv16384 bshd logsoftmax`.
    pub fn label(&self) -> String {
        format!(
            "B{} Nv{} {} {}",
            self.rows.batch,
            self.rows.nv,
            self.kv_layout.name(),
            mode_name(self.mode)
        )
    }
}

pub fn mode_name(mode: ScoreMode) -> &'static str {
    match mode {
        ScoreMode::Logits => "logits",
        ScoreMode::LogSoftmax => "logsoftmax",
        ScoreMode::Softmax => "softmax",
    }
}

/// The shapes of a case, without data (the GPU bench fills device buffers itself).
#[derive(Debug, Clone)]
pub struct Plan {
    pub dims: ModelDims,
    pub rows: RowLayout,
    pub mode: ScoreMode,
    /// `[B, Hq, D]`, contiguous.
    pub q_layout: Layout<3>,
    /// `[B, S, Hkv, D]` in the case's memory order.
    pub k_layout: Layout<4>,
}

impl Plan {
    /// Shape of the output `[B, Nv_max, Hq]`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.rows.batch(), self.rows.nv_max(), self.dims.q_heads]
    }

    pub fn out_len(&self) -> usize {
        self.out_shape().iter().product()
    }

    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        floor_bytes(&self.dims, &self.rows, self.mode, elem_bytes)
    }
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub plan: Plan,
    pub q: Vec<T>,
    pub k: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn q_view(&self) -> View<'_, T, 3> {
        View::new(&self.q, self.plan.q_layout).expect("generated to fit")
    }

    pub fn k_view(&self) -> View<'_, T, 4> {
        View::new(&self.k, self.plan.k_layout).expect("generated to fit")
    }
}

/// The rows and layouts of `case`.
pub fn plan(case: &Case) -> Plan {
    let rows = vlm_rows(&mut rng(case.seed), &case.rows);
    let ModelDims {
        q_heads,
        kv_heads,
        head_dim,
        ..
    } = case.dims;
    let b = rows.batch();
    Plan {
        dims: case.dims,
        mode: case.mode,
        q_layout: Layout::contiguous([b, q_heads, head_dim]),
        k_layout: case.kv_layout.layout(b, rows.seq(), kv_heads, head_dim),
        rows,
    }
}

/// The rows, layouts and random q, k (uniform in [-1, 1), padding slots included) of `case`.
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let plan = plan(case);
    let mut r = rng(case.seed ^ 0x9e37_79b9_7f4a_7c15);
    let q = random_elems(&mut r, plan.q_layout.span(), -1.0, 1.0);
    let k = random_elems(&mut r, plan.k_layout.span(), -1.0, 1.0);
    Input { plan, q, k }
}

/// Bytes glimpse_scores must move: q, the keys it needs (every valid key of
/// each row for the log-sum-exp modes; only the visual keys for Logits), the
/// output `[B, Nv_max, Hq]` f32, and the row arrays (start, end, nv, vis_pos).
pub fn floor_bytes(dims: &ModelDims, rows: &RowLayout, mode: ScoreMode, elem_bytes: usize) -> u64 {
    let b = rows.batch();
    let keys = match mode {
        ScoreMode::Logits => total_visual(rows),
        ScoreMode::LogSoftmax | ScoreMode::Softmax => total_valid(rows),
    };
    let q = b * dims.q_heads * dims.head_dim * elem_bytes;
    let k = keys * dims.kv_heads * dims.head_dim * elem_bytes;
    let out = b * rows.nv_max() * dims.q_heads * 4;
    let row_arrays = 3 * b * 4 + b * rows.nv_max() * 4;
    (q + k + out + row_arrays) as u64
}

/// The unfused framework computation (what an eager PyTorch/candle model
/// does): upcast and `repeat_kv` the keys to `[B, Hq, S, D]` f32, the logits
/// `q . k` of every query head against every cache slot `[B, Hq, S]`, a mask
/// of the slots outside each row's valid range, the (log-)softmax over the
/// row as a new `[B, Hq, S]` tensor, an index_select of the visual columns
/// `[B, Hq, Nv_max]`, and the transpose to `out [B, Nv_max, Hq]`
/// (contiguous). Each step a separate pass over a materialised intermediate.
pub fn baseline<T: Element>(
    q: View<'_, T, 3>,
    k: View<'_, T, 4>,
    rows: &RowLayout,
    scale: Option<f32>,
    mode: ScoreMode,
    out: &mut [f32],
) {
    let [b, hq, d] = q.shape();
    let [_, s, hkv, _] = k.shape();
    let g = hq / hkv;
    let nv_max = rows.nv_max();
    assert_eq!(out.len(), b * nv_max * hq, "out is [B, Nv_max, Hq]");
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());

    // q.to(f32)
    let mut qf = vec![0f32; b * hq * d];
    for bi in 0..b {
        for h in 0..hq {
            for (dst, &x) in qf[(bi * hq + h) * d..][..d]
                .iter_mut()
                .zip(q.row([bi, h, 0]))
            {
                *dst = x.to_f32();
            }
        }
    }
    // repeat_kv(k).to(f32): [B, Hq, S, D]
    let mut kx = vec![0f32; b * hq * s * d];
    for bi in 0..b {
        for h in 0..hq {
            for p in 0..s {
                let dst = &mut kx[((bi * hq + h) * s + p) * d..][..d];
                for (o, &x) in dst.iter_mut().zip(k.row([bi, p, h / g, 0])) {
                    *o = x.to_f32();
                }
            }
        }
    }
    // logits = scale * q @ k^T: [B, Hq, S]
    let mut logits = vec![0f32; b * hq * s];
    for bh in 0..b * hq {
        let qrow = &qf[bh * d..][..d];
        for p in 0..s {
            let krow = &kx[(bh * s + p) * d..][..d];
            logits[bh * s + p] = scale * qrow.iter().zip(krow).map(|(a, c)| a * c).sum::<f32>();
        }
    }
    // attention mask: slots outside the row's valid range
    for bi in 0..b {
        for h in 0..hq {
            let row = &mut logits[(bi * hq + h) * s..][..s];
            row[..rows.start(bi)].fill(f32::NEG_INFINITY);
            row[rows.end(bi)..].fill(f32::NEG_INFINITY);
        }
    }
    // (log_)softmax over the row: a new [B, Hq, S]
    let scores = match mode {
        ScoreMode::Logits => logits,
        ScoreMode::LogSoftmax | ScoreMode::Softmax => {
            let mut sc = vec![0f32; b * hq * s];
            for (src, dst) in logits.chunks_exact(s).zip(sc.chunks_exact_mut(s)) {
                let m = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + src.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = if mode == ScoreMode::Softmax {
                        (x - lse).exp()
                    } else {
                        x - lse
                    };
                }
            }
            sc
        }
    };
    // index_select of the visual columns: [B, Hq, Nv_max], zero past nv
    let mut picked = vec![0f32; b * hq * nv_max];
    for bi in 0..b {
        let vis = rows.visual(bi);
        for h in 0..hq {
            let src = &scores[(bi * hq + h) * s..][..s];
            for (o, &p) in picked[(bi * hq + h) * nv_max..].iter_mut().zip(vis) {
                *o = src[p as usize];
            }
        }
    }
    // transpose(1, 2).contiguous(): [B, Nv_max, Hq]
    for bi in 0..b {
        for h in 0..hq {
            for i in 0..nv_max {
                out[(bi * nv_max + i) * hq + h] = picked[(bi * hq + h) * nv_max + i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::glimpse_scores::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        for (layout, mode) in [
            (KvLayout::Bshd, ScoreMode::LogSoftmax),
            (KvLayout::Bhsd, ScoreMode::Logits),
            (KvLayout::Bshd, ScoreMode::Softmax),
        ] {
            let mut case = Case::new(3, 40, layout).with_mode(mode).with_seed(11);
            case.dims = ModelDims {
                layers: 1,
                q_heads: 6,
                kv_heads: 2,
                head_dim: 16,
            };
            case.rows.images = 2;
            let input = generate::<bf16>(&case);
            let plan = &input.plan;
            let mut want = vec![f32::NAN; plan.out_len()];
            let mut out = ViewMut::contiguous(&mut want, plan.out_shape()).unwrap();
            cpu::glimpse_scores(
                input.q_view(),
                input.k_view(),
                &plan.rows,
                None,
                mode,
                &mut out,
            )
            .unwrap();
            let mut got = vec![f32::NAN; plan.out_len()];
            baseline(
                input.q_view(),
                input.k_view(),
                &plan.rows,
                None,
                mode,
                &mut got,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{case:?}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn floor_counts_the_keys_the_mode_needs() {
        let p = plan(&Case::new(2, 100, KvLayout::Bshd));
        let all = p.floor_bytes(2);
        let vis = floor_bytes(&p.dims, &p.rows, ScoreMode::Logits, 2);
        let text_keys = (total_valid(&p.rows) - total_visual(&p.rows)) as u64;
        assert_eq!(all - vis, text_keys * 4 * 128 * 2);
    }
}
