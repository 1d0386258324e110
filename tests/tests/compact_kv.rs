//! compact_kv, gather_rows and keep_positions: the CPU reference against
//! independent oracles (SPEC "GlimpsePrune / compact_kv"), and the argument
//! checks of the ops and of the types that carry positions (`RowLayout`,
//! `KeepPositions`).
//!
//! Oracles:
//! - positions to keep: a boolean mask over the cache, set on each row's
//!   valid range, cleared on the visual tokens select_keep did not keep and,
//!   with `drop_last`, on the glimpse token; the kept positions are the set
//!   bits in order;
//! - the gather: the source position of rank `j` among a row's kept positions
//!   lands in destination slot `j` (right padding) or `j + S_dst - len`
//!   (left padding); every other destination slot is zero. Copies are compared
//!   bit for bit; destinations are poisoned first.

use foveal::compact_kv::cpu::{compact_kv, gather_rows, keep_positions};
use foveal::select_keep::cpu::select_keep;
use foveal::{
    Error, KeepPositions, KeepRule, KeepSet, Layout, Padding, RowLayout, RowSpec, View, ViewMut,
};
use foveal_tests::{
    contiguous_strides, indices, random_logits, random_rows, random_rule, random_strides,
    random_tensor, rng, Bits, KvOrder, Poison, RowOpts, Tensor, TestElem,
};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;

// ---------------------------------------------------------------------------
// Oracles
// ---------------------------------------------------------------------------

/// The positions each row keeps, from a mask over the cache: valid range on,
/// dropped visual tokens off, the glimpse token off when `drop_last`.
/// `kept_visual[b]` are indices into `rows[b].visual`.
fn oracle_positions(
    seq: usize,
    rows: &[RowSpec],
    kept_visual: &[Vec<usize>],
    drop_last: bool,
) -> Vec<Vec<usize>> {
    rows.iter()
        .zip(kept_visual)
        .map(|(row, kept)| {
            let mut mask = vec![false; seq];
            mask[row.start..row.end].fill(true);
            for (i, &p) in row.visual.iter().enumerate() {
                if !kept.contains(&i) {
                    mask[p] = false;
                }
            }
            if drop_last {
                mask[row.end - 1] = false;
            }
            (0..seq).filter(|&p| mask[p]).collect()
        })
        .collect()
}

/// Destination slot -> source position of one row (`None`: a zeroed slot).
fn oracle_slots(positions: &[usize], dst_seq: usize, padding: Padding) -> Vec<Option<usize>> {
    assert!(positions.len() <= dst_seq);
    let offset = match padding {
        Padding::Right => 0,
        Padding::Left => dst_seq - positions.len(),
    };
    let mut slots = vec![None; dst_seq];
    for (rank, &p) in positions.iter().enumerate() {
        slots[offset + rank] = Some(p);
    }
    slots
}

/// Checks one gathered `[B, S, H, W]` plane against its source: every element
/// bit-identical to the oracle's source element or +0, and the storage gaps of
/// the destination still poisoned (no write outside the view).
fn check_plane<T: Poison + Bits + std::fmt::Debug, const N: usize>(
    src: &Tensor<T, N>,
    dst: &Tensor<T, N>,
    positions: &[Vec<usize>],
    padding: Padding,
    what: &str,
) {
    let dst_seq = dst.shape[1];
    let slots: Vec<Vec<Option<usize>>> = positions
        .iter()
        .map(|p| oracle_slots(p, dst_seq, padding))
        .collect();
    for idx in indices(dst.shape) {
        let got = dst.get(idx);
        let want_bits = match slots[idx[0]][idx[1]] {
            Some(p) => {
                let mut s = idx;
                s[1] = p;
                src.get(s).bits()
            }
            None => 0,
        };
        assert_eq!(
            got.bits(),
            want_bits,
            "{what} {padding:?}: dst{idx:?} = {got:?}, want source {:?} (bits {want_bits:#x})",
            slots[idx[0]][idx[1]]
        );
    }
    let poison = T::POISON.bits();
    for o in dst.gap_offsets() {
        assert_eq!(
            dst.data[o].bits(),
            poison,
            "{what}: wrote storage offset {o} outside the destination view"
        );
    }
}

// ---------------------------------------------------------------------------
// Random cases
// ---------------------------------------------------------------------------

