//! GlimpsePrune's ops: glimpse_scores, select_keep, keep_positions,
//! compact_kv and gather_rows.

use foveal::compact_kv::cpu::{compact_kv, gather_rows, keep_positions};
use foveal::glimpse_scores::cpu::glimpse_scores;
use foveal::select_keep::cpu::select_keep;
use foveal::{
    KeepPositions, KeepRule, KeepSet, Padding, RowLayout, RowSpec, ScoreMode, View, ViewMut,
};
use proptest::prelude::*;

use crate::arb::{
    accepted, apply, arg, comparable, config, index_list, perturb, positive, scalar, size, Arg,
    Buf, Spec,
};

/// A valid row layout: 1 to 3 rows in a cache of 1 to 8 positions, each row
/// a range with some of its positions visual.
pub fn rows() -> impl Strategy<Value = RowLayout> {
    (
        1usize..=8,
        prop::collection::vec((any::<u16>(), any::<u16>(), any::<u16>()), 1..=3),
    )
        .prop_map(|(seq, specs)| {
            let rows: Vec<RowSpec> = specs
                .iter()
                .map(|&(a, b, mask)| {
                    let start = a as usize % seq;
                    let end = start + 1 + b as usize % (seq - start);
                    let visual = (start..end).filter(|p| mask & (1 << p) != 0).collect();
                    RowSpec { start, end, visual }
                })
                .collect();
            RowLayout::new(seq, &rows).expect("valid rows")
        })
}

fn mode() -> impl Strategy<Value = ScoreMode> {
    prop_oneof![
        Just(ScoreMode::Logits),
        Just(ScoreMode::LogSoftmax),
        Just(ScoreMode::Softmax)
    ]
}

fn rule() -> impl Strategy<Value = KeepRule> {
    (
        prop_oneof![3 => 0.0f32..=1.0, 1 => scalar()],
        prop_oneof![2 => Just(None), 2 => (0.0f64..=1.0).prop_map(Some), 1 => prop::sample::select(&[-0.5, 1.5, f64::NAN, f64::INFINITY][..]).prop_map(Some)],
        prop_oneof![3 => 0usize..4, 1 => Just(usize::MAX)],
    )
        .prop_map(|(threshold, max_ratio, min_keep)| KeepRule { threshold, max_ratio, min_keep })
}

