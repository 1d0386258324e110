//! Layouts and views, the row layout and what is built from it (KeepSet,
//! KeepPositions), ScaleSet and the window counts, the lengths types, the
//! text-guided selection rule, token_pack's sizes, the layer softmax.

use foveal::compact_kv::KeepPositions;
use foveal::cross_attention::SeqLens;
use foveal::multiscale_gather::{max_tokens, ScaleSet};
use foveal::text_guided_select::{quantize, select_from_scores};
use foveal::token_pack::{resized_grid, resized_side, source_index};
use foveal::window_mean::num_windows;
use foveal::{glance_fusion, text_guided_select, Error};
use foveal::{KeepSet, Layout, RowLayout, RowSpec, View, ViewMut};
use proptest::prelude::*;

use crate::arb::{config, index, index_list, length, refused, scalar, size, strides, EDGES};

/// One past the largest offset, in exact arithmetic (None: past u128).
fn exact_span(shape: &[usize], strides: &[usize]) -> Option<u128> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0u128;
    for (&n, &s) in shape.iter().zip(strides) {
        last = last.checked_add((n as u128 - 1).checked_mul(s as u128)?)?;
    }
    Some(last + 1)
}

fn row_spec() -> impl Strategy<Value = RowSpec> {
    (index(), length(), index_list(6)).prop_map(|(start, len, visual)| RowSpec {
        start,
        end: start.saturating_add(len),
        visual,
    })
}

