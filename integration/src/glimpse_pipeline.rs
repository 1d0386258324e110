//! The GlimpsePrune kernel pipeline on a synthetic batch: glimpse_scores at
//! layer K, a stand-in importance predictor, select_keep, keep_positions and
//! one compact_kv over the caches of layers 0..K plus the gather of the hidden
//! states and position ids.
//!
//! The batch is built so that the right answer is known: a planted set of
//! "salient" visual tokens has keys aligned with the glimpse query, so the
//! glimpse attends to them and a sound pipeline keeps them. The stand-in
//! predictor standardises the head-mean log-attention of each row (the real
//! Visual Importance Predictor is a small model, built in this crate with the
//! decoder).

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use foveal::compact_kv::cpu as compact_cpu;
use foveal::glimpse_scores::cpu::glimpse_scores;
use foveal::select_keep::cpu::select_keep;
use foveal::{
    KeepPositions, KeepRule, KeepSet, Layout, Padding, Result, RowLayout, RowSpec, ScoreMode, View,
    ViewMut,
};

/// Sizes of the synthetic model and batch.
#[derive(Debug, Clone)]
pub struct Config {
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    /// Per row: (text before, image sizes with text between, question length).
    pub rows: Vec<(usize, Vec<usize>, usize)>,
    /// Fraction of each image's tokens planted as salient.
    pub salient_fraction: f64,
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layers: 4,
            q_heads: 8,
            kv_heads: 2,
            head_dim: 64,
            hidden: 96,
            rows: vec![
                (12, vec![144, 64], 9),
                (5, vec![256], 14),
                (3, vec![36, 36, 36], 6),
            ],
            salient_fraction: 0.15,
            seed: 7,
        }
    }
}

/// A synthetic batch: caches of layers 0..=K in the candle/HF layout
/// `[B, Hkv, S, D]`, the glimpse queries, hidden states and position ids.
pub struct Batch {
    pub cfg: Config,
    pub rows: RowLayout,
    pub salient: Vec<Vec<usize>>,
    pub q: Vec<bf16>,
    pub k: Vec<Vec<bf16>>,
    pub v: Vec<Vec<bf16>>,
    pub hidden: Vec<f32>,
    pub position_ids: Vec<i32>,
}

impl Batch {
    pub fn new(cfg: Config) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let lens: Vec<usize> = cfg
            .rows
            .iter()
            .map(|(pre, imgs, post)| pre + imgs.iter().sum::<usize>() + 2 * imgs.len() + post + 1)
            .collect();
        let seq = *lens.iter().max().expect("at least one row");
        let (mut specs, mut salient) = (Vec::new(), Vec::new());
        for ((pre, imgs, _), len) in cfg.rows.iter().zip(&lens) {
            let start = seq - len; // left-padded rows, as batched prefill does
            let (mut visual, mut sal, mut p) = (Vec::new(), Vec::new(), start + pre);
            for &n in imgs {
                p += 1; // <image_start>
                for _ in 0..n {
                    if rng.random_bool(cfg.salient_fraction) {
                        sal.push(p);
                    }
                    visual.push(p);
                    p += 1;
                }
                p += 1; // <image_end>
            }
            specs.push(RowSpec {
                start,
                end: seq,
                visual,
            });
            salient.push(sal);
        }
        let rows = RowLayout::new(seq, &specs)?;
        let (b, hq, hkv, d, l) = (
            specs.len(),
            cfg.q_heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.layers,
        );
        let mut normal = |scale: f32| -> f32 {
            scale * (rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5)
        };
        let q: Vec<f32> = (0..b * hq * d).map(|_| normal(1.0)).collect();
        let kv_len = b * hkv * seq * d;
        let mut k: Vec<Vec<f32>> = (0..=l)
            .map(|_| (0..kv_len).map(|_| normal(1.0)).collect())
            .collect();
        let v: Vec<Vec<bf16>> = (0..=l)
            .map(|_| (0..kv_len).map(|_| bf16::from_f32(normal(1.0))).collect())
            .collect();
        // Salient keys of layer K lean towards the mean query of their group.
        let g = hq / hkv;
        for (bi, sal) in salient.iter().enumerate() {
            for &p in sal {
                for kh in 0..hkv {
                    for e in 0..d {
                        let mean_q: f32 = (0..g)
                            .map(|j| q[(bi * hq + kh * g + j) * d + e])
                            .sum::<f32>()
                            / g as f32;
                        k[l][((bi * hkv + kh) * seq + p) * d + e] += 1.5 * mean_q;
                    }
                }
            }
        }
        let to_bf16 = |x: &[f32]| x.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>();
        let hidden: Vec<f32> = (0..b * seq * cfg.hidden).map(|_| normal(1.0)).collect();
        // Position ids restart at 0 at each row's first valid token.
        let starts: Vec<i32> = specs.iter().map(|s| s.start as i32).collect();
        let position_ids = starts
            .iter()
            .flat_map(|&s0| (0..seq as i32).map(move |p| (p - s0).max(0)))
            .collect();
        Ok(Batch {
            q: to_bf16(&q),
            k: k.iter().map(|x| to_bf16(x)).collect(),
            v,
            hidden,
            position_ids,
            rows,
            salient,
            cfg,
        })
    }

    pub fn batch(&self) -> usize {
        self.rows.batch()
    }

    pub fn kv_layout(&self) -> Layout<4> {
        Layout::bhsd(
            self.batch(),
            self.rows.seq(),
            self.cfg.kv_heads,
            self.cfg.head_dim,
        )
    }
}