/// Kept visual indices per row: mostly within each row's visual tokens.
fn kept_for(rows: &RowLayout, lists: &[Vec<usize>], wild: bool) -> Vec<Vec<usize>> {
    (0..rows.batch())
        .map(|b| {
            let l = lists.get(b).cloned().unwrap_or_default();
            if wild {
                l
            } else {
                l.into_iter().filter(|&i| i < rows.nv(b)).collect()
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    /// glimpse_scores: any query, keys, rows, scale, mode and output.
    #[test]
    fn glimpse_scores_any(
        rows in rows(),
        (hkv, group, d) in (positive(), prop_oneof![4 => 1usize..=4, 1 => size()], size()),
        scale in prop_oneof![2 => Just(None), 1 => scalar().prop_map(Some)],
        mode in mode(),
        p in perturb(),
        (aq, ak, ao) in (arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        let (b, s, hq) = (rows.batch(), rows.seq(), hkv.saturating_mul(group));
        let q = Buf::<f32, 3>::input(&aq.spec(apply([b, hq, d], 0, p)), seed);
        let k = Buf::<f32, 4>::input(&ak.spec(apply([b, s, hkv, d], 1, p)), seed ^ 1);
        let mut out = Buf::<f32, 3>::output(&ao.spec(apply([b, rows.nv_max(), hq], 2, p)));
        let ok = {
            let (Some(qv), Some(kv), Some(mut ov)) = (q.view(), k.view(), out.view_mut()) else { return Ok(()) };
            accepted(glimpse_scores(qv, kv, &rows, scale, mode, &mut ov))?
        };
        if ok && comparable(&[q.numel(), k.numel(), out.numel()]) {
            let (qc, kc, mut oc) = (q.contiguous_copy(), k.contiguous_copy(), out.fresh_contiguous());
            glimpse_scores(qc.view().unwrap(), kc.view().unwrap(), &rows, scale, mode, &mut oc.view_mut().unwrap()).unwrap();
            prop_assert_eq!(out.bits(), oc.bits());
        }
    }

    /// select_keep then keep_positions: any logits and rule; kept tokens
    /// ascending inside each row, as many as the rule allows.
    #[test]
    fn select_keep_any(
        rows in rows(),
        rule in rule(),
        drop_last in any::<bool>(),
        p in perturb(),
        al in arg(),
        seed in any::<u64>(),
    ) {
        let logits = Buf::<f32, 2>::input(&al.spec(apply([rows.batch(), rows.nv_max()], 0, p)), seed);
        let Some(lv) = logits.view() else { return Ok(()) };
        let mut keep = KeepSet::new(&rows);
        if !accepted(select_keep(lv, &rows, &rule, &mut keep))? {
            return Ok(());
        }
        if comparable(&[logits.numel()]) {
            let lc = logits.contiguous_copy();
            let mut kc = KeepSet::new(&rows);
            select_keep(lc.view().unwrap(), &rows, &rule, &mut kc).unwrap();
            prop_assert_eq!(&keep, &kc);
        }
        for b in 0..rows.batch() {
            let kept = keep.kept(b);
            prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(kept.iter().all(|&i| i >= 0 && (i as usize) < rows.nv(b)));
            prop_assert!(kept.len() >= rule.min_keep.min(rows.nv(b)));
        }
        let mut kp = KeepPositions::for_rows(&rows, drop_last);
        if accepted(keep_positions(&rows, &keep, drop_last, &mut kp))? {
            for b in 0..rows.batch() {
                let r = kp.row(b);
                prop_assert!(r.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(r.iter().all(|&q| q as usize >= rows.start(b) && (q as usize) < rows.end(b)));
                // Every text position stays, and every kept visual one.
                let dropped = rows.nv(b) - keep.kept(b).len() + usize::from(drop_last);
                prop_assert_eq!(r.len(), rows.len(b) - dropped);
            }
        }
    }

    /// keep_positions on a keep set given directly (any indices), and on
    /// another layout's keep set or output.
    #[test]
    fn keep_positions_any(
        rows in rows(),
        other in rows(),
        lists in prop::collection::vec(index_list(4), 0..4),
        wild in prop::bool::weighted(0.2),
        (drop_last, drop_built) in (any::<bool>(), any::<bool>()),
    ) {
        let Ok(keep) = KeepSet::from_rows(&rows, &kept_for(&rows, &lists, wild)) else { return Ok(()) };
        let mut kp = KeepPositions::for_rows(&other, drop_built);
        let _ = accepted(keep_positions(&rows, &keep, drop_last, &mut kp))?;
        let mut kp = KeepPositions::for_rows(&rows, drop_built);
        if accepted(keep_positions(&rows, &keep, drop_last, &mut kp))? {
            prop_assert_eq!(drop_last, drop_built);
            for b in 0..rows.batch() {
                prop_assert!(kp.row(b).windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    /// compact_kv and gather_rows: any layers, planes, keep positions and padding.
    #[test]
    fn compact_kv_any(
        src_seq in size(),
        keep_rows in prop::collection::vec(index_list(4), 0..4),
        (layers, dst_layers) in (0usize..3, 0usize..3),
        (h, w, extra) in (size(), size(), 0usize..3),
        left in any::<bool>(),
        p in perturb(),
        (asrc, adst) in (arg(), arg()),
        seed in any::<u64>(),
    ) {
        let Ok(keep) = KeepPositions::from_rows(src_seq, &keep_rows) else { return Ok(()) };
        let padding = if left { Padding::Left } else { Padding::Right };
        let b = keep.batch();
        let src_shape = apply([b, src_seq, h, w], 0, p);
        let dst_shape = apply([b, keep.max_len() + extra, h, w], 1, p);
        let src: Vec<Buf<f32, 4>> = (0..layers).map(|l| Buf::input(&asrc.spec(src_shape), seed ^ l as u64)).collect();
        let mut dst: Vec<Buf<f32, 4>> = (0..dst_layers).map(|_| Buf::output(&adst.spec(dst_shape))).collect();
        // K and V: the same planes twice (V in its own copy).
        let mut vdst = dst.clone();
        let ok = {
            let Some(sv) = src.iter().map(Buf::view).collect::<Option<Vec<View<'_, f32, 4>>>>() else { return Ok(()) };
            let Some(mut dv) = dst.iter_mut().map(Buf::view_mut).collect::<Option<Vec<ViewMut<'_, f32, 4>>>>() else { return Ok(()) };
            let Some(mut vv) = vdst.iter_mut().map(Buf::view_mut).collect::<Option<Vec<ViewMut<'_, f32, 4>>>>() else { return Ok(()) };
            accepted(compact_kv(&sv, &sv, &keep, padding, &mut dv, &mut vv))?
        };
        if ok && comparable(&[src.first().map_or(0, Buf::numel), dst.first().map_or(0, Buf::numel)]) {
            let sc: Vec<Buf<f32, 4>> = src.iter().map(Buf::contiguous_copy).collect();
            let mut dc: Vec<Buf<f32, 4>> = dst.iter().map(Buf::fresh_contiguous).collect();
            let mut vc = dc.clone();
            let sv: Vec<View<'_, f32, 4>> = sc.iter().map(|b| b.view().unwrap()).collect();
            let mut dv: Vec<ViewMut<'_, f32, 4>> = dc.iter_mut().map(|b| b.view_mut().unwrap()).collect();
            let mut vv: Vec<ViewMut<'_, f32, 4>> = vc.iter_mut().map(|b| b.view_mut().unwrap()).collect();
            compact_kv(&sv, &sv, &keep, padding, &mut dv, &mut vv).unwrap();
            drop((dv, vv));
            for (l, (a, c)) in dst.iter().zip(&dc).enumerate() {
                prop_assert_eq!(a.bits(), c.bits(), "layer {}", l);
                prop_assert_eq!(vdst[l].bits(), c.bits());
            }
        }
        // gather_rows on the same planes seen as [B, S, H] rows of w... of h*w.
        let rows3 = |s: &Spec<4>, a: &Arg| a.spec([s.shape[0], s.shape[1], s.shape[2].saturating_mul(s.shape[3])]);
        let src3: Vec<Buf<f32, 3>> = (0..layers).map(|l| Buf::input(&rows3(&asrc.spec(src_shape), &asrc), seed ^ l as u64)).collect();
        let mut dst3: Vec<Buf<f32, 3>> = (0..dst_layers).map(|_| Buf::output(&rows3(&adst.spec(dst_shape), &adst))).collect();
        let ok = {
            let Some(sv) = src3.iter().map(Buf::view).collect::<Option<Vec<_>>>() else { return Ok(()) };
            let Some(mut dv) = dst3.iter_mut().map(Buf::view_mut).collect::<Option<Vec<_>>>() else { return Ok(()) };
            accepted(gather_rows(&sv, &keep, padding, &mut dv))?
        };
        if ok && comparable(&[src3.first().map_or(0, Buf::numel), dst3.first().map_or(0, Buf::numel)]) {
            let sc: Vec<Buf<f32, 3>> = src3.iter().map(Buf::contiguous_copy).collect();
            let mut dc: Vec<Buf<f32, 3>> = dst3.iter().map(Buf::fresh_contiguous).collect();
            let sv: Vec<_> = sc.iter().map(|b| b.view().unwrap()).collect();
            let mut dv: Vec<_> = dc.iter_mut().map(|b| b.view_mut().unwrap()).collect();
            gather_rows(&sv, &keep, padding, &mut dv).unwrap();
            drop(dv);
            for (a, c) in dst3.iter().zip(&dc) {
                prop_assert_eq!(a.bits(), c.bits());
            }
        }
    }
}

/// Found: a row of an empty last dimension was indexed at element 0 (a
/// debug assertion; in release, a slice past an empty storage). gather_rows
/// with rows of width 0 into a longer destination.
#[test]
fn found_row_of_empty_last_dimension() {
    let keep = KeepPositions::from_rows(11, &[vec![]]).unwrap();
    let src: Vec<f32> = vec![];
    let mut dst: Vec<f32> = vec![];
    let s = View::contiguous(&src, [1, 11, 0]).unwrap();
    let mut d = ViewMut::contiguous(&mut dst, [1, 1, 0]).unwrap();
    gather_rows(&[s], &keep, Padding::Right, std::slice::from_mut(&mut d)).unwrap();
    assert!(s.row([0, 5, 0]).is_empty());
    assert!(d.row_mut([0, 0, 0]).is_empty());
}

/// Found: glimpse_scores widened every query head before looking at the
/// output: rows without visual tokens, with broadcast queries of many heads,
/// asked for hundreds of GiB (an abort). An empty output returns at once.
#[test]
fn found_glimpse_scores_work_for_empty_output() {
    let rows = RowLayout::new(
        1,
        &[RowSpec {
            start: 0,
            end: 1,
            visual: vec![],
        }],
    )
    .unwrap();
    let (hq, d) = (1 << 30, 1 << 10);
    let data = vec![0.5f32; d];
    let q = View::new(
        &data,
        foveal::Layout::strided([1, hq, d], [0, 0, 1]).unwrap(),
    )
    .unwrap();
    let k = View::new(
        &data,
        foveal::Layout::strided([1, 1, 1, d], [0, 0, 0, 1]).unwrap(),
    )
    .unwrap();
    let mut none: Vec<f32> = vec![];
    let mut out = ViewMut::contiguous(&mut none, [1, 0, hq]).unwrap();
    let r = glimpse_scores(q, k, &rows, None, ScoreMode::Logits, &mut out);
    assert!(r.is_ok() || r.is_err_and(|e| !matches!(e, foveal::Error::Cuda { .. })));
}

/// Found: compact_kv walked every (row, slot, head) of destinations whose
/// rows are empty (width 0), so a huge slot count never returned.
#[test]
fn found_compact_kv_empty_rows_of_huge_destination() {
    let keep = KeepPositions::from_rows(2, &[vec![0, 1]]).unwrap();
    let none: Vec<f32> = vec![];
    let s = View::contiguous(&none, [1, 2, 1, 0]).unwrap();
    let mut dst: Vec<f32> = vec![];
    let mut d = ViewMut::contiguous(&mut dst, [1, usize::MAX, 1, 0]).unwrap();
    let mut dst2: Vec<f32> = vec![];
    let mut d2 = ViewMut::contiguous(&mut dst2, [1, usize::MAX, 1, 0]).unwrap();
    let r = compact_kv(
        &[s],
        &[s],
        &keep,
        Padding::Left,
        std::slice::from_mut(&mut d),
        std::slice::from_mut(&mut d2),
    );
    assert!(r.is_ok() || r.is_err_and(|e| !matches!(e, foveal::Error::Cuda { .. })));
}