proptest! {
    #![proptest_config(config())]

    /// Layout::contiguous, strided, bshd, bhsd and their accessors.
    #[test]
    fn layouts(shape in prop::array::uniform4(size()), st in strides(), storage in 0usize..64) {
        let c = Layout::contiguous(shape);
        let span = exact_span(&shape, &c.strides());
        match span {
            Some(s) if s <= usize::MAX as u128 => prop_assert_eq!(c.span() as u128, s),
            _ => prop_assert_eq!(c.span(), usize::MAX),
        }
        let numel = if shape.contains(&0) {
            Some(0)
        } else {
            shape.iter().try_fold(1u128, |n, &d| n.checked_mul(d as u128))
        };
        prop_assert_eq!(
            c.numel() as u128,
            numel.map_or(usize::MAX as u128, |n| n.min(usize::MAX as u128))
        );
        let _ = c.is_non_overlapping();
        let [b, s, h, d] = shape;
        for l in [Layout::bshd(b, s, h, d), Layout::bhsd(b, s, h, d)] {
            let _ = (l.span(), l.numel(), l.is_non_overlapping());
        }
        let strides = st.of(shape);
        match Layout::strided(shape, strides) {
            Ok(l) => {
                prop_assert!(shape[3] <= 1 || strides[3] == 1);
                prop_assert_eq!(Some(l.span() as u128), exact_span(&shape, &strides));
                if l.is_non_overlapping() && l.numel() <= 4096 {
                    // No two indices share an offset.
                    let mut offsets: Vec<usize> =
                        crate::arb::indices(shape).map(|i| l.offset(i)).collect();
                    offsets.sort_unstable();
                    offsets.dedup();
                    prop_assert_eq!(offsets.len(), l.numel());
                }
                let data = vec![0u8; storage];
                let fits = l.span() <= storage;
                prop_assert_eq!(View::new(&data, l).is_ok(), fits);
                let mut data = data;
                prop_assert_eq!(
                    ViewMut::new(&mut data, l).is_ok(),
                    fits && l.is_non_overlapping()
                );
            }
            Err(e) => prop_assert!(matches!(e, Error::Shape { .. }), "{e:?}"),
        }
        let data = vec![0f32; storage];
        let _ = View::contiguous(&data, shape);
        let mut data = data;
        let _ = ViewMut::contiguous(&mut data, shape);
    }

    /// RowLayout::new, and what is built from a row layout.
    #[test]
    fn row_layouts(
        seq in size(),
        rows in prop::collection::vec(row_spec(), 0..4),
        kept in prop::collection::vec(index_list(4), 0..4),
        drop_last in any::<bool>(),
    ) {
        let Ok(layout) = RowLayout::new(seq, &rows) else { return Ok(()) };
        prop_assert_eq!(layout.batch(), rows.len());
        prop_assert_eq!(layout.seq(), seq);
        for (b, r) in rows.iter().enumerate() {
            prop_assert_eq!((layout.start(b), layout.end(b)), (r.start, r.end));
            prop_assert!(r.start < r.end && r.end <= seq);
            let visual: Vec<usize> = layout.visual(b).iter().map(|&p| p as usize).collect();
            prop_assert_eq!(&visual, &r.visual);
        }
        let _ = KeepSet::new(&layout);
        match KeepSet::from_rows(&layout, &kept) {
            Ok(set) => {
                for (b, k) in kept.iter().enumerate() {
                    let got: Vec<usize> = set.kept(b).iter().map(|&i| i as usize).collect();
                    prop_assert_eq!(&got, k);
                }
            }
            Err(e) => prop_assert!(refused(&e), "{e:?}"),
        }
        // for_rows allocates the batch times the longest row.
        if layout.max_len() <= 4096 {
            let kp = KeepPositions::for_rows(&layout, drop_last);
            prop_assert_eq!(kp.batch(), rows.len());
            prop_assert_eq!(kp.width(), layout.max_len() - usize::from(drop_last));
        }
    }

    /// KeepPositions::from_rows: positions below src_seq, ascending, kept exactly.
    #[test]
    fn keep_positions_from_rows(src_seq in size(), rows in prop::collection::vec(index_list(5), 0..4)) {
        match KeepPositions::from_rows(src_seq, &rows) {
            Ok(kp) => {
                prop_assert_eq!(kp.batch(), rows.len());
                for (b, r) in rows.iter().enumerate() {
                    let got: Vec<usize> = kp.row(b).iter().map(|&p| p as usize).collect();
                    prop_assert_eq!(&got, r);
                    prop_assert!(r.iter().all(|&p| p < src_seq));
                }
            }
            Err(e) => prop_assert!(refused(&e), "{e:?}"),
        }
    }

    /// ScaleSet::new, num_windows and max_tokens (against a count of every window).
    #[test]
    fn scale_sets(
        scales in prop::collection::vec((size(), size()), 0..20),
        h in size(),
        w in size(),
        window in size(),
    ) {
        let n = num_windows(h, w, window);
        if window >= 1 && h <= 64 && w <= 64 {
            prop_assert_eq!(n, h.div_ceil(window) * w.div_ceil(window));
        }
        let Ok(set) = ScaleSet::new(&scales) else {
            prop_assert!(scales.is_empty() || scales.len() > 16 || scales.iter().any(|&(a, b)| a == 0 || b == 0));
            return Ok(());
        };
        prop_assert_eq!(set.scales(), &scales[..]);
        let got = max_tokens(h, w, window, &set);
        if window >= 1 && h <= 64 && w <= 64 {
            // Every window at the scale with the most tokens.
            let mut want = 0;
            for y0 in (0..h).step_by(window) {
                for x0 in (0..w).step_by(window) {
                    let (wh, ww) = ((y0 + window).min(h) - y0, (x0 + window).min(w) - x0);
                    want += scales.iter().map(|&(kh, kw)| wh.div_ceil(kh) * ww.div_ceil(kw)).max().unwrap();
                }
            }
            prop_assert_eq!(got, want);
        }
    }

    /// The lengths of text_guided_select, cross_attention and glance_fusion.
    #[test]
    fn lengths(a in prop::collection::vec(length(), 0..5), b in prop::collection::vec(length(), 0..5), batch in 0usize..6, x in size(), y in size()) {
        let same = a.len() == b.len();
        prop_assert_eq!(text_guided_select::Lengths::new(&a, &b).is_ok(), same);
        prop_assert_eq!(SeqLens::new(&a, &b).is_ok(), same);
        prop_assert_eq!(glance_fusion::Lengths::new(&a, &b).is_ok(), same);
        // full() allocates one entry per row: `batch` stays small.
        let (t, s, g) = (
            text_guided_select::Lengths::full(batch, x, y),
            SeqLens::full(batch, x, y),
            glance_fusion::Lengths::full(batch, x, y),
        );
        prop_assert_eq!(t.t_len(), &vec![x; batch][..]);
        prop_assert_eq!(s.kv(), &vec![y; batch][..]);
        prop_assert_eq!(g.m_len(), &vec![y; batch][..]);
    }

    /// text_guided_select's rule on given scores, with any gamma.
    #[test]
    fn selection_rule(s in prop::collection::vec(scalar(), 0..12), gamma in scalar()) {
        for &v in &s {
            prop_assert!(quantize(v) <= 2 << 32);
        }
        let kept = select_from_scores(&s, gamma);
        prop_assert!(kept.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(kept.iter().all(|&i| i < s.len()));
        if gamma >= 1.0 {
            prop_assert_eq!(kept.len(), s.len());
        }
    }

    /// token_pack's sizes and source indices.
    #[test]
    fn token_pack_sizes(h in size(), w in size(), rho in prop_oneof![0.01f64..20.0, Just(f64::NAN), Just(f64::INFINITY), Just(0.0), Just(-1.0), Just(1e-300)], dst in size(), n_in in size(), n_out in size()) {
        if let Ok(side) = resized_side(h, rho) {
            prop_assert!(side >= 2 && side % 2 == 0);
        }
        let _ = resized_grid(h, w, rho);
        let (i0, i1, l) = source_index(dst, n_in, n_out);
        if n_in >= 1 && n_out >= 1 && dst < n_out {
            prop_assert!(i0 < n_in && i1 < n_in && i0 <= i1);
            prop_assert!((0.0..=1.0).contains(&l) || n_in == 1, "{l}");
        }
    }

    /// glance_fusion's softmax over the layers, any lengths and values.
    #[test]
    fn layer_softmax(g in prop::collection::vec(scalar(), 0..10), n in 0usize..10) {
        let mut w = vec![0f32; n];
        glance_fusion::layer_softmax(&g, &mut w);
        if g.iter().all(|x| x.is_finite()) && !g.is_empty() && n >= g.len() {
            let sum: f32 = w[..g.len()].iter().sum();
            prop_assert!((sum - 1.0).abs() < 1e-4, "{sum}");
        }
    }
}

/// Sizes at every edge value, exhaustively.
#[test]
fn edge_sizes() {
    for &a in &EDGES {
        for &b in &EDGES {
            let _ = num_windows(a, b, 1);
            let _ = max_tokens(a, b, 4, &ScaleSet::three());
            let _ = Layout::contiguous([a, b, a, 1]).span();
            let _ = Layout::bhsd(a, b, a, b).span();
            let _ = resized_grid(a, b, 1e-9);
        }
    }
}

/// Found: num_windows multiplied the window counts unchecked (`2 x usize::MAX`).
#[test]
fn found_num_windows_overflow() {
    assert_eq!(num_windows(2, usize::MAX, 1), usize::MAX);
    assert_eq!(num_windows(2, 3, 0), 6);
}

/// Found: max_tokens counted window by window (a huge map never returned)
/// and multiplied unchecked. Now four window sizes, saturating.
#[test]
fn found_max_tokens_huge_map() {
    let three = ScaleSet::three();
    assert_eq!(max_tokens(usize::MAX, 3, 1, &three), usize::MAX);
    assert_eq!(max_tokens(1 << 32, 1 << 32, 1 << 16, &three), usize::MAX);
    // 5 x 7 at window 4: windows 4x4, 4x3, 1x4, 1x3 at kernel 1: 16+12+4+3.
    let one = ScaleSet::new(&[(1, 1)]).unwrap();
    assert_eq!(max_tokens(5, 7, 4, &one), 35);
}

/// Found: select_from_scores added 1 to a saturated `gamma x total`
/// (gamma huge): every index is kept, as for any gamma of 1 or more.
#[test]
fn found_selection_rule_huge_gamma() {
    let s = [0.5f32, 2.0, 0.25];
    assert_eq!(select_from_scores(&s, f32::MAX), vec![0, 1, 2]);
    assert_eq!(select_from_scores(&s, f32::INFINITY), vec![0, 1, 2]);
}

/// Found: source_index subtracted 1 from an empty source size.
#[test]
fn found_source_index_empty_source() {
    let (i0, i1, _) = source_index(0, 0, 0);
    assert_eq!((i0, i1), (0, 0));
}

/// Found (a silent wrong answer, not a panic): KeepPositions::from_rows
/// stored positions past i32::MAX truncated (2^63 became 0).
#[test]
fn found_keep_positions_truncated() {
    assert!(KeepPositions::from_rows(usize::MAX, &[vec![1 << 63]]).is_err());
    assert!(KeepPositions::from_rows(i32::MAX as usize + 1, &[vec![0]]).is_err());
    let kp = KeepPositions::from_rows(i32::MAX as usize, &[vec![i32::MAX as usize - 1]]).unwrap();
    assert_eq!(kp.row(0), &[i32::MAX - 1]);
}
