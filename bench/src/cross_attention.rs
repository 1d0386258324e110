//! Inputs, floors and baseline of the cross_attention benchmarks.
//!
//! A case is VISOR's cross-attention (issue 13's shapes): the text queries
//! `q [B, Nq, Hq, D]` of a question over the visual tokens `k, v
//! [B, Nk, Hkv, D]` of 1 to 10 LLaVA-OneVision crops (729 tokens each), with
//! LLaVA-OneVision-0.5B heads ([`ONEVISION_05B`]: 14 query / 2 KV, D 64) or
//! 7B-like heads ([`QWEN25_VL_7B`]: 28 / 4, D 128); every row full; values
//! uniform in [-1, 1). `Nq = 1` is a decode step.
//!
//! The floors ([`Case::flops`], [`Case::floor_bytes`]) are what any kernel
//! must do: `4 B Hq Nq Nk D` FLOPs (Q K^T and P V), and q read, o written,
//! k and v read once per KV head (a GQA group shares one read). The GPU
//! benchmark reports TFLOP/s against the measured bf16 matrix rate and GB/s
//! against the copy bandwidth, whichever bounds the case ([`Case::bound`]).
//!
//! Glance2Gaze's Gaze Compression is the same op ([`GAZE_SCHEDULES`],
//! [`GazeStep`]): at each layer from r on, the first `p_l` rows of a shared
//! query pool attend over the visual tokens the previous layer kept, with
//! LLaVA-1.5-7B's heads ([`LLAVA15_7B`]: 32 / 32, D 128), one image of 576
//! tokens, Table 7's schedules.

use foveal::{Element, Layout, SeqLens, View};

use crate::{random_elems, rng, KvLayout, ModelDims, QWEN25_VL_7B};

/// LLaVA-OneVision-0.5B's language model (Qwen2-0.5B): 24 layers, 14 query
/// heads, 2 KV heads, head dim 64.
pub const ONEVISION_05B: ModelDims = ModelDims {
    layers: 24,
    q_heads: 14,
    kv_heads: 2,
    head_dim: 64,
};

/// The sweeps of issue 13: query tokens (1: decode), visual tokens (1, 4 and
/// 10 crops of 27 x 27), batch sizes.
pub const QUERIES: [usize; 5] = [1, 16, 64, 256, 512];
pub const KEYS: [usize; 3] = [729, 2916, 7290];
pub const BATCHES: [usize; 2] = [1, 8];

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub dims: ModelDims,
    pub batch: usize,
    /// Query tokens `Nq` per row.
    pub queries: usize,
    /// Visual tokens `Nk` per row.
    pub keys: usize,
    pub kv_layout: KvLayout,
    pub seed: u64,
}

/// What bounds a case on a machine: its compute floor or its bytes floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Compute,
    Memory,
}

impl Case {
    pub fn new(dims: ModelDims, batch: usize, queries: usize, keys: usize) -> Self {
        Case {
            dims,
            batch,
            queries,
            keys,
            kv_layout: KvLayout::Bshd,
            seed: 0xc4_05_5a,
        }
    }

    pub fn with_layout(mut self, kv_layout: KvLayout) -> Self {
        self.kv_layout = kv_layout;
        self
    }

    /// `Hq14 Hkv2 D64 B1 Nq16 Nk729 bshd`.
    pub fn label(&self) -> String {
        format!(
            "Hq{} Hkv{} D{} B{} Nq{} Nk{} {}",
            self.dims.q_heads,
            self.dims.kv_heads,
            self.dims.head_dim,
            self.batch,
            self.queries,
            self.keys,
            self.kv_layout.name()
        )
    }

    /// `[B, Nq, Hq, D]`, contiguous (q and o).
    pub fn q_layout(&self) -> Layout<4> {
        Layout::contiguous([
            self.batch,
            self.queries,
            self.dims.q_heads,
            self.dims.head_dim,
        ])
    }

