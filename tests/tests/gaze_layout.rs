//! GazeRow, GazeLayout and Routes: the region tables Gaze Attention's ops
//! share (SPEC "Gaze Attention"). Regions are written out by hand here from
//! the documented rule (tiles of the grid in raster order, frame then row
//! then column inside a region, border tiles smaller).

use foveal::{Error, GazeLayout, GazeRow, RegionShape, Routes};
use foveal_tests::gaze_cases::{random_gaze_rows, GazeOpts};
use foveal_tests::rng;

fn shape(frames: usize, height: usize, width: usize) -> RegionShape {
    RegionShape {
        frames,
        height,
        width,
    }
}

/// The positions of tile rows `ys` x columns `xs` of each frame start in `frames`.
fn tile(
    frames: &[usize],
    w: usize,
    ys: std::ops::Range<usize>,
    xs: std::ops::Range<usize>,
) -> Vec<usize> {
    let mut out = Vec::new();
    for &f in frames {
        for y in ys.clone() {
            for x in xs.clone() {
                out.push(f + y * w + x);
            }
        }
    }
    out
}

#[test]
fn push_units_tiles_an_image_with_smaller_border_regions() {
    let mut row = GazeRow::new();
    let ids = row
        .push_units(&[10], 13, 14, RegionShape::default())
        .unwrap();
    assert_eq!(ids, 0..9, "3 x 3 tiles of 6 x 6");
    let (ys, xs) = ([0..6, 6..12, 12..13], [0..6, 6..12, 12..14]);
    for (i, region) in row.regions.iter().enumerate() {
        let want = tile(&[10], 14, ys[i / 3].clone(), xs[i % 3].clone());
        assert_eq!(region, &want, "region {i}");
    }
    assert_eq!(row.regions[8].len(), 2, "the corner region is 1 x 2");
    assert_eq!(RegionShape::default(), shape(1, 6, 6));
}

#[test]
fn push_units_spans_frames_and_appends_ids() {
    let mut row = GazeRow::new();
    row.push_units(&[0], 2, 2, shape(1, 2, 2)).unwrap();
    // three frames of 4 x 3 with context tokens between them, 2 frames a region
    let frames = [5, 20, 40];
    let ids = row.push_units(&frames, 4, 3, shape(2, 3, 2)).unwrap();
    assert_eq!(ids, 1..9, "2 frame groups x 2 x 2 tiles, after region 0");
    assert_eq!(row.regions[0], vec![0, 1, 2, 3]);
    let (ys, xs) = ([0..3, 3..4], [0..2, 2..3]);
    for g in 0..2 {
        let group = &frames[2 * g..(2 * g + 2).min(3)];
        for t in 0..4 {
            let want = tile(group, 3, ys[t / 2].clone(), xs[t % 2].clone());
            assert_eq!(row.regions[1 + 4 * g + t], want, "group {g}, tile {t}");
        }
    }
    assert_eq!(row.regions[1].len(), 12, "two frames of 3 x 2");
    assert_eq!(row.regions[8].len(), 1, "the last frame's corner, alone");
    GazeLayout::new(52, &[row]).expect("frames 5.., 20.., 40.. do not overlap");
}

#[test]
fn push_units_rejects_empty_shapes_and_grids() {
    let mut row = GazeRow::new();
    for s in [shape(0, 6, 6), shape(1, 0, 6), shape(1, 6, 0)] {
        assert!(
            matches!(
                row.push_units(&[0], 4, 4, s),
                Err(Error::Value { arg: "shape", .. })
            ),
            "{s:?}"
        );
    }
    for (h, w) in [(0, 4), (4, 0)] {
        assert!(matches!(
            row.push_units(&[0], h, w, shape(1, 2, 2)),
            Err(Error::Value { arg: "grid", .. })
        ));
    }
    assert!(row.regions.is_empty(), "nothing added on error");
    assert_eq!(
        row.push_units(&[], 4, 4, shape(1, 2, 2)).unwrap(),
        0..0,
        "no frames, no regions"
    );
}

#[test]
fn push_visible_merges_adjacent_ranges() {
    let mut row = GazeRow::new();
    row.push_visible(0..3);
    row.push_visible(3..5);
    row.push_visible(7..7);
    row.push_visible(8..9);
    assert_eq!(row.visible, vec![0..5, 8..9]);
}

/// Row 0: text 0..2, a 3 x 3 image at 2 in 2 x 2 tiles (regions of 4, 2, 2
/// and 1 tokens), text 11..13. Row 1: text 0..1, one region [4, 2].
fn two_rows() -> Vec<GazeRow> {
    let mut a = GazeRow::new();
    a.push_visible(0..2);
    a.push_units(&[2], 3, 3, shape(1, 2, 2)).unwrap();
    a.push_visible(11..13);
    let mut b = GazeRow::new();
    b.push_visible(0..1);
    b.regions.push(vec![4, 2]);
    vec![a, b]
}

