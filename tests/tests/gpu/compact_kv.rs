//! keep_positions, compact_kv and gather_rows: the CUDA paths against the CPU
//! references (feature `cuda`; every test skips where there is no GPU).
//!
//! All three move or rank data without arithmetic, so GPU and CPU must agree
//! exactly: positions and lengths equal, destination storage bit-identical.
//! Destinations are poisoned first (NaN, `i32::MIN`) on both sides, so a slot
//! the kernel fails to write or to zero, or a write outside the destination
//! view, differs from the reference. Sources and destinations start at odd
//! element offsets and have odd row widths in some cases, so that the gather
//! falls back from 16-byte vectors to 8, 4, 2 or 1 byte accesses; more than 64
//! layers (128 planes) take several launches.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DeviceRepr};
use foveal::compact_kv::{cpu, cuda};
use foveal::cuda::{DevView, DevViewMut, DeviceKeepPositions, DeviceKeepSet, DeviceRowLayout};
use foveal::select_keep::cpu::select_keep as cpu_select_keep;
use foveal::select_keep::cuda::select_keep as cuda_select_keep;
use foveal::{
    Error, KeepPositions, KeepRule, KeepSet, Layout, Padding, RowLayout, RowSpec, View, ViewMut,
};
use foveal_tests::gpu::{
    assert_bits_eq, assert_untouched, cases, download, gpu, poisoned, upload, with_split_mut,
    DevBuf, GpuElem,
};
use foveal_tests::{indices, random_elem, random_rows, rng, Bits, KvOrder, Poison, RowOpts};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

use foveal_tests::random_rule;

// ---------------------------------------------------------------------------
// Keep sets and positions
// ---------------------------------------------------------------------------

/// The layout of contiguous logits `[B, nv_max]` (non-zero strides when
/// `nv_max` is 0).
fn logits_layout(rows: &RowLayout) -> Layout<2> {
    Layout::strided([rows.batch(), rows.nv_max()], [rows.nv_max().max(1), 1])
        .expect("logits layout")
}

/// Random logits `[B, nv_max]`, ties and NaN included.
fn random_logits(r: &mut StdRng, rows: &RowLayout) -> Vec<f32> {
    let ties = r.random_bool(0.5);
    (0..(rows.batch() * rows.nv_max()).max(1))
        .map(|_| match r.random_range(0..20) {
            0 => f32::NAN,
            _ if ties => [-1.0f32, -0.0, 0.0, 0.5, 2.0][r.random_range(0..5)],
            _ => r.random_range(-4.0f32..4.0),
        })
        .collect()
}

/// A random layout (the glimpse token kept out of the visual tokens where it
/// is to be dropped) with the positions the CPU keeps for a random keep set.
fn cpu_positions(r: &mut StdRng, batch: usize, seq: usize, drop_last: bool) -> KeepPositions {
    let glimpse_text = drop_last || r.random_bool(0.5);
    let rows = RowLayout::new(
        seq,
        &random_rows(r, batch, seq, RowOpts::with_all_visual(glimpse_text)),
    )
    .expect("rows");
    let logits = random_logits(r, &rows);
    let view = View::new(&logits, logits_layout(&rows)).expect("logits view");
    let mut keep = KeepSet::new(&rows);
    cpu_select_keep(view, &rows, &random_rule(r, 5), &mut keep).expect("select_keep (CPU)");
    let mut kp = KeepPositions::for_rows(&rows, drop_last);
    cpu::keep_positions(&rows, &keep, drop_last, &mut kp).expect("keep_positions (CPU)");
    kp
}

/// Random ascending position lists, not tied to a row layout: each row keeps
/// every source position with one probability (none, a few, most, all).
fn random_lists(r: &mut StdRng, batch: usize, seq: usize) -> KeepPositions {
    let rows: Vec<Vec<usize>> = (0..batch)
        .map(|_| {
            let p = [0.0, 0.2, 0.9, 1.0][r.random_range(0..4)];
            (0..seq).filter(|_| r.random_bool(p)).collect()
        })
        .collect();
    KeepPositions::from_rows(seq, &rows).expect("positions")
}

/// Positions of either kind ([`cpu_positions`] with or without dropping the
/// last position, or [`random_lists`]).
fn random_positions(r: &mut StdRng, batch: usize, seq: usize) -> KeepPositions {
    match r.random_range(0..3) {
        0 => cpu_positions(r, batch, seq, true),
        1 => cpu_positions(r, batch, seq, false),
        _ => random_lists(r, batch, seq),
    }
}

/// Stale positions of the shape `for_rows` gives: every slot a valid
/// position, every length the full width, so that a slot or length the
/// kernel does not write differs from the reference.
fn stale_positions(rows: &RowLayout, drop_last: bool) -> KeepPositions {
    let width = KeepPositions::for_rows(rows, drop_last).width();
    let seq = rows.seq();
    KeepPositions::from_rows(
        seq,
        &vec![(seq - width..seq).collect::<Vec<_>>(); rows.batch()],
    )
    .expect("stale positions")
}

