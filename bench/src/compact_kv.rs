//! Inputs and baseline of the compact_kv benchmarks.
//!
//! A case is the KV cache of the layers before the pruning layer (`layers`
//! K planes and as many V planes, each `[B, S, Hkv, D]` in either memory
//! order) and the positions to keep: every text token, a `keep_ratio` share
//! of each row's visual tokens (chosen by foveal's select_keep from
//! [`crate::select_keep::predictor_logits`], so they cluster as a real
//! importance map does), the glimpse token dropped. The destination holds the
//! longest compacted row (`Plan::keep.width()`).

use foveal::compact_kv::cpu;
use foveal::select_keep::cpu as select_cpu;
use foveal::{
    Element, KeepPositions, KeepRule, KeepSet, Layout, Padding, RowLayout, View, ViewMut,
};

use crate::rows::{vlm_rows, RowsConfig};
use crate::select_keep::predictor_logits;
use crate::{random_elems, rng, KvLayout, ModelDims, QWEN25_VL_7B};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    /// Heads and head dim; `layers` below says how many layers are compacted.
    pub dims: ModelDims,
    pub layers: usize,
    pub rows: RowsConfig,
    /// Share of each row's visual tokens kept (`floor(ratio * nv)`).
    pub keep_ratio: f64,
    pub kv_layout: KvLayout,
    /// The side of the destination's padded slots.
    pub padding: Padding,
    pub seed: u64,
}

impl Case {
    /// Qwen2.5-VL-7B heads, 25% of the visual tokens kept, right padding.
    pub fn new(layers: usize, batch: usize, nv: usize, kv_layout: KvLayout) -> Self {
        Case {
            dims: QWEN25_VL_7B,
            layers,
            rows: RowsConfig::new(batch, nv),
            keep_ratio: 0.25,
            kv_layout,
            padding: Padding::Right,
            seed: 0xc0_4a_c7,
        }
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// `L28 B4 Nv16384 keep25% bshd`.
    pub fn label(&self) -> String {
        format!(
            "L{} B{} Nv{} keep{}% {}",
            self.layers,
            self.rows.batch,
            self.rows.nv,
            (self.keep_ratio * 100.0).round(),
            self.kv_layout.name()
        )
    }
}

/// The index structures and layouts of a case, without data.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dims: ModelDims,
    pub layers: usize,
    pub rows: RowLayout,
    pub keep: KeepPositions,
    pub padding: Padding,
    pub kv_layout: KvLayout,
    /// `[B, S, Hkv, D]` view of each source plane.
    pub src_layout: Layout<4>,
    /// `[B, S_dst, Hkv, D]` view of each destination plane (`S_dst = keep.width()`).
    pub dst_layout: Layout<4>,
}

impl Plan {
    /// K and V planes together.
    pub fn planes(&self) -> usize {
        2 * self.layers
    }

    /// Elements of one source plane's storage.
    pub fn src_len(&self) -> usize {
        self.src_layout.span()
    }

    /// Elements of one destination plane's storage.
    pub fn dst_len(&self) -> usize {
        self.dst_layout.span()
    }

    /// The `[B, S, Hkv * D]` row view of a source plane, for the per-plane
    /// gather_rows baseline. Only the `[B, S, H, D]` memory order has one
    /// (its heads of a slot are contiguous); `None` for `[B, H, S, D]`.
    pub fn src_rows_layout(&self) -> Option<Layout<3>> {
        let [b, s, h, d] = self.src_layout.shape();
        (self.kv_layout == KvLayout::Bshd).then(|| Layout::contiguous([b, s, h * d]))
    }

    /// The `[B, S_dst, Hkv * D]` row view of a destination plane (see [`Plan::src_rows_layout`]).
    pub fn dst_rows_layout(&self) -> Option<Layout<3>> {
        let [b, s, h, d] = self.dst_layout.shape();
        (self.kv_layout == KvLayout::Bshd).then(|| Layout::contiguous([b, s, h * d]))
    }

    pub fn floor_bytes(&self, elem_bytes: usize) -> u64 {
        floor_bytes(self, elem_bytes)
    }
}

/// Host planes of a case: `k[l]`, `v[l]` are the layer-`l` sources.
#[derive(Debug, Clone)]
pub struct Input<T> {
    pub plan: Plan,
    pub k: Vec<Vec<T>>,
    pub v: Vec<Vec<T>>,
}

impl<T: Element> Input<T> {
    pub fn k_views(&self) -> Vec<View<'_, T, 4>> {
        self.k
            .iter()
            .map(|p| View::new(p, self.plan.src_layout).expect("generated to fit"))
            .collect()
    }

    pub fn v_views(&self) -> Vec<View<'_, T, 4>> {
        self.v
            .iter()
            .map(|p| View::new(p, self.plan.src_layout).expect("generated to fit"))
            .collect()
    }

    /// Zeroed destinations for the K and V planes (`layers` each).
    pub fn new_dst(&self) -> (Vec<Vec<T>>, Vec<Vec<T>>) {
        let n = self.plan.dst_len();
        let planes = || {
            (0..self.plan.layers)
                .map(|_| vec![T::default(); n])
                .collect()
        };
        (planes(), planes())
    }
}

/// Views over destination planes.
pub fn dst_views<'a, T: Element>(
    planes: &'a mut [Vec<T>],
    layout: Layout<4>,
) -> Vec<ViewMut<'a, T, 4>> {
    planes
        .iter_mut()
        .map(|p| ViewMut::new(p, layout).expect("sized by new_dst"))
        .collect()
}

