//! Gaze Attention: its layout (GazeRow, GazeLayout, Routes) and ops
//! (region_descriptors, route_topk, gaze_decode, gaze_route_decode).

use foveal::gaze_decode::cpu::gaze_decode;
use foveal::gaze_route_decode::cpu::gaze_route_decode;
use foveal::region_descriptors::cpu::region_descriptors;
use foveal::route_topk::cpu::route_topk;
use foveal::{GazeLayout, GazeRow, RegionShape, Routes};
use proptest::prelude::*;

use crate::arb::{
    accepted, apply, arg, comparable, config, index, index_list, perturb, positive, refused,
    scalar, size, Buf, Spec,
};

/// A valid layout: 1 to 2 rows in a cache of 1 to 10 positions, each row a
/// visible prefix and regions of 1 to 3 positions after it.
fn layout() -> impl Strategy<Value = GazeLayout> {
    (
        1usize..=10,
        prop::collection::vec(
            (any::<u16>(), prop::collection::vec(1usize..=3, 0..6)),
            1..=2,
        ),
    )
        .prop_map(|(seq, specs)| {
            let rows: Vec<GazeRow> = specs
                .iter()
                .map(|(v, sizes)| {
                    let mut row = GazeRow::new();
                    let mut at = *v as usize % (seq + 1);
                    row.push_visible(0..at);
                    for &n in sizes {
                        if at + n <= seq {
                            row.regions.push((at..at + n).collect());
                            at += n;
                        }
                    }
                    row
                })
                .collect();
            GazeLayout::new(seq, &rows).expect("valid rows")
        })
}