fn assert_same_positions(got: &KeepPositions, want: &KeepPositions, what: &str) {
    assert_eq!(
        (got.batch(), got.width(), got.src_seq()),
        (want.batch(), want.width(), want.src_seq()),
        "{what}: sizes"
    );
    let (gp, gl) = got.packed();
    let (wp, wl) = want.packed();
    let w = want.width();
    for b in 0..want.batch() {
        assert_eq!(gl[b], wl[b], "{what}: row {b}: length");
        if let Some(j) = (0..w).find(|&j| gp[b * w + j] != wp[b * w + j]) {
            panic!(
                "{what}: row {b}: slot {j}: GPU {}, CPU {} (length {})",
                gp[b * w + j],
                wp[b * w + j],
                wl[b]
            );
        }
    }
    assert!(got == want, "{what}: positions differ");
}

/// A random subset of each row's visual tokens, as a keep set given
/// directly (not shaped by select_keep's top-n rule).
fn random_subset(r: &mut StdRng, rows: &RowLayout) -> KeepSet {
    let kept: Vec<Vec<usize>> = (0..rows.batch())
        .map(|b| {
            let p = [0.0, 0.1, 0.5, 0.9, 1.0][r.random_range(0..5)];
            (0..rows.nv(b)).filter(|_| r.random_bool(p)).collect()
        })
        .collect();
    KeepSet::from_rows(rows, &kept).expect("keep set")
}

/// keep_positions on the GPU, from stale output, against the CPU: ragged and
/// left-padded rows, interleaved images, rows without visual tokens, with
/// and without dropping the glimpse token. The keep set comes from
/// select_keep on the GPU (checked against the CPU's) or, in half the
/// cases, is a random subset uploaded with `DeviceKeepSet::from_host`. The
/// device positions' `max_len` is the width until `fetch_max_len` reads the
/// exact one.
#[test]
fn keep_positions_matches_cpu() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(21);
    for n in 0..cases(200) {
        let drop_last = r.random_bool(0.5);
        let glimpse_text = drop_last || r.random_bool(0.5);
        let batch = r.random_range(1..=5);
        let seq = if n % 10 == 9 {
            r.random_range(1000..=3000)
        } else {
            r.random_range(1..=300)
        };
        let spec = random_rows(&mut r, batch, seq, RowOpts::with_all_visual(glimpse_text));
        let rows = RowLayout::new(seq, &spec).expect("rows");
        let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
        let (keep, dev_keep, what) = if n % 2 == 0 {
            let logits = random_logits(&mut r, &rows);
            let rule = random_rule(&mut r, 5);
            let mut keep = KeepSet::new(&rows);
            cpu_select_keep(
                View::new(&logits, logits_layout(&rows)).unwrap(),
                &rows,
                &rule,
                &mut keep,
            )
            .expect("select_keep (CPU)");
            let logits_dev = upload(&stream, &logits);
            let mut dev_keep = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
            let logits_view =
                DevView::new(logits_dev.as_view(), logits_layout(&rows)).expect("logits view");
            cuda_select_keep(&stream, &logits_view, &dev_rows, &rule, &mut dev_keep)
                .expect("select_keep (CUDA)");
            let what = format!("case {n}: seq {seq}, drop_last {drop_last}, {rule:?}");
            assert!(
                dev_keep.to_host(&stream).expect("readback") == keep,
                "{what}: select_keep differs"
            );
            (keep, dev_keep, what)
        } else {
            let keep = random_subset(&mut r, &rows);
            let dev_keep = DeviceKeepSet::from_host(&stream, &keep).expect("device keep set");
            (
                keep,
                dev_keep,
                format!("case {n}: seq {seq}, drop_last {drop_last}, kept subsets"),
            )
        };
        let mut want = KeepPositions::for_rows(&rows, drop_last);
        cpu::keep_positions(&rows, &keep, drop_last, &mut want).expect("keep_positions (CPU)");

        let mut got = DeviceKeepPositions::from_host(&stream, &stale_positions(&rows, drop_last))
            .expect("device positions");
        cuda::keep_positions(&stream, &dev_rows, &dev_keep, drop_last, &mut got)
            .expect("keep_positions (CUDA)");
        assert_eq!(
            got.max_len(),
            got.width(),
            "{what}: max_len before fetch_max_len"
        );
        assert_same_positions(&got.to_host(&stream).expect("readback"), &want, &what);
        assert_eq!(
            got.fetch_max_len(&stream).expect("fetch_max_len"),
            want.max_len(),
            "{what}: fetch_max_len"
        );
        assert_eq!(
            got.max_len(),
            want.max_len(),
            "{what}: max_len after fetch_max_len"
        );
    }
}