/// The rows, keep positions and layouts of `case`.
pub fn plan(case: &Case) -> Plan {
    let mut r = rng(case.seed);
    let rows = vlm_rows(&mut r, &case.rows);
    let logits = predictor_logits(&mut r, &rows);
    // Threshold 0 passes every token; the ratio cap keeps the largest floor(ratio * nv).
    let rule = KeepRule {
        threshold: 0.0,
        max_ratio: Some(case.keep_ratio),
        min_keep: 1,
    };
    let mut keep_set = KeepSet::new(&rows);
    let logits_view =
        View::contiguous(&logits, [rows.batch(), rows.nv_max()]).expect("sized for rows");
    select_cpu::select_keep(logits_view, &rows, &rule, &mut keep_set).expect("valid rule");
    let mut wide = KeepPositions::for_rows(&rows, true);
    cpu::keep_positions(&rows, &keep_set, true, &mut wide).expect("sized by for_rows");
    // for_rows sizes the list for an uncompacted row; rebuild it at the
    // compacted width so that the destination is sized to the new maximum length.
    let lists: Vec<Vec<usize>> = (0..rows.batch())
        .map(|b| wide.row(b).iter().map(|&p| p as usize).collect())
        .collect();
    let keep = KeepPositions::from_rows(rows.seq(), &lists).expect("ascending, in range");
    let ModelDims {
        kv_heads, head_dim, ..
    } = case.dims;
    let b = rows.batch();
    Plan {
        dims: case.dims,
        layers: case.layers,
        padding: case.padding,
        kv_layout: case.kv_layout,
        src_layout: case.kv_layout.layout(b, rows.seq(), kv_heads, head_dim),
        dst_layout: case.kv_layout.layout(b, keep.width(), kv_heads, head_dim),
        keep,
        rows,
    }
}

/// The plan and random planes (uniform in [-1, 1), padding slots included) of `case`.
pub fn generate<T: Element>(case: &Case) -> Input<T> {
    let plan = plan(case);
    let mut r = rng(case.seed ^ 0x9e37_79b9_7f4a_7c15);
    let n = plan.src_len();
    let mut planes = || {
        (0..plan.layers)
            .map(|_| random_elems(&mut r, n, -1.0, 1.0))
            .collect::<Vec<_>>()
    };
    let (k, v) = (planes(), planes());
    Input { plan, k, v }
}

/// Bytes compact_kv must move: per plane, each row's kept entries read once
/// and the whole destination (kept entries and zeroed padding) written once;
/// plus the positions `[B, width]` and lengths `[B]` read once.
pub fn floor_bytes(plan: &Plan, elem_bytes: usize) -> u64 {
    let [b, dst_seq, h, d] = plan.dst_layout.shape();
    let entry = h * d * elem_bytes;
    let kept: usize = (0..b).map(|r| plan.keep.row(r).len()).sum();
    let per_plane = kept * entry + b * dst_seq * entry;
    (plan.planes() * per_plane + b * plan.keep.width() * 4 + b * 4) as u64
}

/// The per-layer loop: one foveal `gather_rows` call per plane (each layer's
/// K, then its V: `2L` calls), the shape of a loop of `index_select` calls
/// over the cache. Needs the `[B, S, H, D]` memory order (see [`Plan::src_rows_layout`]).
pub fn baseline<T: Element>(
    k: &[Vec<T>],
    v: &[Vec<T>],
    plan: &Plan,
    k_dst: &mut [Vec<T>],
    v_dst: &mut [Vec<T>],
) -> foveal::Result<()> {
    let src_layout = plan
        .src_rows_layout()
        .expect("the per-plane baseline needs the [B, S, H, D] memory order");
    let dst_layout = plan.dst_rows_layout().expect("as above");
    for l in 0..plan.layers {
        for (src, dst) in [(&k[l], &mut k_dst[l]), (&v[l], &mut v_dst[l])] {
            let s = View::new(src, src_layout)?;
            let mut d = ViewMut::new(dst, dst_layout)?;
            cpu::gather_rows(&[s], &plan.keep, plan.padding, std::slice::from_mut(&mut d))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn baseline_matches_foveal_and_keeps_a_quarter() {
        let mut case = Case::new(3, 2, 200, KvLayout::Bshd).with_seed(5);
        case.dims = ModelDims {
            layers: 3,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let input = generate::<bf16>(&case);
        let plan = &input.plan;
        for b in 0..2 {
            let nv = plan.rows.nv(b);
            let text = plan.rows.len(b) - nv - 1; // less the dropped glimpse token
            assert_eq!(plan.keep.row(b).len(), text + nv / 4);
        }
        let (mut k1, mut v1) = input.new_dst();
        {
            let (mut kd, mut vd) = (
                dst_views(&mut k1, plan.dst_layout),
                dst_views(&mut v1, plan.dst_layout),
            );
            cpu::compact_kv(
                &input.k_views(),
                &input.v_views(),
                &plan.keep,
                plan.padding,
                &mut kd,
                &mut vd,
            )
            .unwrap();
        }
        let (mut k2, mut v2) = input.new_dst();
        baseline(&input.k, &input.v, plan, &mut k2, &mut v2).unwrap();
        let bits = |p: &[Vec<bf16>]| p.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&k1), bits(&k2));
        assert_eq!(bits(&v1), bits(&v2));
    }

    #[test]
    fn floor_counts_kept_reads_and_full_writes() {
        let p = plan(&Case::new(16, 1, 1024, KvLayout::Bhsd));
        let entry = 4 * 128 * 2;
        let len = p.keep.row(0).len() as u64;
        assert_eq!(p.keep.width() as u64, len); // one row: the destination is exactly the kept length
        assert_eq!(p.floor_bytes(2), 32 * 2 * len * entry + len * 4 + 4);
    }
}