    /// `[B, Nk, Hkv, D]` in the case's memory order (k and v).
    pub fn kv_layout(&self) -> Layout<4> {
        self.kv_layout.layout(
            self.batch,
            self.keys,
            self.dims.kv_heads,
            self.dims.head_dim,
        )
    }

    /// Every row full.
    pub fn lens(&self) -> SeqLens {
        SeqLens::full(self.batch, self.queries, self.keys)
    }

    /// `4 B Hq Nq Nk D`: the multiply-adds of Q K^T and P V, twice.
    pub fn flops(&self) -> u64 {
        let ModelDims {
            q_heads, head_dim, ..
        } = self.dims;
        (4 * self.batch * q_heads * self.queries * self.keys * head_dim) as u64
    }

    /// q read and o written once, k and v read once per KV head.
    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        let ModelDims {
            q_heads,
            kv_heads,
            head_dim,
            ..
        } = self.dims;
        let per_row = 2 * self.queries * q_heads * head_dim + 2 * self.keys * kv_heads * head_dim;
        (self.batch * per_row * elem_bytes) as u64
    }

    /// The case's floor in seconds on a machine of `flops_per_s` (matrix
    /// rate) and `bytes_per_s` (copy bandwidth, read + write), and which one
    /// it is.
    pub fn bound(&self, elem_bytes: usize, flops_per_s: f64, bytes_per_s: f64) -> (f64, Bound) {
        let compute = self.flops() as f64 / flops_per_s;
        let memory = self.floor_bytes(elem_bytes) as f64 / bytes_per_s;
        if compute > memory {
            (compute, Bound::Compute)
        } else {
            (memory, Bound::Memory)
        }
    }
}

/// Every case of issue 13's sweep for `dims`, in the flash/vLLM memory order.
pub fn sweep(dims: ModelDims) -> Vec<Case> {
    let mut out = Vec::new();
    for batch in BATCHES {
        for queries in QUERIES {
            for keys in KEYS {
                out.push(Case::new(dims, batch, queries, keys));
            }
        }
    }
    out
}

/// The two head shapes of the sweep.
pub const HEADS: [ModelDims; 2] = [ONEVISION_05B, QWEN25_VL_7B];

/// LLaVA-1.5-7B's language model (Vicuna-7B): 32 layers, 32 query heads
/// and as many KV heads (no GQA), head dim 128.
pub const LLAVA15_7B: ModelDims = ModelDims {
    layers: 32,
    q_heads: 32,
    kv_heads: 32,
    head_dim: 128,
};

/// LLaVA-1.5's visual tokens per image (24 x 24 at 336px): the keys of the
/// first Gaze Compression step.
pub const LLAVA15_TOKENS: usize = 576;

/// A Glance2Gaze compression schedule for LLaVA-1.5-7B (seeds/000, Table
/// 7): from decoder layer `first_layer` (the paper's r, layers numbered 1 to
/// 32) on, layer `l` keeps `tokens[l - r]` visual tokens (the paper's p_l).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GazeSchedule {
    /// The schedule's FLOPs against dense, as Table 7 names it.
    pub name: &'static str,
    pub first_layer: usize,
    pub tokens: &'static [usize],
}

/// Table 7's three schedules (33%, 22% and 11% of the dense FLOPs).
pub const GAZE_SCHEDULES: [GazeSchedule; 3] = [
    GazeSchedule {
        name: "33%",
        first_layer: 9,
        tokens: &[
            256, 209, 170, 139, 114, 93, 76, 62, 50, 41, 33, 27, 22, 18, 15, 12, 10, 8, 6, 5, 4, 3,
            2, 2,
        ],
    },
    GazeSchedule {
        name: "22%",
        first_layer: 7,
        tokens: &[
            121, 103, 88, 75, 64, 54, 46, 40, 34, 29, 24, 21, 18, 15, 13, 11, 9, 8, 7, 6, 5, 4, 3,
            3, 2, 2,
        ],
    },
    GazeSchedule {
        name: "11%",
        first_layer: 3,
        tokens: &[
            100, 87, 77, 67, 59, 52, 45, 40, 35, 30, 27, 23, 20, 18, 16, 14, 12, 10, 9, 8, 7, 6, 5,
            4, 4, 3, 3, 2, 2, 2,
        ],
    },
];