#[test]
fn keep_positions_refuses_keep_set_of_another_layout() {
    let Some(stream) = gpu() else { return };
    let spec = random_rows(&mut rng(22), 3, 40, RowOpts::with_all_visual(true));
    // the same rows, but another layout (another identity)
    let rows = RowLayout::new(40, &spec).expect("rows");
    let twin = RowLayout::new(40, &spec).expect("rows");
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let dev_twin = DeviceRowLayout::new(&stream, &twin).expect("device rows");
    let logits = vec![1.0f32; (3 * twin.nv_max()).max(1)];
    let logits_dev = upload(&stream, &logits);
    let view = DevView::new(logits_dev.as_view(), logits_layout(&twin)).expect("logits view");
    let mut keep_of_twin = DeviceKeepSet::new(&stream, &dev_twin).expect("device keep set");
    cuda_select_keep(
        &stream,
        &view,
        &dev_twin,
        &KeepRule::default(),
        &mut keep_of_twin,
    )
    .expect("select_keep (CUDA)");
    let never_filled = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
    let stale = stale_positions(&rows, true);
    let cases = [
        (&keep_of_twin, "a keep set of another layout"),
        (&never_filled, "a keep set select_keep never filled"),
    ];
    for (keep, what) in cases {
        let mut out = DeviceKeepPositions::from_host(&stream, &stale).expect("device positions");
        let res = cuda::keep_positions(&stream, &dev_rows, keep, true, &mut out);
        assert!(
            matches!(res, Err(Error::Value { arg: "keep", .. })),
            "{what}: {res:?}"
        );
        assert!(
            out.to_host(&stream).expect("readback") == stale,
            "{what}: the output was written"
        );
    }
}

#[test]
fn keep_positions_refuses_output_sized_otherwise() {
    let Some(stream) = gpu() else { return };
    let spec = random_rows(&mut rng(23), 2, 30, RowOpts::with_all_visual(true));
    let rows = RowLayout::new(30, &spec).expect("rows");
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let logits_dev = upload(&stream, &vec![1.0f32; (2 * rows.nv_max()).max(1)]);
    let view = DevView::new(logits_dev.as_view(), logits_layout(&rows)).expect("logits view");
    let mut keep = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
    cuda_select_keep(&stream, &view, &dev_rows, &KeepRule::default(), &mut keep)
        .expect("select_keep (CUDA)");
    // sized for drop_last = true, called with false
    let mut out =
        DeviceKeepPositions::for_rows(&stream, &dev_rows, true).expect("device positions");
    let res = cuda::keep_positions(&stream, &dev_rows, &keep, false, &mut out);
    assert!(matches!(res, Err(Error::Shape { .. })), "{res:?}");
}

#[test]
fn keep_positions_refuses_to_drop_a_visual_token() {
    let Some(stream) = gpu() else { return };
    // row 1 ends at 5 and its last visual token is position 4
    let spec = [
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
    let rows = RowLayout::new(5, &spec).expect("rows");
    let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
    let logits_dev = upload(&stream, &[1.0f32, -1.0, 1.0, 1.0]);
    let view = DevView::new(logits_dev.as_view(), Layout::contiguous([2, 2])).expect("logits view");
    let mut keep = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
    cuda_select_keep(&stream, &view, &dev_rows, &KeepRule::default(), &mut keep)
        .expect("select_keep (CUDA)");
    let stale = stale_positions(&rows, true);
    let mut out = DeviceKeepPositions::from_host(&stream, &stale).expect("device positions");
    let res = cuda::keep_positions(&stream, &dev_rows, &keep, true, &mut out);
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
    assert!(
        out.to_host(&stream).expect("readback") == stale,
        "the output was written"
    );
    // without drop_last the visual token at the end is kept like any other
    let mut out =
        DeviceKeepPositions::for_rows(&stream, &dev_rows, false).expect("device positions");
    cuda::keep_positions(&stream, &dev_rows, &keep, false, &mut out)
        .expect("keep_positions (CUDA)");
    assert_eq!(out.to_host(&stream).expect("readback").row(1), &[1, 3, 4]);
}

// ---------------------------------------------------------------------------
// Planes: the storage of several layers, alike on both sides
// ---------------------------------------------------------------------------

/// `count` planes of one layout, plane `i` at `offset + i * pitch` of one
/// host storage. On the device they are either separate buffers (each the
/// `offset + pitch` elements of its plane) or one stacked buffer.
#[derive(Debug, Clone)]
struct Planes<T, const N: usize> {
    data: Vec<T>,
    layout: Layout<N>,
    offset: usize,
    pitch: usize,
    count: usize,
}

impl<T: Poison + DeviceRepr, const N: usize> Planes<T, N> {
    /// Storage of `fill`, then the logical elements of each plane from `f`.
    fn new(
        layout: Layout<N>,
        count: usize,
        offset: usize,
        pad: usize,
        fill: T,
        mut f: impl FnMut() -> T,
    ) -> Self {
        let pitch = layout.span() + pad;
        let mut planes = Planes {
            data: vec![fill; (offset + count * pitch).max(1)],
            layout,
            offset,
            pitch,
            count,
        };
        for i in 0..count {
            let base = offset + i * pitch;
            for idx in indices(layout.shape()) {
                planes.data[base + layout.offset(idx)] = f();
            }
        }
        planes
    }

    fn base(&self, i: usize) -> usize {
        self.offset + i * self.pitch
    }

    fn views(&self) -> Vec<View<'_, T, N>> {
        (0..self.count)
            .map(|i| View::new(&self.data[self.base(i)..], self.layout).unwrap())
            .collect()
    }

    /// Mutable CPU views: plane `i` is the storage from its base to the next.
    fn views_mut(&mut self) -> Vec<ViewMut<'_, T, N>> {
        let (layout, offset, pitch) = (self.layout, self.offset, self.pitch);
        let mut rest = &mut self.data[offset..];
        let mut out = Vec::with_capacity(self.count);
        for _ in 0..self.count {
            let (plane, tail) = rest.split_at_mut(pitch.min(rest.len()));
            out.push(ViewMut::new(plane, layout).unwrap());
            rest = tail;
        }
        out
    }

    /// The storage range of separate buffer `i`: from `base(i) - offset` to
    /// `base(i) + pitch`, so that each plane keeps the same offset inside its
    /// own buffer.
    fn separate_range(&self, i: usize) -> std::ops::Range<usize> {
        self.base(i) - self.offset..(self.base(i) + self.pitch).min(self.data.len())
    }

    /// The planes as separate device buffers (an empty one, for planes of
    /// capacity 0, holds one poison element: no allocation is empty).
    fn upload_separate(&self, stream: &Arc<CudaStream>) -> Vec<DevBuf<T>> {
        (0..self.count)
            .map(|i| match &self.data[self.separate_range(i)] {
                [] => upload(stream, &[T::POISON]),
                part => upload(stream, part),
            })
            .collect()
    }

    /// Reassembles the host storage from the contents of separate buffers:
    /// each buffer gives back its plane's part (the leading offset of buffer
    /// `i > 0` overlaps the previous plane and is left out).
    fn reassemble(&self, buffers: impl IntoIterator<Item = Vec<T>>) -> Vec<T> {
        let mut data = self.data.clone();
        for (i, host) in buffers.into_iter().enumerate() {
            let range = self.separate_range(i);
            assert!(host.len() >= range.len(), "buffer {i}");
            let from = if i == 0 { 0 } else { self.offset };
            data[range.start + from..range.end].copy_from_slice(&host[from..range.len()]);
        }
        data
    }
}

