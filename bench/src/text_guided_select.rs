//! Inputs and baseline of the text_guided_select benchmarks.
//!
//! A case is FocusLLaVA's text-guided sampler on a LLaVA-NeXT model with a
//! Llama-3-8B language model ([`LLAMA3_8B`]: 32 query heads, 8 KV heads,
//! head dim 128): the text queries `q [B, T, Hq, D]` (after RoPE) and the
//! visual keys `k [B, N, Hkv, D]` of the chosen layer (either memory order),
//! every row full (`T` text and `N` visual tokens; 2,880 = 5 x 576 is an
//! anyres image), gamma 0.85.
//!
//! The values are structured as real attention is: per row and KV head a
//! direction `u` (uniform in [-1, 1) per component) that the queries share
//! (`q = u / 2 + U(-1, 1)`), and keys `k = U(-1, 1) / 2 + lift_i * u / 2`
//! where `lift_i` (0 to 3) lies on 1 to 3 Gaussian blobs of the image grid
//! (the objects the text is about), so that attention concentrates on a
//! minority of the visual tokens and gamma keeps part of them.

use foveal::text_guided_select::{Lengths, DEFAULT_GAMMA};
use foveal::{Element, Layout, View};
use rand::rngs::StdRng;
use rand::Rng;

use crate::{rng, KvLayout, ModelDims, LLAMA3_8B};

/// The visual-token counts the benchmarks sweep: one 336px crop (576) and an anyres image (2,880).
pub const VISUAL: [usize; 2] = [576, 2880];

/// Text tokens of the default case.
pub const TEXT: usize = 64;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub dims: ModelDims,
    pub batch: usize,
    /// Text tokens `T` per row.
    pub text: usize,
    /// Visual tokens `N` per row.
    pub visual: usize,
    pub kv_layout: KvLayout,
    pub gamma: f32,
    pub seed: u64,
}

impl Case {
    /// Llama-3-8B heads, 64 text tokens, gamma 0.85.
    pub fn new(batch: usize, visual: usize, kv_layout: KvLayout) -> Self {
        Case {
            dims: LLAMA3_8B,
            batch,
            text: TEXT,
            visual,
            kv_layout,
            gamma: DEFAULT_GAMMA,
            seed: 0x7e_47_5e,
        }
    }

    pub fn with_text(mut self, text: usize) -> Self {
        self.text = text;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `B1 T64 N2880 bshd g0.85`.
    pub fn label(&self) -> String {
        format!(
            "B{} T{} N{} {} g{}",
            self.batch,
            self.text,
            self.visual,
            self.kv_layout.name(),
            self.gamma
        )
    }

    /// `[B, T, Hq, D]`, contiguous.
    pub fn q_layout(&self) -> Layout<4> {
        Layout::contiguous([self.batch, self.text, self.dims.q_heads, self.dims.head_dim])
    }

    /// `[B, N, Hkv, D]` in the case's memory order.
    pub fn k_layout(&self) -> Layout<4> {
        self.kv_layout.layout(
            self.batch,
            self.visual,
            self.dims.kv_heads,
            self.dims.head_dim,
        )
    }

    /// Every row full.
    pub fn lengths(&self) -> Lengths {
        Lengths::full(self.batch, self.text, self.visual)
    }

    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        floor_bytes(self, elem_bytes)
    }
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub lengths: Lengths,
    pub q: Vec<T>,
    pub k: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn q_view(&self) -> View<'_, T, 4> {
        View::new(&self.q, self.case.q_layout()).expect("generated to fit")
    }

    pub fn k_view(&self) -> View<'_, T, 4> {
        View::new(&self.k, self.case.k_layout()).expect("generated to fit")
    }
}

/// The queries and keys of `case` (see the module docs).
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let mut r = rng(case.seed);
    let (q, k) = attention_inputs(&mut r, case);
    Input {
        case: *case,
        lengths: case.lengths(),
        q,
        k,
    }
}