/// One layer's Gaze Compression step: `p_l` pooled queries attending over
/// the visual tokens the previous layer kept (576 at layer r), one image,
/// LLaVA-1.5-7B's heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GazeStep {
    pub schedule: &'static str,
    /// Decoder layer, 1 to 32.
    pub layer: usize,
    pub case: Case,
}

impl GazeStep {
    /// `G2G 33% L9 Hq32 Hkv32 D128 B1 Nq256 Nk576 bshd`.
    pub fn label(&self) -> String {
        format!(
            "G2G {} L{} {}",
            self.schedule,
            self.layer,
            self.case.label()
        )
    }
}

impl GazeSchedule {
    /// The schedule's steps, layer by layer: queries `p_l`, keys `p_{l-1}`
    /// (576 at the first).
    pub fn steps(&self) -> Vec<GazeStep> {
        let mut keys = LLAVA15_TOKENS;
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let step = GazeStep {
                    schedule: self.name,
                    layer: self.first_layer + i,
                    case: Case::new(LLAVA15_7B, 1, p, keys),
                };
                keys = p;
                step
            })
            .collect()
    }
}

/// Host tensors of a case.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub case: Case,
    pub lens: SeqLens,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
}

impl<T: Element> Input<T> {
    pub fn q_view(&self) -> View<'_, T, 4> {
        View::new(&self.q, self.case.q_layout()).expect("generated to fit")
    }

    pub fn k_view(&self) -> View<'_, T, 4> {
        View::new(&self.k, self.case.kv_layout()).expect("generated to fit")
    }

    pub fn v_view(&self) -> View<'_, T, 4> {
        View::new(&self.v, self.case.kv_layout()).expect("generated to fit")
    }
}

/// The tensors of `case`: uniform in [-1, 1).
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let mut r = rng(case.seed);
    let (ql, kl) = (case.q_layout(), case.kv_layout());
    Input {
        case: *case,
        lens: case.lens(),
        q: random_elems(&mut r, ql.span(), -1.0, 1.0),
        k: random_elems(&mut r, kl.span(), -1.0, 1.0),
        v: random_elems(&mut r, kl.span(), -1.0, 1.0),
    }
}