/// A random layout with a keep set computed by select_keep from random logits
/// and a random rule; returns the layout's rows, the layout, the keep set and
/// its kept visual indices. The last position may be visual unless it is to
/// be dropped (keep_positions refuses to drop a visual token).
fn random_keep(
    r: &mut StdRng,
    batch: usize,
    seq: usize,
    drop_last: bool,
) -> (Vec<RowSpec>, RowLayout, KeepSet, Vec<Vec<usize>>) {
    let glimpse_text = drop_last || r.random_bool(0.5);
    let rows = random_rows(
        r,
        batch,
        seq,
        RowOpts {
            glimpse_text,
            ..RowOpts::default()
        },
    );
    let layout = RowLayout::new(seq, &rows).unwrap();
    let nv: Vec<usize> = rows.iter().map(|row| row.visual.len()).collect();
    let nv_max = layout.nv_max();
    let logits = random_logits(r, &nv, nv_max, 0.0);
    let rule = random_rule(r, 4);
    let mut keep = KeepSet::new(&layout);
    select_keep(
        View::contiguous(&logits, [batch, nv_max]).unwrap(),
        &layout,
        &rule,
        &mut keep,
    )
    .unwrap();
    let kept = (0..batch)
        .map(|b| keep.kept(b).iter().map(|&i| i as usize).collect())
        .collect();
    (rows, layout, keep, kept)
}

/// keep_positions on a random case, checked against the mask oracle.
fn positions_of(
    r: &mut StdRng,
    batch: usize,
    seq: usize,
    drop_last: bool,
) -> (Vec<RowSpec>, KeepPositions, Vec<Vec<usize>>) {
    let (rows, layout, keep, kept) = random_keep(r, batch, seq, drop_last);
    let mut kp = KeepPositions::for_rows(&layout, drop_last);
    // start from stale content: a previous call on another keep set of the same layout
    let mut other = KeepSet::new(&layout);
    select_keep(
        View::contiguous(
            &vec![9.0f32; batch * layout.nv_max()],
            [batch, layout.nv_max()],
        )
        .unwrap(),
        &layout,
        &KeepRule::keep_all(),
        &mut other,
    )
    .unwrap();
    keep_positions(&layout, &other, drop_last, &mut kp).unwrap();
    keep_positions(&layout, &keep, drop_last, &mut kp).unwrap();

    let want = oracle_positions(seq, &rows, &kept, drop_last);
    assert_eq!(kp.batch(), batch);
    assert_eq!(kp.src_seq(), seq);
    let (packed, lengths) = kp.packed();
    let width = kp.width();
    assert!(
        want.iter().all(|w| w.len() <= width),
        "width {width} cannot hold {want:?}"
    );
    for b in 0..batch {
        let got: Vec<usize> = kp.row(b).iter().map(|&p| p as usize).collect();
        assert_eq!(
            got, want[b],
            "row {b} {:?} kept visual {:?} drop_last {drop_last}",
            rows[b], kept[b]
        );
        assert_eq!(lengths[b] as usize, want[b].len());
        assert!(
            packed[b * width + want[b].len()..(b + 1) * width]
                .iter()
                .all(|&p| p == -1),
            "row {b}: padding must be -1"
        );
    }
    (rows, kp, want)
}

#[derive(Debug, Clone, Copy)]
struct KvCase {
    seed: u64,
    batch: usize,
    seq: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    extra: usize,
    drop_last: bool,
    left: bool,
}

fn kv_case() -> impl Strategy<Value = KvCase> {
    (
        any::<u64>(),
        1usize..=4,
        1usize..=100,
        1usize..=3,
        1usize..=2,
        prop::sample::select(vec![1usize, 3, 8, 64, 80, 128]),
        0usize..=3,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(seed, batch, seq, layers, heads, head_dim, extra, drop_last, left)| KvCase {
                seed,
                batch,
                seq,
                layers,
                heads,
                head_dim,
                extra,
                drop_last,
                left,
            },
        )
}