#[test]
fn layout_packs_regions_and_visible_ranges() {
    let rows = two_rows();
    let layout = GazeLayout::new(16, &rows).unwrap();
    assert_eq!(
        (
            layout.batch(),
            layout.seq(),
            layout.max_regions(),
            layout.max_region_len(),
            layout.max_visible()
        ),
        (2, 16, 4, 4, 2)
    );
    let (count, len, pos) = layout.packed_regions();
    assert_eq!(count, &[4, 1]);
    assert_eq!(len, &[4, 2, 2, 1, 2, 0, 0, 0]);
    let mut want_pos = [-1; 2 * 4 * 4];
    for (j, p) in [
        [2, 3, 5, 6],
        [4, -1, 7, -1],
        [8, 9, -1, -1],
        [10, -1, -1, -1],
    ]
    .iter()
    .enumerate()
    {
        let p: Vec<i32> = p.iter().copied().filter(|&x| x >= 0).collect();
        want_pos[j * 4..j * 4 + p.len()].copy_from_slice(&p);
    }
    want_pos[16..18].copy_from_slice(&[4, 2]);
    assert_eq!(pos, &want_pos[..]);
    assert_eq!(layout.region(1, 0), &[4, 2], "listed order kept");
    let (vcount, vis) = layout.packed_visible();
    assert_eq!(vcount, &[2, 1]);
    assert_eq!(vis, &[0, 2, 11, 13, 0, 1, 0, 0]);
    assert_eq!((layout.end(0), layout.end(1)), (13, 5));
    assert_eq!((layout.visible_len(0), layout.visible_len(1)), (4, 1));
    assert_ne!(
        GazeLayout::new(16, &rows).unwrap().id(),
        layout.id(),
        "each layout its own identity"
    );
}

#[test]
fn layout_rejects_overlaps_out_of_range_and_empty_parts() {
    let rows = two_rows();
    let err = |rows: &[GazeRow], seq: usize| GazeLayout::new(seq, rows).unwrap_err();
    assert!(
        matches!(err(&[], 4), Error::Shape { arg: "rows", .. }),
        "empty batch"
    );
    assert!(
        matches!(err(&rows, 12), Error::Index { arg: "rows", .. }),
        "position 12 past a cache of 12"
    );
    let mut overlap = rows.clone();
    overlap[1].regions.push(vec![0]);
    assert!(
        matches!(err(&overlap, 16), Error::Value { arg: "rows", .. }),
        "visible and in a region"
    );
    let mut twice = rows.clone();
    twice[0].regions.push(vec![3]);
    assert!(
        matches!(err(&twice, 16), Error::Value { arg: "rows", .. }),
        "in two regions"
    );
    let mut dup = rows.clone();
    dup[1].regions[0].push(4);
    assert!(
        matches!(err(&dup, 16), Error::Value { arg: "rows", .. }),
        "twice in one region"
    );
    let mut vis = rows.clone();
    vis[1].visible.push(0..1);
    assert!(
        matches!(err(&vis, 16), Error::Value { arg: "rows", .. }),
        "visible twice"
    );
    let mut empty_region = rows.clone();
    empty_region[1].regions.push(vec![]);
    assert!(matches!(
        err(&empty_region, 16),
        Error::Value { arg: "regions", .. }
    ));
    let mut empty_range = rows.clone();
    #[allow(clippy::reversed_empty_ranges)]
    empty_range[1].visible.push(9..9);
    assert!(matches!(
        err(&empty_range, 16),
        Error::Value { arg: "visible", .. }
    ));
    assert!(matches!(
        err(&rows, i32::MAX as usize + 1),
        Error::Value { arg: "seq", .. }
    ));
    // rows without regions or visible keys are fine, and another row's positions may repeat
    let layout = GazeLayout::new(16, &[rows[0].clone(), GazeRow::new(), rows[0].clone()]).unwrap();
    assert_eq!(
        (layout.regions(1), layout.end(1), layout.regions(2)),
        (0, 0, 4)
    );
}