/// The stand-in importance predictor: per row, the head-mean score
/// standardised over the row's visual tokens (a logit of 0 is the row mean).
pub fn importance_logits(scores: &[f32], rows: &RowLayout, q_heads: usize) -> Vec<f32> {
    let nv_max = rows.nv_max();
    let mut out = vec![0.0; rows.batch() * nv_max];
    for b in 0..rows.batch() {
        let nv = rows.nv(b);
        let m: Vec<f32> = (0..nv)
            .map(|i| {
                scores[(b * nv_max + i) * q_heads..][..q_heads]
                    .iter()
                    .sum::<f32>()
                    / q_heads as f32
            })
            .collect();
        let mean = m.iter().sum::<f32>() / nv.max(1) as f32;
        let std = (m.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / nv.max(1) as f32)
            .sqrt()
            .max(1e-6);
        for i in 0..nv {
            out[b * nv_max + i] = (m[i] - mean) / std;
        }
    }
    out
}

/// What the pipeline produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub scores: Vec<f32>,
    pub keep: KeepSet,
    pub positions: KeepPositions,
    /// Compacted caches `[B, Hkv, S_new, D]` of layers 0..K (K then V).
    pub k: Vec<Vec<bf16>>,
    pub v: Vec<Vec<bf16>>,
    pub hidden: Vec<f32>,
    pub position_ids: Vec<i32>,
}

/// The keep rule of the main job: above-average importance, at most half.
pub fn keep_rule() -> KeepRule {
    KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.5),
        min_keep: 1,
    }
}