/// KV caches of several layers in random memory orders; the destination
/// capacity `width + extra`; every layer of K and V compacted in one call.
fn check_compact_kv<T: TestElem>(c: KvCase) {
    let mut r = rng(c.seed);
    let (rows, kp, want) = positions_of(&mut r, c.batch, c.seq, c.drop_last);
    let padding = if c.left {
        Padding::Left
    } else {
        Padding::Right
    };
    let src_shape = [c.batch, c.seq, c.heads, c.head_dim];
    let src_order = KvOrder::pick(&mut r);
    let src_strides = src_order.strides(&mut r, src_shape);
    let dst_shape = [c.batch, kp.width() + c.extra, c.heads, c.head_dim];
    let dst_order = KvOrder::pick(&mut r);
    let dst_strides = dst_order.strides(&mut r, dst_shape);

    let make_src = |r: &mut StdRng| {
        let mut t: Tensor<T, 4> = random_tensor(r, src_shape, src_strides, -1.0, 1.0);
        // entries outside a row's valid range are never kept: make them NaN
        for idx in indices(src_shape) {
            let row = &rows[idx[0]];
            if idx[1] < row.start || idx[1] >= row.end {
                let o = t.offset(idx);
                t.data[o] = T::POISON;
            }
        }
        t
    };
    let k_src: Vec<Tensor<T, 4>> = (0..c.layers).map(|_| make_src(&mut r)).collect();
    let v_src: Vec<Tensor<T, 4>> = (0..c.layers).map(|_| make_src(&mut r)).collect();
    let mut k_dst: Vec<Tensor<T, 4>> = (0..c.layers)
        .map(|_| Tensor::filled(dst_shape, dst_strides, T::POISON))
        .collect();
    let mut v_dst = k_dst.clone();
    {
        let k_views: Vec<View<'_, T, 4>> = k_src.iter().map(Tensor::view).collect();
        let v_views: Vec<View<'_, T, 4>> = v_src.iter().map(Tensor::view).collect();
        let mut k_out: Vec<ViewMut<'_, T, 4>> = k_dst.iter_mut().map(Tensor::view_mut).collect();
        let mut v_out: Vec<ViewMut<'_, T, 4>> = v_dst.iter_mut().map(Tensor::view_mut).collect();
        compact_kv(&k_views, &v_views, &kp, padding, &mut k_out, &mut v_out).unwrap();
    }
    let what = format!("{c:?} src {src_order:?} dst {dst_order:?}");
    for l in 0..c.layers {
        check_plane(
            &k_src[l],
            &k_dst[l],
            &want,
            padding,
            &format!("K layer {l} {what}"),
        );
        check_plane(
            &v_src[l],
            &v_dst[l],
            &want,
            padding,
            &format!("V layer {l} {what}"),
        );
    }
}

/// Hidden states `[B, S, W]` (one or two planes) in random memory orders.
fn check_hidden<T: TestElem>(
    seed: u64,
    batch: usize,
    seq: usize,
    width: usize,
    extra: usize,
    drop_last: bool,
    left: bool,
) {
    let mut r = rng(seed);
    let (_, kp, want) = positions_of(&mut r, batch, seq, drop_last);
    let padding = if left { Padding::Left } else { Padding::Right };
    let planes = r.random_range(1..=2);
    let src_shape = [batch, seq, width];
    let src_strides = random_strides(&mut r, src_shape);
    let dst_shape = [batch, kp.width() + extra, width];
    let dst_strides = random_strides(&mut r, dst_shape);
    let src: Vec<Tensor<T, 3>> = (0..planes)
        .map(|_| random_tensor(&mut r, src_shape, src_strides, -4.0, 4.0))
        .collect();
    let mut dst: Vec<Tensor<T, 3>> = (0..planes)
        .map(|_| Tensor::filled(dst_shape, dst_strides, T::POISON))
        .collect();
    {
        let views: Vec<View<'_, T, 3>> = src.iter().map(Tensor::view).collect();
        let mut outs: Vec<ViewMut<'_, T, 3>> = dst.iter_mut().map(Tensor::view_mut).collect();
        gather_rows(&views, &kp, padding, &mut outs).unwrap();
    }
    for (s, d) in src.iter().zip(&dst) {
        check_plane(s, d, &want, padding, &format!("hidden seed {seed}"));
    }
}