proptest! {
    #![proptest_config(config())]

    /// GazeRow::push_units, GazeLayout::new and extend_visible, Routes::from_ids:
    /// any frames, grids, region shapes, ranges, positions and ids.
    #[test]
    fn gaze_layouts(
        frames in prop::collection::vec(index(), 0..3),
        (h, w) in (size(), size()),
        (rf, rh, rw) in (0usize..3, 0usize..4, 0usize..4),
        visible in prop::collection::vec((index(), 0usize..4), 0..3),
        extra in prop::collection::vec(index_list(3), 0..3),
        seq in prop_oneof![4 => 0usize..40, 1 => prop::sample::select(&[i32::MAX as usize + 1, usize::MAX][..])],
        (ext_row, ext_end) in (0usize..3, index()),
        (q, hd, k) in (0usize..3, 0usize..3, 0usize..4),
        ids in prop::collection::vec(prop_oneof![-2i32..6, Just(i32::MAX), Just(i32::MIN)], 0..40),
    ) {
        let mut row = GazeRow::new();
        for &(s, n) in &visible {
            row.push_visible(s..s.saturating_add(n));
        }
        let shape = RegionShape { frames: rf, height: rh, width: rw };
        // A unit's positions are its grid's: refused before they overflow,
        // and a grid of more than a few hundred tokens is only checked.
        if h.saturating_mul(w).saturating_mul(frames.len()) <= 512 || frames.iter().any(|&f| f > i32::MAX as usize) {
            match row.push_units(&frames, h, w, shape) {
                Ok(ids) => prop_assert_eq!(ids.end, row.regions.len()),
                Err(e) => prop_assert!(refused(&e)),
            }
        }
        row.regions.extend(extra);
        let Ok(mut layout) = GazeLayout::new(seq, std::slice::from_ref(&row)) else { return Ok(()) };
        prop_assert_eq!(layout.regions(0), row.regions.len());
        for (r, region) in row.regions.iter().enumerate() {
            let got: Vec<usize> = layout.region(0, r).iter().map(|&p| p as usize).collect();
            prop_assert_eq!(&got, region);
        }
        let before = layout.end(0);
        match layout.extend_visible(ext_row, ext_end) {
            Ok(()) => prop_assert_eq!(layout.end(0), ext_end.max(before)),
            Err(e) => prop_assert!(refused(&e)),
        }
        match Routes::from_ids(&layout, q, hd, k, &ids) {
            Ok(r) => {
                prop_assert_eq!(r.shape(), [1, q, hd, k]);
                for (qi, hi) in (0..q).flat_map(|a| (0..hd).map(move |b| (a, b))) {
                    let l = r.get(0, qi, hi);
                    prop_assert!(l.windows(2).all(|p| p[0] < p[1]));
                    prop_assert!(l.iter().all(|&x| x >= 0 && (x as usize) < layout.regions(0)));
                }
            }
            Err(e) => prop_assert!(refused(&e)),
        }
        for (a, b) in [(usize::MAX, 2), (2, usize::MAX), (1 << 40, 1 << 40)] {
            prop_assert!(Routes::from_ids(&layout, a, b, 1 << 30, &[]).is_err() || a == 0 || b == 0);
        }
    }

    /// region_descriptors, route_topk, gaze_decode and gaze_route_decode
    /// on one layout: any keys, queries, region ranges, top-k, scale and outputs.
    #[test]
    fn gaze_ops(
        layout in layout(),
        (hkv, group, d) in (positive(), prop_oneof![4 => 1usize..=3, 1 => size()], size()),
        (r_extra, top_k) in (0usize..2, prop_oneof![4 => 0usize..4, 1 => size()]),
        (r0, r1) in (0usize..8, 0usize..8),
        scale in prop_oneof![2 => Just(None), 1 => scalar().prop_map(Some)],
        with_lse in any::<bool>(),
        p in perturb(),
        (ak, av, ad, aq, ao, al) in (arg(), arg(), arg(), arg(), arg(), arg()),
        seed in any::<u64>(),
    ) {
        let (b, s, hq) = (layout.batch(), layout.seq(), hkv.saturating_mul(group));
        let r = layout.max_regions() + r_extra;
        let k = Buf::<f32, 4>::input(&ak.spec(apply([b, s, hkv, d], 0, p)), seed);
        let v = Buf::<f32, 4>::input(&av.spec(apply([b, s, hkv, d], 1, p)), seed ^ 1);
        let mut desc = Buf::<f32, 4>::output(&ad.spec(apply([b, hkv, r, d], 2, p)));
        let regions = r0.min(r1)..r0.max(r1);
        let described = {
            let (Some(kv), Some(mut dv)) = (k.view(), desc.view_mut()) else { return Ok(()) };
            accepted(region_descriptors(kv, &layout, regions.clone(), &mut dv))?
        };
        if described && comparable(&[k.numel(), desc.numel()]) {
            let (kc, mut dc) = (k.contiguous_copy(), desc.fresh_contiguous());
            region_descriptors(kc.view().unwrap(), &layout, regions.clone(), &mut dc.view_mut().unwrap()).unwrap();
            prop_assert_eq!(desc.bits(), dc.bits());
        }
        // Descriptors of every region, for routing.
        let desc = Buf::<f32, 4>::input(&ad.spec(apply([b, hkv, r, d], 2, p)), seed ^ 2);
        let Some(descv) = desc.view() else { return Ok(()) };
        let q = Buf::<f32, 3>::input(&aq.spec(apply([b, hq, d], 3, p)), seed ^ 3);
        // route_topk's queries: the same values, [B, 1, Hq, D].
        if q.view().is_none() || !comparable(&[q.numel()]) {
            return Ok(());
        }
        let q4 = Buf::<f32, 4> { spec: Spec::contiguous([b, 1, hq, d]), data: q.logical() };
        let mut routes = Routes::new(&layout, 1, hq.min(64), top_k.min(64));
        let routed = match q4.view() {
            Some(qv) => accepted(route_topk(qv, descv, &layout, top_k, &mut routes))?,
            None => false,
        };
        if routed {
            for h in 0..hq {
                let l = routes.get(0, 0, h);
                prop_assert!(l.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(l.len() <= top_k.min(layout.regions(0)));
            }
        }
        let mut o = Buf::<f32, 3>::output(&ao.spec(apply([b, hq, d], 4, p)));
        let mut lse = Buf::<f32, 2>::output(&al.spec(apply([b, hq], 5, p)));
        let (Some(qv), Some(kv), Some(vv)) = (q.view(), k.view(), v.view()) else { return Ok(()) };
        let decoded = {
            let Some(mut ov) = o.view_mut() else { return Ok(()) };
            let mut lv = if with_lse { match lse.view_mut() { Some(l) => Some(l), None => return Ok(()) } } else { None };
            accepted(gaze_decode(qv, kv, vv, &layout, &routes, scale, &mut ov, lv.as_mut()))?
        };
        let mut fused_routes = Routes::new(&layout, 1, hq.min(64), top_k.min(64));
        let mut o2 = o.fresh_contiguous();
        let mut l2 = lse.fresh_contiguous();
        let fused = {
            let (Some(mut ov), Some(mut lv)) = (o2.view_mut(), l2.view_mut()) else { return Ok(()) };
            accepted(gaze_route_decode(qv, kv, vv, descv, &layout, top_k, scale, &mut ov, if with_lse { Some(&mut lv) } else { None }, &mut fused_routes))?
        };
        if decoded && comparable(&[q.numel(), k.numel(), o.numel()]) {
            let (qc, kc, vc) = (q.contiguous_copy(), k.contiguous_copy(), v.contiguous_copy());
            let (mut oc, mut lc) = (o.fresh_contiguous(), lse.fresh_contiguous());
            let mut lcv = lc.view_mut().unwrap();
            gaze_decode(qc.view().unwrap(), kc.view().unwrap(), vc.view().unwrap(), &layout, &routes, scale, &mut oc.view_mut().unwrap(), if with_lse { Some(&mut lcv) } else { None }).unwrap();
            prop_assert_eq!(o.bits(), oc.bits());
            if with_lse { prop_assert_eq!(lse.bits(), lc.bits()); }
            // The fused op routes as route_topk does, and decodes alike.
            if routed && fused {
                prop_assert_eq!(routes.ids(), fused_routes.ids());
                prop_assert_eq!(o.bits(), o2.bits());
            }
        }
    }
}

/// Found: region_descriptors split its scratch into chunks of the head
/// dimension, 0 included (a panic); an empty desc now returns at once.
#[test]
fn found_region_descriptors_head_dim_zero() {
    let mut row = GazeRow::new();
    row.regions.push(vec![0, 1]);
    let layout = GazeLayout::new(2, &[row]).unwrap();
    let none: Vec<f32> = vec![];
    let k = foveal::View::contiguous(&none, [1, 2, 1, 0]).unwrap();
    let mut out: Vec<f32> = vec![];
    let mut desc = foveal::ViewMut::contiguous(&mut out, [1, 1, 1, 0]).unwrap();
    let r = region_descriptors(k, &layout, 0..1, &mut desc);
    assert!(r.is_ok() || r.is_err_and(|e| refused(&e)));
}

/// Found: Routes::from_ids multiplied its shape unchecked.
#[test]
fn found_routes_from_ids_overflow() {
    let layout = GazeLayout::new(1, &[GazeRow::new()]).unwrap();
    assert!(Routes::from_ids(&layout, usize::MAX, 2, 1 << 30, &[]).is_err());
}

/// Found: push_units added a frame's base to its grid offsets unchecked;
/// positions past 32 bits are refused up front.
#[test]
fn found_push_units_position_overflow() {
    let mut row = GazeRow::new();
    let r = row.push_units(&[usize::MAX], 2, 2, RegionShape::default());
    assert!(r.is_err_and(|e| refused(&e)));
    assert!(row.regions.is_empty());
}