/// Runs the pipeline with the CPU references.
pub fn run_cpu(batch: &Batch, rule: &KeepRule) -> Result<Outcome> {
    let (b, seq, cfg) = (batch.batch(), batch.rows.seq(), &batch.cfg);
    let (hq, nv_max) = (cfg.q_heads, batch.rows.nv_max());
    let mut scores = vec![0.0f32; b * nv_max * hq];
    let q = View::new(&batch.q, Layout::contiguous([b, hq, cfg.head_dim]))?;
    let k_last = View::new(&batch.k[cfg.layers], batch.kv_layout())?;
    glimpse_scores(
        q,
        k_last,
        &batch.rows,
        None,
        ScoreMode::LogSoftmax,
        &mut ViewMut::contiguous(&mut scores, [b, nv_max, hq])?,
    )?;

    let logits = importance_logits(&scores, &batch.rows, hq);
    let mut keep = KeepSet::new(&batch.rows);
    select_keep(
        View::contiguous(&logits, [b, nv_max])?,
        &batch.rows,
        rule,
        &mut keep,
    )?;
    let mut positions = KeepPositions::for_rows(&batch.rows, true);
    compact_cpu::keep_positions(&batch.rows, &keep, true, &mut positions)?;

    // One compaction over the caches of layers 0..K (layer K's own cache
    // is compacted too: the remaining layers attend to it).
    let s_new = positions.max_len();
    let dst_layout = Layout::bhsd(b, s_new, cfg.kv_heads, cfg.head_dim);
    let n = dst_layout.span();
    let (mut k_out, mut v_out) = (
        vec![vec![bf16::ZERO; n]; cfg.layers + 1],
        vec![vec![bf16::ZERO; n]; cfg.layers + 1],
    );
    let mut kd: Vec<_> = k_out
        .iter_mut()
        .map(|x| ViewMut::new(x, dst_layout))
        .collect::<Result<_>>()?;
    let mut vd: Vec<_> = v_out
        .iter_mut()
        .map(|x| ViewMut::new(x, dst_layout))
        .collect::<Result<_>>()?;
    compact_cpu::compact_kv(
        &views(&batch.k, batch.kv_layout())?,
        &views(&batch.v, batch.kv_layout())?,
        &positions,
        Padding::Left,
        &mut kd,
        &mut vd,
    )?;

    let mut hidden = vec![0.0f32; b * s_new * cfg.hidden];
    compact_cpu::gather_rows(
        &[View::contiguous(&batch.hidden, [b, seq, cfg.hidden])?],
        &positions,
        Padding::Left,
        &mut [ViewMut::contiguous(&mut hidden, [b, s_new, cfg.hidden])?],
    )?;
    let mut position_ids = vec![0i32; b * s_new];
    compact_cpu::gather_rows(
        &[View::contiguous(&batch.position_ids, [b, seq, 1])?],
        &positions,
        Padding::Left,
        &mut [ViewMut::contiguous(&mut position_ids, [b, s_new, 1])?],
    )?;
    Ok(Outcome {
        scores,
        keep,
        positions,
        k: k_out,
        v: v_out,
        hidden,
        position_ids,
    })
}