/// Structured `q` and `k` (module docs) in the layouts of `case`.
pub fn attention_inputs<T: Element>(r: &mut StdRng, case: &Case) -> (Vec<T>, Vec<T>) {
    let ModelDims {
        q_heads,
        kv_heads,
        head_dim: d,
        ..
    } = case.dims;
    let g = q_heads / kv_heads;
    let (ql, kl) = (case.q_layout(), case.k_layout());
    let mut q = vec![T::from_f32(0.0); ql.span()];
    let mut k = vec![T::from_f32(0.0); kl.span()];
    let side = (case.visual as f64).sqrt().ceil().max(1.0) as usize;
    for b in 0..case.batch {
        let u: Vec<f32> = (0..kv_heads * d)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        for j in 0..case.text {
            for h in 0..q_heads {
                let off = ql.offset([b, j, h, 0]);
                for (e, o) in q[off..off + d].iter_mut().enumerate() {
                    *o = T::from_f32(0.5 * u[(h / g) * d + e] + r.random_range(-1.0..1.0));
                }
            }
        }
        let blobs: Vec<(f64, f64, f64)> = (0..r.random_range(1..=3))
            .map(|_| {
                let rad = side as f64 * r.random_range(0.08..0.2);
                (
                    r.random_range(0.0..side as f64),
                    r.random_range(0.0..side as f64),
                    rad,
                )
            })
            .collect();
        for i in 0..case.visual {
            let (gy, gx) = ((i / side) as f64, (i % side) as f64);
            let lift = 3.0
                * blobs
                    .iter()
                    .map(|&(cy, cx, rad)| {
                        (-((gy - cy).powi(2) + (gx - cx).powi(2)) / (2.0 * rad * rad)).exp()
                    })
                    .fold(0.0, f64::max) as f32;
            for kvh in 0..kv_heads {
                let off = kl.offset([b, i, kvh, 0]);
                for (e, o) in k[off..off + d].iter_mut().enumerate() {
                    *o = T::from_f32(
                        0.5 * r.random_range(-1.0f32..1.0) + 0.5 * lift * u[kvh * d + e],
                    );
                }
            }
        }
    }
    (q, k)
}

/// Bytes text_guided_select must move: q and k read once, the lengths read,
/// the kept indices `[B, N]` i32 and counts `[B]` written (no scores output;
/// A is never materialised, so it costs nothing here).
pub fn floor_bytes(case: &Case, elem_bytes: usize) -> u64 {
    let ModelDims {
        q_heads,
        kv_heads,
        head_dim,
        ..
    } = case.dims;
    let b = case.batch;
    let q = b * case.text * q_heads * head_dim * elem_bytes;
    let k = b * case.visual * kv_heads * head_dim * elem_bytes;
    (q + k + 2 * b * 4 + b * case.visual * 4 + b * 4) as u64
}