#[test]
fn extend_visible_grows_the_tail_and_keeps_identity() {
    let mut layout = GazeLayout::new(20, &two_rows()).unwrap();
    let id = layout.id();
    layout.extend_visible(0, 15).unwrap();
    assert_eq!(
        layout.visible(0).collect::<Vec<_>>(),
        vec![0..2, 11..15],
        "merged with the last range"
    );
    layout.extend_visible(1, 7).unwrap();
    assert_eq!(
        layout.visible(1).collect::<Vec<_>>(),
        vec![0..1, 5..7],
        "a new range after the region"
    );
    layout.extend_visible(1, 8).unwrap();
    assert_eq!(layout.visible(1).collect::<Vec<_>>(), vec![0..1, 5..8]);
    layout.extend_visible(1, 8).unwrap();
    assert_eq!((layout.end(0), layout.end(1), layout.id()), (15, 8, id));
    assert_eq!(layout.regions(0), 4, "regions untouched");

    // a third range in row 1 widens the packed array; row 0 keeps its ranges
    let mut rows = two_rows();
    rows[1].visible.push(3..4);
    let mut layout = GazeLayout::new(20, &rows).unwrap();
    let id = layout.id();
    assert_eq!(layout.max_visible(), 2);
    layout.extend_visible(1, 7).unwrap();
    assert_eq!(
        layout.visible(1).collect::<Vec<_>>(),
        vec![0..1, 3..4, 5..7]
    );
    assert_eq!(layout.max_visible(), 3);
    assert_eq!(layout.visible(0).collect::<Vec<_>>(), vec![0..2, 11..13]);
    let (vcount, vis) = layout.packed_visible();
    assert_eq!(vcount, &[2, 3]);
    assert_eq!(vis, &[0, 2, 11, 13, 0, 0, 0, 1, 3, 4, 5, 7]);

    assert!(matches!(
        layout.extend_visible(2, 10),
        Err(Error::Index { arg: "b", .. })
    ));
    assert!(matches!(
        layout.extend_visible(0, i32::MAX as usize + 1),
        Err(Error::Index { arg: "end", .. })
    ));
    assert!(matches!(
        layout.extend_visible(0, 12),
        Err(Error::Value { arg: "end", .. })
    ));

    // past the capacity: the cache grew by a decode step
    assert_eq!(layout.seq(), 20);
    layout.extend_visible(0, 21).unwrap();
    assert_eq!((layout.seq(), layout.end(0), layout.id()), (21, 21, id));
    assert_eq!(layout.visible(0).collect::<Vec<_>>(), vec![0..2, 11..21]);
}

#[test]
fn routes_from_ids_checks_every_list() {
    let layout = GazeLayout::new(16, &two_rows()).unwrap();
    // [B=2, Nq=1, Hq=2, k=3]; row 1 has one region
    let ids = [0, 2, 3, 1, -1, -1, 0, -1, -1, -1, -1, -1];
    let routes = Routes::from_ids(&layout, 1, 2, 3, &ids).unwrap();
    assert_eq!(routes.shape(), [2, 1, 2, 3]);
    assert_eq!(routes.get(0, 0, 0), &[0, 2, 3]);
    assert_eq!(routes.get(0, 0, 1), &[1]);
    assert_eq!(routes.get(1, 0, 1), &[] as &[i32]);
    assert_eq!(routes.ids(), &ids);
    let bad = |ids: &[i32]| Routes::from_ids(&layout, 1, 2, 3, ids).unwrap_err();
    assert!(matches!(bad(&ids[..11]), Error::Shape { arg: "ids", .. }));
    let mut v = ids;
    v[6] = 1;
    assert!(
        matches!(bad(&v), Error::Index { arg: "ids", .. }),
        "row 1 has one region"
    );
    let mut v = ids;
    v[1] = 4;
    assert!(
        matches!(bad(&v), Error::Index { arg: "ids", .. }),
        "row 0 has four regions"
    );
    let mut v = ids;
    v[1] = 0;
    assert!(
        matches!(bad(&v), Error::Value { arg: "ids", .. }),
        "not strictly ascending"
    );
    let mut v = ids;
    v[5] = 2;
    assert!(
        matches!(bad(&v), Error::Value { arg: "ids", .. }),
        "an id after the padding"
    );
    let mut v = ids;
    v[5] = -2;
    assert!(
        matches!(bad(&v), Error::Value { arg: "ids", .. }),
        "padding other than -1"
    );
    let empty = Routes::new(&layout, 2, 2, 4);
    assert_eq!(empty.shape(), [2, 2, 2, 4]);
    assert!(empty.ids().iter().all(|&r| r == -1));
    assert_ne!(
        empty,
        Routes::from_ids(&layout, 2, 2, 4, &[-1; 32]).unwrap(),
        "unfilled routes are tied to no layout"
    );
}

#[test]
fn random_layouts_round_trip() {
    let mut r = rng(11);
    for _ in 0..50 {
        let (seq, rows) = random_gaze_rows(&mut r, 4, GazeOpts::default());
        let layout = GazeLayout::new(seq, &rows).unwrap();
        for (b, row) in rows.iter().enumerate() {
            assert_eq!(layout.regions(b), row.regions.len());
            for (j, region) in row.regions.iter().enumerate() {
                let got: Vec<usize> = layout.region(b, j).iter().map(|&p| p as usize).collect();
                assert_eq!(&got, region);
            }
            assert_eq!(layout.visible(b).collect::<Vec<_>>(), row.visible);
            let last = row
                .visible
                .iter()
                .map(|r| r.end)
                .chain(row.regions.iter().flatten().map(|&p| p + 1))
                .max();
            assert_eq!(layout.end(b), last.unwrap_or(0));
        }
    }
}