fn views(caches: &[Vec<bf16>], layout: Layout<4>) -> Result<Vec<View<'_, bf16, 4>>> {
    caches.iter().map(|x| View::new(x, layout)).collect()
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! The same pipeline on the GPU, for comparison with [`super::run_cpu`].

    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaStream};
    use foveal::compact_kv::cuda as compact_cuda;
    use foveal::cuda::{
        DevView, DevViewMut, DeviceKeepPositions, DeviceKeepSet, DeviceRowLayout, Workspace,
    };
    use foveal::{Error, KeepRule, Layout, Padding, Result, ScoreMode};
    use half::bf16;

    use super::{importance_logits, Batch, Outcome};

    /// The first GPU, or None when there is none (or no driver).
    pub fn stream() -> Option<Arc<CudaStream>> {
        let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
            .ok()?
            .ok()?;
        Some(ctx.default_stream())
    }

    fn err(e: cudarc::driver::DriverError) -> Error {
        Error::Cuda {
            op: "glimpse_pipeline",
            msg: e.to_string(),
        }
    }

    fn dev_views(
        caches: &[cudarc::driver::CudaSlice<bf16>],
        layout: Layout<4>,
    ) -> Result<Vec<DevView<'_, bf16, 4>>> {
        caches.iter().map(|x| DevView::of(x, layout)).collect()
    }

    pub fn run(stream: &Arc<CudaStream>, batch: &Batch, rule: &KeepRule) -> Result<Outcome> {
        let (b, seq, cfg) = (batch.batch(), batch.rows.seq(), &batch.cfg);
        let (hq, nv_max) = (cfg.q_heads, batch.rows.nv_max());
        let rows = DeviceRowLayout::new(stream, &batch.rows)?;
        let mut ws = Workspace::new();
        let q = stream.clone_htod(&batch.q).map_err(err)?;
        let k: Vec<_> = batch
            .k
            .iter()
            .map(|x| stream.clone_htod(x))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;
        let v: Vec<_> = batch
            .v
            .iter()
            .map(|x| stream.clone_htod(x))
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;

        let mut scores = stream.alloc_zeros::<f32>(b * nv_max * hq).map_err(err)?;
        foveal::glimpse_scores::cuda::glimpse_scores(
            stream,
            &DevView::of(&q, Layout::contiguous([b, hq, cfg.head_dim]))?,
            &DevView::of(&k[cfg.layers], batch.kv_layout())?,
            &rows,
            None,
            ScoreMode::LogSoftmax,
            &mut DevViewMut::of(&mut scores, Layout::contiguous([b, nv_max, hq]))?,
            &mut ws,
        )?;
        // The stand-in predictor runs on the host; the real one is a model on the device.
        let scores_host = stream.clone_dtoh(&scores).map_err(err)?;
        let logits = stream
            .clone_htod(&importance_logits(&scores_host, &batch.rows, hq))
            .map_err(err)?;
        let mut keep = DeviceKeepSet::new(stream, &rows)?;
        foveal::select_keep::cuda::select_keep(
            stream,
            &DevView::of(&logits, Layout::contiguous([b, nv_max]))?,
            &rows,
            rule,
            &mut keep,
        )?;
        let mut positions = DeviceKeepPositions::for_rows(stream, &rows, true)?;
        compact_cuda::keep_positions(stream, &rows, &keep, true, &mut positions)?;

        // Size the caches to the new maximum length: an explicit readback.
        let s_new = positions.fetch_max_len(stream)?;
        let dst_layout = Layout::bhsd(b, s_new, cfg.kv_heads, cfg.head_dim);
        let alloc = || stream.alloc_zeros::<bf16>(dst_layout.span()).map_err(err);
        let mut k_out: Vec<_> = (0..=cfg.layers).map(|_| alloc()).collect::<Result<_>>()?;
        let mut v_out: Vec<_> = (0..=cfg.layers).map(|_| alloc()).collect::<Result<_>>()?;
        {
            let mut kd: Vec<_> = k_out
                .iter_mut()
                .map(|x| DevViewMut::of(x, dst_layout))
                .collect::<Result<_>>()?;
            let mut vd: Vec<_> = v_out
                .iter_mut()
                .map(|x| DevViewMut::of(x, dst_layout))
                .collect::<Result<_>>()?;
            compact_cuda::compact_kv(
                stream,
                &dev_views(&k, batch.kv_layout())?,
                &dev_views(&v, batch.kv_layout())?,
                &positions,
                Padding::Left,
                &mut kd,
                &mut vd,
            )?;
        }
        let hidden_in = stream.clone_htod(&batch.hidden).map_err(err)?;
        let mut hidden = stream
            .alloc_zeros::<f32>(b * s_new * cfg.hidden)
            .map_err(err)?;
        compact_cuda::gather_rows(
            stream,
            &[DevView::of(
                &hidden_in,
                Layout::contiguous([b, seq, cfg.hidden]),
            )?],
            &positions,
            Padding::Left,
            &mut [DevViewMut::of(
                &mut hidden,
                Layout::contiguous([b, s_new, cfg.hidden]),
            )?],
        )?;
        let pos_in = stream.clone_htod(&batch.position_ids).map_err(err)?;
        let mut position_ids = stream.alloc_zeros::<i32>(b * s_new).map_err(err)?;
        compact_cuda::gather_rows(
            stream,
            &[DevView::of(&pos_in, Layout::contiguous([b, seq, 1]))?],
            &positions,
            Padding::Left,
            &mut [DevViewMut::of(
                &mut position_ids,
                Layout::contiguous([b, s_new, 1]),
            )?],
        )?;
        let host = |x: &cudarc::driver::CudaSlice<bf16>| stream.clone_dtoh(x).map_err(err);
        Ok(Outcome {
            scores: scores_host,
            keep: keep.to_host(stream)?,
            positions: positions.to_host(stream)?,
            k: k_out.iter().map(host).collect::<Result<_>>()?,
            v: v_out.iter().map(host).collect::<Result<_>>()?,
            hidden: stream.clone_dtoh(&hidden).map_err(err)?,
            position_ids: stream.clone_dtoh(&position_ids).map_err(err)?,
        })
    }
}