/// M-RoPE position ids: storage `[3, B, S]` i32, each section a `[B, S, 1]`
/// plane; the ids are gathered, never recomputed.
fn check_position_ids(
    seed: u64,
    batch: usize,
    seq: usize,
    extra: usize,
    drop_last: bool,
    left: bool,
) {
    let mut r = rng(seed);
    let (_, kp, want) = positions_of(&mut r, batch, seq, drop_last);
    let padding = if left { Padding::Left } else { Padding::Right };
    let dst_seq = kp.width() + extra;
    let plane = batch * seq;
    let dst_plane = batch * dst_seq;
    // distinct ids: section, row and position encoded
    let ids: Vec<i32> = (0..3 * plane)
        .map(|i| 1 + (i / plane * 100_000 + i % plane) as i32)
        .collect();
    let mut out = vec![i32::POISON; 3 * dst_plane];
    {
        let src_shape = [batch, seq, 1];
        let dst_shape = [batch, dst_seq, 1];
        let src_layout = Layout::strided(src_shape, contiguous_strides(src_shape)).unwrap();
        let dst_layout = Layout::strided(dst_shape, contiguous_strides(dst_shape)).unwrap();
        let views: Vec<View<'_, i32, 3>> = (0..3)
            .map(|k| View::new(&ids[k * plane..(k + 1) * plane], src_layout).unwrap())
            .collect();
        let (p0, rest) = out.split_at_mut(dst_plane);
        let (p1, p2) = rest.split_at_mut(dst_plane);
        let mut outs: Vec<ViewMut<'_, i32, 3>> = [p0, p1, p2]
            .into_iter()
            .map(|p| ViewMut::new(p, dst_layout).unwrap())
            .collect();
        gather_rows(&views, &kp, padding, &mut outs).unwrap();
    }
    for k in 0..3 {
        let src = Tensor {
            data: ids[k * plane..(k + 1) * plane].to_vec(),
            shape: [batch, seq, 1],
            strides: [seq, 1, 1],
            base: 0,
        };
        let dst = Tensor {
            data: out[k * dst_plane..(k + 1) * dst_plane].to_vec(),
            shape: [batch, dst_seq, 1],
            strides: [dst_seq, 1, 1],
            base: 0,
        };
        check_plane(
            &src,
            &dst,
            &want,
            padding,
            &format!("position ids section {k} seed {seed}"),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// keep_positions alone, on larger layouts.
    #[test]
    fn keep_positions_matches_mask_oracle(seed in any::<u64>(), batch in 1usize..=4, seq in 1usize..=200, drop_last in any::<bool>()) {
        let mut r = rng(seed);
        positions_of(&mut r, batch, seq, drop_last);
    }

    #[test]
    fn compact_kv_matches_oracle_f32(c in kv_case()) {
        check_compact_kv::<f32>(c);
    }

    #[test]
    fn compact_kv_matches_oracle_bf16(c in kv_case()) {
        check_compact_kv::<bf16>(c);
    }

    #[test]
    fn compact_kv_matches_oracle_f16(c in kv_case()) {
        check_compact_kv::<f16>(c);
    }

    #[test]
    fn gather_rows_hidden_f32(seed in any::<u64>(), batch in 1usize..=4, seq in 1usize..=100,
                              width in prop::sample::select(vec![1usize, 5, 64, 96]), extra in 0usize..=3,
                              drop_last in any::<bool>(), left in any::<bool>()) {
        check_hidden::<f32>(seed, batch, seq, width, extra, drop_last, left);
    }

    #[test]
    fn gather_rows_hidden_bf16(seed in any::<u64>(), batch in 1usize..=4, seq in 1usize..=100,
                               width in prop::sample::select(vec![1usize, 5, 64, 96]), extra in 0usize..=3,
                               drop_last in any::<bool>(), left in any::<bool>()) {
        check_hidden::<bf16>(seed, batch, seq, width, extra, drop_last, left);
    }

    #[test]
    fn gather_rows_position_ids(seed in any::<u64>(), batch in 1usize..=4, seq in 1usize..=200, extra in 0usize..=3,
                                drop_last in any::<bool>(), left in any::<bool>()) {
        check_position_ids(seed, batch, seq, extra, drop_last, left);
    }
}

/// A hand-sized case, checked against slots written out from the SPEC: rows
/// `[t t v v t v G]` (start 0) and `[_ _ t v v G]` (left-padded, start 2).
#[test]
fn small_case_by_hand() {
    let rows = vec![
        RowSpec {
            start: 0,
            end: 7,
            visual: vec![2, 3, 5],
        },
        RowSpec {
            start: 2,
            end: 6,
            visual: vec![3, 4],
        },
    ];
    let layout = RowLayout::new(7, &rows).unwrap();
    // keep visual 0 and 2 of row 0 (positions 2, 5), visual 1 of row 1 (position 4)
    let logits = [3.0f32, -3.0, 3.0, -3.0, 3.0, f32::NAN];
    let mut keep = KeepSet::new(&layout);
    select_keep(
        View::contiguous(&logits, [2, 3]).unwrap(),
        &layout,
        &KeepRule::default(),
        &mut keep,
    )
    .unwrap();
    let mut kp = KeepPositions::for_rows(&layout, true);
    keep_positions(&layout, &keep, true, &mut kp).unwrap();
    assert_eq!(kp.row(0), &[0, 1, 2, 4, 5]);
    assert_eq!(kp.row(1), &[2, 4]);
    assert_eq!(kp.width(), 6);

    // [B, S, 1, 1] caches whose value is 10 * b + p + 1
    let src: Vec<f32> = (0..2)
        .flat_map(|b| (0..7).map(move |p| (10 * b + p + 1) as f32))
        .collect();
    for (padding, want) in [
        (
            Padding::Right,
            [1.0, 2.0, 3.0, 5.0, 6.0, 0.0, 13.0, 15.0, 0.0, 0.0, 0.0, 0.0],
        ),
        (
            Padding::Left,
            [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 13.0, 15.0],
        ),
    ] {
        let mut k_out = [f32::NAN; 12];
        let mut v_out = [f32::NAN; 12];
        compact_kv(
            &[View::contiguous(&src, [2, 7, 1, 1]).unwrap()],
            &[View::contiguous(&src, [2, 7, 1, 1]).unwrap()],
            &kp,
            padding,
            &mut [ViewMut::contiguous(&mut k_out, [2, 6, 1, 1]).unwrap()],
            &mut [ViewMut::contiguous(&mut v_out, [2, 6, 1, 1]).unwrap()],
        )
        .unwrap();
        assert_eq!(k_out, want, "{padding:?}");
        assert_eq!(v_out, want, "{padding:?}");
    }
}

// ---------------------------------------------------------------------------
// Argument checks of the gathers
// ---------------------------------------------------------------------------

fn small_keep() -> KeepPositions {
    // width 3, positions below 6
    KeepPositions::from_rows(6, &[vec![0, 2, 5], vec![1]]).unwrap()
}

fn plane(shape: [usize; 4]) -> Vec<f32> {
    (0..shape.iter().product::<usize>())
        .map(|i| i as f32 + 1.0)
        .collect()
}

/// Runs compact_kv with `n_k` / `n_v` source layers of `src_shape` and
/// `n_kd` / `n_vd` destinations of `dst_shape`; on error checks no
/// destination was written.
fn try_compact(
    n_k: usize,
    n_v: usize,
    src_shape: [usize; 4],
    n_kd: usize,
    n_vd: usize,
    dst_shape: [usize; 4],
    keep: &KeepPositions,
) -> Result<(), Error> {
    let data = plane(src_shape);
    let k: Vec<View<'_, f32, 4>> = (0..n_k)
        .map(|_| View::contiguous(&data, src_shape).unwrap())
        .collect();
    let v: Vec<View<'_, f32, 4>> = (0..n_v)
        .map(|_| View::contiguous(&data, src_shape).unwrap())
        .collect();
    let n = dst_shape.iter().product::<usize>();
    let mut kd_data: Vec<Vec<f32>> = vec![vec![f32::NAN; n]; n_kd];
    let mut vd_data: Vec<Vec<f32>> = vec![vec![f32::NAN; n]; n_vd];
    let res = {
        let mut kd: Vec<ViewMut<'_, f32, 4>> = kd_data
            .iter_mut()
            .map(|d| ViewMut::contiguous(d, dst_shape).unwrap())
            .collect();
        let mut vd: Vec<ViewMut<'_, f32, 4>> = vd_data
            .iter_mut()
            .map(|d| ViewMut::contiguous(d, dst_shape).unwrap())
            .collect();
        compact_kv(&k, &v, keep, Padding::Right, &mut kd, &mut vd)
    };
    if res.is_err() {
        assert!(
            kd_data.iter().chain(&vd_data).flatten().all(|x| x.is_nan()),
            "a failed call must not write"
        );
    }
    res
}

fn assert_shape(res: Result<(), Error>, op: &str, want_arg: &str) {
    match &res {
        Err(Error::Shape { op: o, arg, .. }) if *o == op && *arg == want_arg => {}
        _ => panic!("want Error::Shape from {op} on `{want_arg}`, got {res:?}"),
    }
}

const SRC: [usize; 4] = [2, 6, 2, 4];
const DST: [usize; 4] = [2, 3, 2, 4];

#[test]
fn valid_compaction_is_accepted() {
    try_compact(2, 2, SRC, 2, 2, DST, &small_keep()).unwrap();
    // larger source capacity than the positions index, larger destination
    try_compact(1, 1, [2, 9, 2, 4], 1, 1, [2, 5, 2, 4], &small_keep()).unwrap();
}

#[test]
fn rejects_mismatched_layer_counts() {
    let keep = small_keep();
    assert_shape(
        try_compact(2, 1, SRC, 2, 1, DST, &keep),
        "compact_kv",
        "v_src",
    );
    assert_shape(
        try_compact(2, 2, SRC, 2, 1, DST, &keep),
        "compact_kv",
        "v_dst",
    );
    assert_shape(
        try_compact(2, 2, SRC, 1, 2, DST, &keep),
        "compact_kv",
        "k_dst",
    );
    assert_shape(
        try_compact(2, 2, SRC, 3, 2, DST, &keep),
        "compact_kv",
        "k_dst",
    );
    assert_shape(
        try_compact(0, 0, SRC, 0, 0, DST, &keep),
        "compact_kv",
        "src",
    );
}

/// Three K destinations and one V destination for two layers: the total
/// matches, but each list must match its own source list.
#[test]
fn rejects_destination_counts_that_only_match_in_total() {
    assert_shape(
        try_compact(2, 2, SRC, 3, 1, DST, &small_keep()),
        "compact_kv",
        "k_dst",
    );
}

#[test]
fn rejects_layers_of_different_layouts() {
    let keep = small_keep();
    let data = plane(SRC);
    let bshd = View::new(&data, Layout::bshd(2, 6, 2, 4)).unwrap();
    let bhsd = View::new(&data, Layout::bhsd(2, 6, 2, 4)).unwrap();
    let mut d: Vec<Vec<f32>> = vec![vec![f32::NAN; 48]; 4];
    let [d0, d1, d2, d3] = &mut d[..] else {
        unreachable!()
    };
    let res = compact_kv(
        &[bshd, bhsd],
        &[bshd, bshd],
        &keep,
        Padding::Left,
        &mut [
            ViewMut::contiguous(d0, DST).unwrap(),
            ViewMut::contiguous(d1, DST).unwrap(),
        ],
        &mut [
            ViewMut::contiguous(d2, DST).unwrap(),
            ViewMut::contiguous(d3, DST).unwrap(),
        ],
    );
    assert_shape(res, "compact_kv", "src");
    // destinations in different memory orders
    let res = compact_kv(
        &[bshd],
        &[bshd],
        &keep,
        Padding::Left,
        &mut [ViewMut::new(d0, Layout::bshd(2, 3, 2, 4)).unwrap()],
        &mut [ViewMut::new(d1, Layout::bhsd(2, 3, 2, 4)).unwrap()],
    );
    assert_shape(res, "compact_kv", "dst");
}

#[test]
fn rejects_destination_too_short() {
    assert_shape(
        try_compact(1, 1, SRC, 1, 1, [2, 2, 2, 4], &small_keep()),
        "compact_kv",
        "dst",
    );
}

#[test]
fn rejects_destination_of_other_shape() {
    for dst in [[2, 3, 1, 4], [2, 3, 2, 5], [1, 3, 2, 4], [3, 3, 2, 4]] {
        assert_shape(
            try_compact(1, 1, SRC, 1, 1, dst, &small_keep()),
            "compact_kv",
            "dst",
        );
    }
}

#[test]
fn rejects_source_smaller_than_positions() {
    // the positions index a capacity of 6
    assert_shape(
        try_compact(1, 1, [2, 5, 2, 4], 1, 1, DST, &small_keep()),
        "compact_kv",
        "src",
    );
    // and a batch other than the positions'
    assert_shape(
        try_compact(1, 1, [3, 6, 2, 4], 1, 1, [3, 3, 2, 4], &small_keep()),
        "compact_kv",
        "src",
    );
}

#[test]
fn gather_rows_rejects_planes_of_different_shapes() {
    let keep = small_keep();
    let a = vec![1i32; 2 * 6];
    let b = vec![1i32; 2 * 7];
    let mut d0 = vec![i32::POISON; 6];
    let mut d1 = vec![i32::POISON; 8];
    let res = gather_rows(
        &[
            View::contiguous(&a, [2, 6, 1]).unwrap(),
            View::contiguous(&b, [2, 7, 1]).unwrap(),
        ],
        &keep,
        Padding::Right,
        &mut [
            ViewMut::contiguous(&mut d0, [2, 3, 1]).unwrap(),
            ViewMut::contiguous(&mut d1[..6], [2, 3, 1]).unwrap(),
        ],
    );
    assert_shape(res, "gather_rows", "src");
    let res = gather_rows(
        &[
            View::contiguous(&a, [2, 6, 1]).unwrap(),
            View::contiguous(&a, [2, 6, 1]).unwrap(),
        ],
        &keep,
        Padding::Right,
        &mut [
            ViewMut::contiguous(&mut d0, [2, 3, 1]).unwrap(),
            ViewMut::contiguous(&mut d1, [2, 4, 1]).unwrap(),
        ],
    );
    assert_shape(res, "gather_rows", "dst");
    assert!(
        d0.iter().chain(&d1).all(|&x| x == i32::POISON),
        "a failed call must not write"
    );
    // a hidden-state width other than the source's
    let h = vec![0.5f32; 2 * 6 * 4];
    let mut hd = vec![f32::NAN; 2 * 3 * 5];
    let res = gather_rows(
        &[View::contiguous(&h, [2, 6, 4]).unwrap()],
        &keep,
        Padding::Left,
        &mut [ViewMut::contiguous(&mut hd, [2, 3, 5]).unwrap()],
    );
    assert_shape(res, "gather_rows", "dst");
}

// ---------------------------------------------------------------------------
// Argument checks of KeepPositions and keep_positions
// ---------------------------------------------------------------------------

#[test]
fn from_rows_checks_positions() {
    let kp = KeepPositions::from_rows(6, &[vec![0, 2, 5], vec![], vec![3]]).unwrap();
    assert_eq!((kp.width(), kp.src_seq(), kp.batch()), (3, 6, 3));
    assert_eq!(kp.packed().0, &[0, 2, 5, -1, -1, -1, 3, -1, -1]);
    assert_eq!(kp.packed().1, &[3, 0, 1]);

    for rows in [
        vec![vec![0, 3, 2]],
        vec![vec![1, 1]],
        vec![vec![0], vec![4, 0]],
    ] {
        let res = KeepPositions::from_rows(6, &rows);
        assert!(
            matches!(res, Err(Error::Value { arg: "rows", .. })),
            "{rows:?}: {res:?}"
        );
    }
    for rows in [vec![vec![0, 6]], vec![vec![1], vec![100]]] {
        let res = KeepPositions::from_rows(6, &rows);
        assert!(
            matches!(res, Err(Error::Index { arg: "rows", .. })),
            "{rows:?}: {res:?}"
        );
    }
    assert!(matches!(
        KeepPositions::from_rows(6, &[]),
        Err(Error::Shape { .. })
    ));
}

fn two_rows() -> Vec<RowSpec> {
    vec![
        RowSpec {
            start: 0,
            end: 5,
            visual: vec![1, 2],
        },
        RowSpec {
            start: 1,
            end: 5,
            visual: vec![2],
        },
    ]
}

#[test]
fn keep_positions_refuses_keep_set_of_another_layout() {
    let layout = RowLayout::new(5, &two_rows()).unwrap();
    let twin = RowLayout::new(5, &two_rows()).unwrap(); // same rows, another layout
    assert_ne!(layout.id(), twin.id());
    let logits = [1.0f32, -1.0, 1.0, 0.0];
    let mut keep = KeepSet::new(&twin);
    select_keep(
        View::contiguous(&logits, [2, 2]).unwrap(),
        &twin,
        &KeepRule::default(),
        &mut keep,
    )
    .unwrap();
    let mut kp = KeepPositions::for_rows(&layout, true);
    let before = kp.clone();
    let res = keep_positions(&layout, &keep, true, &mut kp);
    assert!(
        matches!(res, Err(Error::Value { arg: "keep", .. })),
        "{res:?}"
    );
    assert_eq!(kp, before);
    // a keep set never filled by select_keep is refused too
    let res = keep_positions(&layout, &KeepSet::new(&layout), true, &mut kp);
    assert!(
        matches!(res, Err(Error::Value { arg: "keep", .. })),
        "{res:?}"
    );
    // the same keep set with its own layout (or a clone of it) is accepted
    keep_positions(&twin, &keep, true, &mut kp).unwrap();
    assert_eq!(kp.row(0), &[0, 1, 3]);
    assert_eq!(kp.row(1), &[1, 2, 3]);
    keep_positions(&twin.clone(), &keep, true, &mut kp).unwrap();
}

#[test]
fn keep_positions_refuses_to_drop_a_visual_token() {
    // row 1 ends at 5 and its last visual token is position 4
    let rows = vec![
        RowSpec {
            start: 0,
            end: 5,
            visual: vec![1, 2],
        },
        RowSpec {
            start: 1,
            end: 5,
            visual: vec![2, 4],
        },
    ];
    let layout = RowLayout::new(5, &rows).unwrap();
    let mut keep = KeepSet::new(&layout);
    select_keep(
        View::contiguous(&[1.0f32, -1.0, 1.0, 1.0], [2, 2]).unwrap(),
        &layout,
        &KeepRule::default(),
        &mut keep,
    )
    .unwrap();
    let mut kp = KeepPositions::for_rows(&layout, true);
    let before = kp.clone();
    let res = keep_positions(&layout, &keep, true, &mut kp);
    assert!(
        matches!(
            res,
            Err(Error::Value {
                op: "keep_positions",
                arg: "drop_last",
                ..
            })
        ),
        "{res:?}"
    );
    assert_eq!(kp, before);
    // without drop_last the visual token at the end is kept like any other
    let mut kp = KeepPositions::for_rows(&layout, false);
    keep_positions(&layout, &keep, false, &mut kp).unwrap();
    assert_eq!(kp.row(0), &[0, 1, 3, 4]);
    assert_eq!(kp.row(1), &[1, 2, 3, 4]);
}

#[test]
fn keep_positions_refuses_output_sized_otherwise() {
    let layout = RowLayout::new(5, &two_rows()).unwrap();
    let mut keep = KeepSet::new(&layout);
    select_keep(
        View::contiguous(&[1.0f32, -1.0, 1.0, 0.0], [2, 2]).unwrap(),
        &layout,
        &KeepRule::default(),
        &mut keep,
    )
    .unwrap();
    // sized for drop_last = false, used with true (and the reverse)
    for (sized, used) in [(false, true), (true, false)] {
        let mut kp = KeepPositions::for_rows(&layout, sized);
        let res = keep_positions(&layout, &keep, used, &mut kp);
        assert!(
            matches!(res, Err(Error::Shape { arg: "out", .. })),
            "{res:?}"
        );
    }
    // sized for another capacity
    let other = RowLayout::new(6, &two_rows()).unwrap();
    let mut kp = KeepPositions::for_rows(&other, true);
    let res = keep_positions(&layout, &keep, true, &mut kp);
    assert!(
        matches!(res, Err(Error::Shape { arg: "out", .. })),
        "{res:?}"
    );
}

// ---------------------------------------------------------------------------
// Argument checks of RowLayout
// ---------------------------------------------------------------------------

fn row(start: usize, end: usize, visual: &[usize]) -> RowSpec {
    RowSpec {
        start,
        end,
        visual: visual.to_vec(),
    }
}

#[test]
fn row_layout_accepts_and_packs_valid_rows() {
    let l = RowLayout::new(8, &[row(0, 8, &[1, 2, 5]), row(3, 6, &[]), row(2, 4, &[3])]).unwrap();
    assert_eq!((l.batch(), l.seq(), l.nv_max(), l.max_len()), (3, 8, 3, 8));
    let (start, end, nv, vis) = l.packed();
    assert_eq!(start, &[0, 3, 2]);
    assert_eq!(end, &[8, 6, 4]);
    assert_eq!(nv, &[3, 0, 1]);
    assert_eq!(vis, &[1, 2, 5, -1, -1, -1, 3, -1, -1]);
    assert_eq!(l.visual(2), &[3]);
}

#[test]
fn row_layout_rejects_empty_or_out_of_range_rows() {
    for bad in [
        row(3, 3, &[]),
        row(4, 3, &[]),
        row(0, 9, &[]),
        row(8, 9, &[]),
    ] {
        let res = RowLayout::new(8, &[row(0, 8, &[1]), bad.clone()]);
        assert!(
            matches!(res, Err(Error::Index { arg: "rows", .. })),
            "{bad:?}: {res:?}"
        );
    }
    assert!(matches!(RowLayout::new(8, &[]), Err(Error::Shape { .. })));
}

#[test]
fn row_layout_rejects_visual_outside_range() {
    for bad in [row(2, 6, &[1]), row(2, 6, &[3, 6]), row(2, 6, &[2, 100])] {
        let res = RowLayout::new(8, std::slice::from_ref(&bad));
        assert!(
            matches!(res, Err(Error::Index { arg: "visual", .. })),
            "{bad:?}: {res:?}"
        );
    }
    // the range ends are inclusive-exclusive: start and end - 1 are fine
    RowLayout::new(8, &[row(2, 6, &[2, 5])]).unwrap();
}

#[test]
fn row_layout_rejects_unsorted_visual() {
    for bad in [
        row(0, 8, &[3, 2]),
        row(0, 8, &[1, 4, 4]),
        row(0, 8, &[5, 1, 2]),
    ] {
        let res = RowLayout::new(8, std::slice::from_ref(&bad));
        assert!(
            matches!(res, Err(Error::Value { arg: "visual", .. })),
            "{bad:?}: {res:?}"
        );
    }
}

/// On the host, keep_positions knows the compacted lengths, so `max_len` is
/// exact: a destination of exactly that capacity is accepted and one slot
/// less is refused.
#[test]
fn destination_sized_to_the_exact_new_maximum_length() {
    let layout =
        RowLayout::new(10, &[row(0, 10, &[1, 2, 3, 4, 5]), row(3, 10, &[4, 5, 6])]).unwrap();
    let keep = KeepSet::from_rows(&layout, &[vec![0, 4], vec![1]]).unwrap();
    let mut pos = KeepPositions::for_rows(&layout, true);
    keep_positions(&layout, &keep, true, &mut pos).unwrap();
    // Row 0: 10 - 1 (glimpse) - 5 visual + 2 kept = 6; row 1: 7 - 1 - 3 + 1 = 4.
    assert_eq!((pos.row(0).len(), pos.row(1).len()), (6, 4));
    assert_eq!((pos.width(), pos.max_len()), (9, 6));
    let src = plane([2, 10, 1, 2]);
    let run = |s_dst: usize| {
        let mut dst = vec![f32::NAN; 2 * s_dst * 2];
        gather_rows(
            &[View::new(&src, Layout::contiguous([2, 10, 2])).unwrap()],
            &pos,
            Padding::Right,
            &mut [ViewMut::contiguous(&mut dst, [2, s_dst, 2]).unwrap()],
        )
    };
    run(6).unwrap();
    assert_shape(run(5), "gather_rows", "dst");
}