/// The naive framework computation, in f32: `repeat_kv` (the KV heads
/// copied out to every query head), then per row and head `S = scale Q K^T`
/// materialised `[Nq, Nk]`, a row softmax, `O = P V`, into `o [B, Nq, Hq, D]`
/// contiguous.
pub fn baseline<T: Element>(input: &Input<T>, o: &mut [T]) {
    let case = &input.case;
    let ModelDims {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        ..
    } = case.dims;
    let (nq, nk, g) = (case.queries, case.keys, hq / hkv);
    let scale = 1.0 / (d as f32).sqrt();
    let (q, k, v) = (input.q_view(), input.k_view(), input.v_view());
    assert_eq!(o.len(), case.batch * nq * hq * d, "o is [B, Nq, Hq, D]");
    let mut s = vec![0f32; nq * nk];
    for b in 0..case.batch {
        // repeat_kv: [Hq, Nk, D] f32 copies
        let rep = |t: &View<'_, T, 4>| -> Vec<f32> {
            (0..hq)
                .flat_map(|h| (0..nk).flat_map(move |j| (0..d).map(move |e| (h, j, e))))
                .map(|(h, j, e)| t.at([b, j, h / g, e]).to_f32())
                .collect()
        };
        let (kr, vr) = (rep(&k), rep(&v));
        for h in 0..hq {
            for i in 0..nq {
                let qi = q.row([b, i, h, 0]);
                for j in 0..nk {
                    let kj = &kr[(h * nk + j) * d..(h * nk + j + 1) * d];
                    s[i * nk + j] =
                        scale * qi.iter().zip(kj).map(|(a, c)| a.to_f32() * c).sum::<f32>();
                }
                let row = &mut s[i * nk..(i + 1) * nk];
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = row
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                row.iter_mut().for_each(|x| *x /= z);
            }
            for i in 0..nq {
                let out = &mut o[((b * nq + i) * hq + h) * d..((b * nq + i) * hq + h + 1) * d];
                let mut acc = vec![0f32; d];
                for j in 0..nk {
                    let p = s[i * nk + j];
                    let vj = &vr[(h * nk + j) * d..(h * nk + j + 1) * d];
                    acc.iter_mut().zip(vj).for_each(|(a, x)| *a += p * x);
                }
                out.iter_mut()
                    .zip(&acc)
                    .for_each(|(x, a)| *x = T::from_f32(*a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foveal::cross_attention::cpu;
    use foveal::ViewMut;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal() {
        let dims = ModelDims {
            layers: 1,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        for case in [
            Case::new(dims, 2, 3, 29),
            Case::new(dims, 1, 1, 40).with_layout(KvLayout::Bhsd),
        ] {
            let input = generate::<bf16>(&case);
            let n = case.q_layout().numel();
            let mut want = vec![bf16::ZERO; n];
            cpu::cross_attention(
                input.q_view(),
                input.k_view(),
                input.v_view(),
                &input.lens,
                None,
                &mut ViewMut::contiguous(&mut want, case.q_layout().shape()).unwrap(),
                None,
            )
            .unwrap();
            let mut got = vec![bf16::ZERO; n];
            baseline(&input, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!((g.to_f32() - w.to_f32()).abs() <= 1e-2 * w.to_f32().abs().max(0.05));
            }
        }
    }

    #[test]
    fn floors_of_the_sweep() {
        let c = Case::new(QWEN25_VL_7B, 8, 512, 7290);
        assert_eq!(c.flops(), 4 * 8 * 28 * 512 * 7290 * 128);
        assert_eq!(
            c.floor_bytes(2),
            (8 * (2 * 512 * 28 * 128 + 2 * 7290 * 4 * 128) * 2) as u64
        );
        // H200: compute-bound at Nq 512, memory-bound in decode
        assert_eq!(c.bound(2, 790e12, 4.3e12).1, Bound::Compute);
        let d = Case::new(QWEN25_VL_7B, 8, 1, 7290);
        assert_eq!(d.bound(2, 790e12, 4.3e12).1, Bound::Memory);
        assert_eq!(sweep(ONEVISION_05B).len(), 30);
    }

    #[test]
    fn gaze_schedules_cover_the_layers_after_r() {
        for s in GAZE_SCHEDULES {
            let steps = s.steps();
            // Table 7: one p_l per layer from r to the last (1-based).
            assert_eq!(
                s.first_layer + steps.len() - 1,
                LLAVA15_7B.layers,
                "{}",
                s.name
            );
            assert_eq!(steps[0].case.keys, LLAVA15_TOKENS);
            assert_eq!(steps[0].layer, s.first_layer);
            for w in steps.windows(2) {
                assert_eq!(
                    w[1].case.keys, w[0].case.queries,
                    "keys: the previous layer's tokens"
                );
                assert!(
                    w[1].case.queries <= w[0].case.queries,
                    "the schedule never grows"
                );
                assert_eq!(w[1].layer, w[0].layer + 1);
            }
            assert!(steps
                .iter()
                .all(|t| t.case.batch == 1 && t.case.dims == LLAVA15_7B));
        }
        let labels: std::collections::BTreeSet<String> = GAZE_SCHEDULES
            .iter()
            .flat_map(|s| s.steps())
            .map(|t| t.label())
            .collect();
        assert_eq!(labels.len(), 24 + 26 + 30, "one distinct label per step");
        assert_eq!(
            GAZE_SCHEDULES[0].steps()[1].label(),
            "G2G 33% L10 Hq32 Hkv32 D128 B1 Nq209 Nk256 bshd"
        );
    }
}