/// Runs `f` with device views of `planes` in separate buffers (`stacked` =
/// false) or in one buffer, then returns the device storage as host storage.
fn with_dst_views<T: Poison + Bits + std::fmt::Debug + DeviceRepr, const N: usize>(
    stream: &Arc<CudaStream>,
    planes: &Planes<T, N>,
    stacked: bool,
    f: impl FnOnce(&mut [DevViewMut<'_, T, N>]),
) -> Vec<T> {
    if stacked {
        let mut buf = upload(stream, &planes.data);
        let mut lens = vec![planes.offset];
        lens.extend(
            (0..planes.count).map(|i| planes.pitch.min(planes.data.len() - planes.base(i))),
        );
        with_split_mut(&mut buf, &lens, |views| {
            let mut views: Vec<DevViewMut<'_, T, N>> = views
                .into_iter()
                .skip(1)
                .map(|v| DevViewMut::new(v, planes.layout).expect("device view"))
                .collect();
            f(&mut views);
        });
        download(stream, &buf)
    } else {
        let mut bufs = planes.upload_separate(stream);
        {
            let mut views: Vec<DevViewMut<'_, T, N>> = bufs
                .iter_mut()
                .map(|b| {
                    DevViewMut::new(b.slice_mut(planes.offset..), planes.layout)
                        .expect("device view")
                })
                .collect();
            f(&mut views);
        }
        planes.reassemble(bufs.iter().map(|b| download(stream, b)))
    }
}

/// Source device buffers (kept alive by the caller) and their views.
enum SrcBufs<T> {
    Stacked(DevBuf<T>),
    Separate(Vec<DevBuf<T>>),
}

impl<T: Poison + DeviceRepr> SrcBufs<T> {
    fn new<const N: usize>(stream: &Arc<CudaStream>, planes: &Planes<T, N>, stacked: bool) -> Self {
        if stacked {
            SrcBufs::Stacked(upload(stream, &planes.data))
        } else {
            SrcBufs::Separate(planes.upload_separate(stream))
        }
    }

    fn views<const N: usize>(&self, planes: &Planes<T, N>) -> Vec<DevView<'_, T, N>> {
        match self {
            SrcBufs::Stacked(buf) => (0..planes.count)
                .map(|i| DevView::new(buf.slice(planes.base(i)..), planes.layout).unwrap())
                .collect(),
            SrcBufs::Separate(bufs) => bufs
                .iter()
                .map(|b| DevView::new(b.slice(planes.offset..), planes.layout).unwrap())
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------
// compact_kv
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct KvCase {
    batch: usize,
    seq: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    /// Destination capacity past the longest compacted row.
    extra: usize,
    padding: Padding,
    src_order: KvOrder,
    dst_order: KvOrder,
    /// Element offsets of the first plane (1: every access narrower than 16 bytes).
    src_offset: usize,
    dst_offset: usize,
    /// Elements between consecutive planes' storage.
    pad: usize,
    stacked_src: bool,
    stacked_dst: bool,
}

/// Compacts every layer of K and V on both backends (the CPU with `kp`, the
/// GPU with `dev_kp`, the same positions) into destinations of capacity
/// `kp.max_len() + c.extra` and compares the whole destination storage bit
/// for bit.
fn check_compact<T: GpuElem>(
    stream: &Arc<CudaStream>,
    r: &mut StdRng,
    c: &KvCase,
    kp: &KeepPositions,
    dev_kp: &DeviceKeepPositions,
) {
    let what = format!("{} {c:?}", std::any::type_name::<T>());
    let src_layout = c.src_order.layout(r, [c.batch, c.seq, c.heads, c.head_dim]);
    let dst_layout = c
        .dst_order
        .layout(r, [c.batch, kp.max_len() + c.extra, c.heads, c.head_dim]);
    let src = Planes::new(
        src_layout,
        2 * c.layers,
        c.src_offset,
        c.pad,
        T::POISON,
        || random_elem(r, -4.0, 4.0),
    );
    let dst = Planes::new(
        dst_layout,
        2 * c.layers,
        c.dst_offset,
        c.pad,
        T::POISON,
        || T::POISON,
    );

    let mut want = dst.clone();
    {
        let views = src.views();
        let mut outs = want.views_mut();
        let (k_out, v_out) = outs.split_at_mut(c.layers);
        cpu::compact_kv(
            &views[..c.layers],
            &views[c.layers..],
            kp,
            c.padding,
            k_out,
            v_out,
        )
        .expect("compact_kv (CPU)");
    }

    let src_bufs = SrcBufs::new(stream, &src, c.stacked_src);
    let src_views = src_bufs.views(&src);
    let got = with_dst_views(stream, &dst, c.stacked_dst, |outs| {
        let (k_out, v_out) = outs.split_at_mut(c.layers);
        cuda::compact_kv(
            stream,
            &src_views[..c.layers],
            &src_views[c.layers..],
            dev_kp,
            c.padding,
            k_out,
            v_out,
        )
        .expect("compact_kv (CUDA)");
    });
    assert_bits_eq(&got, &want.data, &what);
}

fn random_kv_case(r: &mut StdRng, many_layers: bool) -> (KvCase, KeepPositions) {
    let (batch, seq, heads, dims): (usize, usize, usize, &[usize]) = if many_layers {
        (
            r.random_range(1..=2),
            r.random_range(1..=30),
            r.random_range(1..=2),
            &[1, 3, 4, 8, 16],
        )
    } else {
        (
            r.random_range(1..=3),
            r.random_range(1..=60),
            r.random_range(1..=3),
            &[1, 2, 3, 4, 5, 7, 8, 16, 64, 128],
        )
    };
    let kp = random_positions(r, batch, seq);
    let c = KvCase {
        batch,
        seq,
        layers: if many_layers {
            r.random_range(60..=70)
        } else {
            r.random_range(1..=6)
        },
        heads,
        head_dim: dims[r.random_range(0..dims.len())],
        extra: r.random_range(0..=3),
        padding: if r.random_bool(0.5) {
            Padding::Right
        } else {
            Padding::Left
        },
        src_order: KvOrder::pick_aligned(r),
        dst_order: KvOrder::pick_aligned(r),
        src_offset: [0, 0, 1][r.random_range(0..3)],
        dst_offset: [0, 0, 1][r.random_range(0..3)],
        pad: [0, 0, 1, 8][r.random_range(0..4)],
        stacked_src: r.random_bool(0.5),
        stacked_dst: r.random_bool(0.5),
    };
    (c, kp)
}

/// 200 random cases of `T` (or `FOVEAL_GPU_CASES`): 1 to 6 layers, and 60
/// to 70 layers (several launches) in one case of ten; both paddings, every
/// pair of KV memory orders, destination capacity from the longest row to 3
/// past it (0 included), head dims from 1 to 128, aligned and odd offsets,
/// separate and stacked layers.
fn compact_random<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let mut r = rng(seed);
    for n in 0..cases(200) {
        let (c, kp) = random_kv_case(&mut r, n % 10 == 9);
        let dev_kp = DeviceKeepPositions::from_host(stream, &kp).expect("device positions");
        check_compact::<T>(stream, &mut r, &c, &kp, &dev_kp);
    }
}

#[test]
fn compact_kv_matches_cpu_f32() {
    let Some(stream) = gpu() else { return };
    compact_random::<f32>(&stream, 31);
}

#[test]
fn compact_kv_matches_cpu_f16() {
    let Some(stream) = gpu() else { return };
    compact_random::<f16>(&stream, 32);
}

#[test]
fn compact_kv_matches_cpu_bf16() {
    let Some(stream) = gpu() else { return };
    compact_random::<bf16>(&stream, 33);
}

/// Exactly 64 and 65 layers (128 planes fill one launch; one more needs a
/// second) and 70, both paddings, the realistic head dim 128.
#[test]
fn compact_kv_across_launches() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(34);
    for layers in [63, 64, 65, 70] {
        for padding in [Padding::Right, Padding::Left] {
            let kp = cpu_positions(&mut r, 2, 24, true);
            let c = KvCase {
                batch: 2,
                seq: 24,
                layers,
                heads: 2,
                head_dim: 128,
                extra: 2,
                padding,
                src_order: KvOrder::Bhsd,
                dst_order: KvOrder::Bhsd,
                src_offset: 0,
                dst_offset: 0,
                pad: 0,
                stacked_src: layers % 2 == 0,
                stacked_dst: layers % 2 == 1,
            };
            let dev_kp = DeviceKeepPositions::from_host(&stream, &kp).expect("device positions");
            check_compact::<bf16>(&stream, &mut r, &c, &kp, &dev_kp);
        }
    }
}

/// The whole pipeline on the GPU (select_keep, keep_positions, compact_kv):
/// before `fetch_max_len` a destination only as long as the longest row is
/// refused when rows shrank (the bound is the width); after it, it is
/// accepted and the result matches the CPU's; one slot less is refused.
#[test]
fn compact_kv_into_the_fetched_max_len() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(35);
    let mut shrank = 0;
    for n in 0..cases(40) {
        let (batch, seq) = (r.random_range(1..=4), r.random_range(2..=80));
        let rows = RowLayout::new(
            seq,
            &random_rows(&mut r, batch, seq, RowOpts::with_all_visual(true)),
        )
        .expect("rows");
        let logits = random_logits(&mut r, &rows);
        let rule = random_rule(&mut r, 5);
        let mut keep = KeepSet::new(&rows);
        cpu_select_keep(
            View::new(&logits, logits_layout(&rows)).unwrap(),
            &rows,
            &rule,
            &mut keep,
        )
        .expect("select_keep (CPU)");
        let mut kp = KeepPositions::for_rows(&rows, true);
        cpu::keep_positions(&rows, &keep, true, &mut kp).expect("keep_positions (CPU)");

        let dev_rows = DeviceRowLayout::new(&stream, &rows).expect("device rows");
        let logits_dev = upload(&stream, &logits);
        let logits_view =
            DevView::new(logits_dev.as_view(), logits_layout(&rows)).expect("logits view");
        let mut dev_keep = DeviceKeepSet::new(&stream, &dev_rows).expect("device keep set");
        cuda_select_keep(&stream, &logits_view, &dev_rows, &rule, &mut dev_keep)
            .expect("select_keep (CUDA)");
        let mut dev_kp =
            DeviceKeepPositions::for_rows(&stream, &dev_rows, true).expect("device positions");
        cuda::keep_positions(&stream, &dev_rows, &dev_keep, true, &mut dev_kp)
            .expect("keep_positions (CUDA)");

        // one layer [B, S, 1, 4] f32 of distinct values, K and V alike
        let data: Vec<f32> = (0..batch * seq * 4).map(|i| i as f32 + 1.0).collect();
        let src = upload(&stream, &data);
        let try_capacity = |dev_kp: &DeviceKeepPositions, capacity: usize| {
            let mut dst = poisoned::<f32>(&stream, 2 * batch * capacity * 4);
            let plane = batch * capacity * 4;
            let res = with_split_mut(&mut dst, &[plane, plane], |views| {
                let mut views: Vec<DevViewMut<'_, f32, 4>> = views
                    .into_iter()
                    .map(|v| DevViewMut::new(v, Layout::bshd(batch, capacity, 1, 4)).unwrap())
                    .collect();
                let (k, v) = views.split_at_mut(1);
                let src = [DevView::new(src.as_view(), Layout::bshd(batch, seq, 1, 4)).unwrap()];
                cuda::compact_kv(&stream, &src, &src, dev_kp, Padding::Left, k, v)
            });
            (res, download(&stream, &dst))
        };
        let longest = kp.max_len();
        if longest < dev_kp.width() {
            shrank += 1;
            let (res, out) = try_capacity(&dev_kp, longest);
            assert!(
                matches!(res, Err(Error::Shape { arg: "dst", .. })),
                "case {n}: before fetch_max_len: {res:?}"
            );
            assert_untouched(&out, "refused compaction");
        }
        assert_eq!(
            dev_kp.fetch_max_len(&stream).expect("fetch_max_len"),
            longest,
            "case {n}"
        );
        let (res, got) = try_capacity(&dev_kp, longest);
        res.expect("compact_kv (CUDA) into the longest row");
        let mut want = vec![f32::POISON; (2 * batch * longest * 4).max(1)];
        {
            let src = [View::new(&data, Layout::bshd(batch, seq, 1, 4)).unwrap()];
            let plane = batch * longest * 4;
            let (k, v) = want.split_at_mut(plane);
            let mut k = [ViewMut::new(k, Layout::bshd(batch, longest, 1, 4)).unwrap()];
            let mut v = [ViewMut::new(v, Layout::bshd(batch, longest, 1, 4)).unwrap()];
            cpu::compact_kv(&src, &src, &kp, Padding::Left, &mut k, &mut v)
                .expect("compact_kv (CPU)");
        }
        assert_bits_eq(&got, &want, &format!("case {n}"));
        if longest > 0 {
            let (res, out) = try_capacity(&dev_kp, longest - 1);
            assert!(
                matches!(res, Err(Error::Shape { arg: "dst", .. })),
                "case {n}: one slot short: {res:?}"
            );
            assert_untouched(&out, "refused compaction");
        }
    }
    assert!(
        shrank > 0 || cases(40) < 40,
        "no case where pruning shortened the rows"
    );
}

#[test]
fn compact_kv_refuses_short_destination_and_layer_mismatch() {
    let Some(stream) = gpu() else { return };
    let kp = KeepPositions::from_rows(8, &[vec![0, 2, 5], vec![1, 7]]).expect("positions");
    let dev_kp = DeviceKeepPositions::from_host(&stream, &kp).expect("device positions");
    let src = upload(&stream, &vec![1.0f32; 2 * 8 * 4]);
    let src_view = || DevView::new(src.as_view(), Layout::bshd(2, 8, 1, 4)).unwrap();
    // capacity 2 for rows of up to 3 entries
    let mut dst = poisoned::<f32>(&stream, 4 * 2 * 2 * 4);
    let res = with_split_mut(&mut dst, &[16, 16, 16, 16], |views| {
        let mut views: Vec<DevViewMut<'_, f32, 4>> = views
            .into_iter()
            .map(|v| DevViewMut::new(v, Layout::bshd(2, 2, 1, 4)).unwrap())
            .collect();
        let (k, v) = views.split_at_mut(2);
        let srcs = [src_view(), src_view()];
        cuda::compact_kv(&stream, &srcs, &srcs, &dev_kp, Padding::Right, k, v)
    });
    assert!(
        matches!(res, Err(Error::Shape { arg: "dst", .. })),
        "short destination: {res:?}"
    );
    assert_untouched(&download(&stream, &dst), "short destination");

    let mut dst = poisoned::<f32>(&stream, 3 * 2 * 3 * 4);
    let res = with_split_mut(&mut dst, &[24, 24, 24], |views| {
        let mut views: Vec<DevViewMut<'_, f32, 4>> = views
            .into_iter()
            .map(|v| DevViewMut::new(v, Layout::bshd(2, 3, 1, 4)).unwrap())
            .collect();
        let (k, v) = views.split_at_mut(2);
        cuda::compact_kv(
            &stream,
            &[src_view(), src_view()],
            &[src_view()],
            &dev_kp,
            Padding::Right,
            k,
            v,
        )
    });
    assert!(
        matches!(res, Err(Error::Shape { arg: "v_src", .. })),
        "2 K layers, 1 V layer: {res:?}"
    );
    assert_untouched(&download(&stream, &dst), "layer mismatch");

    // 3 K and 1 V destinations for 2 layers: the total matches, the lists do not
    let mut dst = poisoned::<f32>(&stream, 4 * 2 * 3 * 4);
    let res = with_split_mut(&mut dst, &[24, 24, 24, 24], |views| {
        let mut views: Vec<DevViewMut<'_, f32, 4>> = views
            .into_iter()
            .map(|v| DevViewMut::new(v, Layout::bshd(2, 3, 1, 4)).unwrap())
            .collect();
        let (k, v) = views.split_at_mut(3);
        cuda::compact_kv(
            &stream,
            &[src_view(), src_view()],
            &[src_view(), src_view()],
            &dev_kp,
            Padding::Right,
            k,
            v,
        )
    });
    assert!(
        matches!(res, Err(Error::Shape { arg: "k_dst", .. })),
        "3 + 1 destinations for 2 layers: {res:?}"
    );
    assert_untouched(&download(&stream, &dst), "destination counts");
}

// ---------------------------------------------------------------------------
// gather_rows: hidden states and position ids
// ---------------------------------------------------------------------------

/// `[B, S, W]` in row-major order with a gap after each row, or S-major.
fn rows_layout(r: &mut StdRng, b: usize, s: usize, w: usize) -> Layout<3> {
    let gap = [0, 0, 1, 3][r.random_range(0..4)];
    let (b1, s1) = (b.max(1), s.max(1));
    let strides = if r.random_bool(0.7) {
        [s1 * (w + gap), w + gap, 1]
    } else {
        [w + gap, b1 * (w + gap), 1]
    };
    Layout::strided([b, s, w], strides).expect("rows layout")
}

/// Hidden states of `T`, one to three planes, row widths that make the
/// vector width 16, 8, 4, 2 bytes (W = 3 f32: 4 bytes; W = 5 bf16: 2 bytes);
/// `n_cases` random cases.
fn hidden_random<T: GpuElem>(
    stream: &Arc<CudaStream>,
    seed: u64,
    widths: &[usize],
    n_cases: usize,
) {
    let mut r = rng(seed);
    for n in 0..n_cases {
        let (batch, seq) = (r.random_range(1..=3), r.random_range(1..=80));
        let kp = random_positions(&mut r, batch, seq);
        let w = widths[r.random_range(0..widths.len())];
        let count = r.random_range(1..=3);
        let padding = if r.random_bool(0.5) {
            Padding::Right
        } else {
            Padding::Left
        };
        let src_layout = rows_layout(&mut r, batch, seq, w);
        let dst_seq = kp.max_len() + r.random_range(0..=3);
        let dst_layout = rows_layout(&mut r, batch, dst_seq, w);
        let (src_offset, dst_offset) = (r.random_range(0..=1), r.random_range(0..=1));
        let stacked = r.random_bool(0.5);
        let src = Planes::new(
            src_layout,
            count,
            src_offset,
            r.random_range(0..=2),
            T::POISON,
            || random_elem(&mut r, -8.0, 8.0),
        );
        let dst = Planes::new(
            dst_layout,
            count,
            dst_offset,
            r.random_range(0..=2),
            T::POISON,
            || T::POISON,
        );
        let what = format!(
            "{} case {n}: W {w}, {count} planes, {padding:?}, src {src_layout:?} +{src_offset}, dst {dst_layout:?} +{dst_offset}",
            std::any::type_name::<T>()
        );

        let mut want = dst.clone();
        cpu::gather_rows(&src.views(), &kp, padding, &mut want.views_mut())
            .expect("gather_rows (CPU)");
        let dev_kp = DeviceKeepPositions::from_host(stream, &kp).expect("device positions");
        let src_bufs = SrcBufs::new(stream, &src, stacked);
        let src_views = src_bufs.views(&src);
        let got = with_dst_views(stream, &dst, !stacked, |outs| {
            cuda::gather_rows(stream, &src_views, &dev_kp, padding, outs)
                .expect("gather_rows (CUDA)");
        });
        assert_bits_eq(&got, &want.data, &what);
    }
}

#[test]
fn gather_rows_hidden_states_f32() {
    let Some(stream) = gpu() else { return };
    hidden_random::<f32>(&stream, 41, &[1, 2, 3, 4, 5, 7, 8, 33, 64], cases(100));
}

#[test]
fn gather_rows_hidden_states_bf16() {
    let Some(stream) = gpu() else { return };
    hidden_random::<bf16>(&stream, 42, &[1, 2, 3, 4, 5, 8, 16, 24, 64], cases(100));
}

#[test]
fn gather_rows_hidden_states_f16() {
    let Some(stream) = gpu() else { return };
    hidden_random::<f16>(&stream, 43, &[1, 5, 8, 96], cases(100));
}

/// The gather's block shapes (docs/ops/compact_kv.md): rows of 33 to 600
/// 16-byte vectors (bf16 W = 8 x vectors: one turn of up to 256 lanes, two
/// and three turns; 448 is Qwen2.5-VL-7B's hidden size, 3,584), so that a
/// block's x spans several warps and a row's columns take more than one
/// turn; slot tiles of 4 and 16 slots that the rows fill partly; the 2-byte
/// path of the same rows at an odd offset.
#[test]
fn gather_rows_wide_rows_bf16() {
    let Some(stream) = gpu() else { return };
    hidden_random::<bf16>(
        &stream,
        45,
        &[264, 512, 1600, 2048, 2056, 3584, 4800],
        cases(30),
    );
}

/// M-RoPE position ids: one `[3, B, S]` i32 tensor, each section a
/// `[B, S, 1]` plane of it, gathered into one `[3, B, S_dst]` tensor.
#[test]
fn gather_rows_position_ids() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(44);
    for n in 0..cases(100) {
        let (batch, seq) = (r.random_range(1..=4), r.random_range(1..=200));
        let kp = random_positions(&mut r, batch, seq);
        let dst_seq = kp.max_len() + r.random_range(0..=3);
        let padding = if r.random_bool(0.5) {
            Padding::Right
        } else {
            Padding::Left
        };
        let src_layout = Layout::contiguous([batch, seq, 1]);
        let dst_layout = Layout::strided([batch, dst_seq, 1], [dst_seq.max(1), 1, 1]).unwrap();
        // distinct ids: section, row and position encoded
        let mut next = 0;
        let src = Planes::new(src_layout, 3, 0, 0, i32::POISON, || {
            next += 1;
            next
        });
        let dst = Planes::new(dst_layout, 3, 0, 0, i32::POISON, || i32::POISON);

        let mut want = dst.clone();
        cpu::gather_rows(&src.views(), &kp, padding, &mut want.views_mut())
            .expect("gather_rows (CPU)");
        let dev_kp = DeviceKeepPositions::from_host(&stream, &kp).expect("device positions");
        let src_bufs = SrcBufs::new(&stream, &src, true);
        let src_views = src_bufs.views(&src);
        let got = with_dst_views(&stream, &dst, true, |outs| {
            cuda::gather_rows(&stream, &src_views, &dev_kp, padding, outs)
                .expect("gather_rows (CUDA)");
        });
        assert_bits_eq(
            &got,
            &want.data,
            &format!("case {n}: B {batch}, S {seq} -> {dst_seq}, {padding:?}"),
        );
    }
}