/// The unfused framework computation (FocusLLaVA's PyTorch code): per row,
/// the queries and `repeat_kv` keys upcast to f32, the logits `q . k /
/// sqrt(D)` materialised as `A [Hq, T, N]`, a softmax over `N` into a new
/// `[Hq, T, N]`, the max over heads `[T, N]`, the mean over text tokens
/// `S [N]`, a full stable argsort of `S` descending, its f32 cumsum, the
/// first position whose cumsum exceeds `gamma * sum(S)`, and a sort of the
/// kept indices ascending. Returns the padded indices `[B, N]` (-1 past the
/// count), the counts and `S [B, N]`.
pub fn baseline<T: Element>(
    q: View<'_, T, 4>,
    k: View<'_, T, 4>,
    lengths: &Lengths,
    gamma: f32,
) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
    let [b, _, hq, d] = q.shape();
    let [_, n_cap, hkv, _] = k.shape();
    let g = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let mut keep = vec![-1i32; b * n_cap];
    let mut count = vec![0i32; b];
    let mut scores = vec![0f32; b * n_cap];
    for bi in 0..b {
        let (t, n) = (lengths.t_len()[bi], lengths.n_len()[bi]);
        // q.to(f32): [Hq, T, D]; repeat_kv(k).to(f32): [Hq, N, D]
        let mut qf = vec![0f32; hq * t * d];
        for h in 0..hq {
            for j in 0..t {
                for (o, x) in qf[(h * t + j) * d..][..d]
                    .iter_mut()
                    .zip(q.row([bi, j, h, 0]))
                {
                    *o = x.to_f32();
                }
            }
        }
        let mut kx = vec![0f32; hq * n * d];
        for h in 0..hq {
            for i in 0..n {
                for (o, x) in kx[(h * n + i) * d..][..d]
                    .iter_mut()
                    .zip(k.row([bi, i, h / g, 0]))
                {
                    *o = x.to_f32();
                }
            }
        }
        // A = q @ k^T * scale: [Hq, T, N]
        let mut a = vec![0f32; hq * t * n];
        for h in 0..hq {
            for j in 0..t {
                let qr = &qf[(h * t + j) * d..][..d];
                for i in 0..n {
                    let kr = &kx[(h * n + i) * d..][..d];
                    a[(h * t + j) * n + i] =
                        scale * qr.iter().zip(kr).map(|(x, y)| x * y).sum::<f32>();
                }
            }
        }
        // softmax over N: a new [Hq, T, N]
        let mut p = vec![0f32; hq * t * n];
        for (src, dst) in a.chunks_exact(n.max(1)).zip(p.chunks_exact_mut(n.max(1))) {
            let m = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = src.iter().map(|&x| (x - m).exp()).sum();
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = (x - m).exp() / sum;
            }
        }
        // max over heads: [T, N]
        let mut mx = vec![f32::NEG_INFINITY; t * n];
        for h in 0..hq {
            for (o, &v) in mx.iter_mut().zip(&p[h * t * n..][..t * n]) {
                *o = o.max(v);
            }
        }
        // mean over text tokens: S [N]
        let s = &mut scores[bi * n_cap..][..n];
        if t > 0 {
            for j in 0..t {
                for (o, &v) in s.iter_mut().zip(&mx[j * n..][..n]) {
                    *o += v;
                }
            }
            for o in s.iter_mut() {
                *o /= t as f32;
            }
        }
        // argsort descending (stable), cumsum, the first prefix over gamma * sum
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
        let total: f32 = s.iter().sum();
        let mut acc = 0f32;
        let kept_n = order
            .iter()
            .position(|&i| {
                acc += s[i];
                acc > gamma * total
            })
            .map_or(n, |p| p + 1);
        let mut kept = order[..kept_n].to_vec();
        kept.sort_unstable();
        for (slot, &i) in keep[bi * n_cap..].iter_mut().zip(&kept) {
            *slot = i as i32;
        }
        count[bi] = kept_n as i32;
    }
    (keep, count, scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::text_guided_select::cpu;
    use foveal::ViewMut;
    use half::bf16;

    fn foveal_cpu(input: &Input<bf16>) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
        let (b, n) = (input.case.batch, input.case.visual);
        let (mut keep, mut count, mut scores) = (
            vec![i32::MIN; b * n],
            vec![i32::MIN; b],
            vec![f32::NAN; b * n],
        );
        cpu::text_guided_select(
            input.q_view(),
            input.k_view(),
            &input.lengths,
            input.case.gamma,
            &mut ViewMut::contiguous(&mut keep, [b, n]).unwrap(),
            &mut ViewMut::contiguous(&mut count, [b]).unwrap(),
            Some(&mut ViewMut::contiguous(&mut scores, [b, n]).unwrap()),
        )
        .unwrap();
        (keep, count, scores)
    }

    #[test]
    fn baseline_matches_foveal() {
        for (i, layout) in KvLayout::ALL.into_iter().enumerate() {
            let case = Case::new(2, 100, layout).with_text(5).with_seed(i as u64);
            let input = generate::<bf16>(&case);
            let (keep, count, scores) = foveal_cpu(&input);
            let (bk, bc, bs) = baseline(input.q_view(), input.k_view(), &input.lengths, case.gamma);
            for (g, w) in bs.iter().zip(&scores) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs() + 1e-7,
                    "{case:?}: S {g} vs {w}"
                );
            }
            // The f32 cumsum may cross the threshold one token away from foveal's exact sums.
            for row in 0..case.batch {
                let (nb, nf) = (bc[row] as usize, count[row] as usize);
                assert!(
                    nb.abs_diff(nf) <= 1,
                    "{case:?}: row {row} keeps {nb} vs {nf}"
                );
                if nb == nf {
                    assert_eq!(
                        bk[row * 100..][..nb],
                        keep[row * 100..][..nf],
                        "{case:?}: row {row}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_concentrates() {
        let case = Case::new(1, 576, KvLayout::Bshd).with_text(4);
        let input = generate::<bf16>(&case);
        let (_, count, _) = foveal_cpu(&input);
        let share = count[0] as f64 / 576.0;
        assert!((0.1..0.8).contains(&share), "keeps {share}");
    }
}
