//! glimpse_scores: the CUDA path against the CPU reference on identical
//! inputs (feature `cuda`; every test skips where there is no GPU).
//!
//! Both sides read the same bf16 / f16 / f32 values and accumulate in f32, so
//! the only difference allowed is the order of the f32 accumulation (dot
//! products split across lanes and fused multiply-adds for f32, tensor-core
//! products with f32 accumulation for bf16 and f16, on the GPU; the
//! log-sum-exp merged across key splits). The tolerance is therefore the same
//! for every storage type, relative to the size of the summed terms (bounded
//! by `|scale| * |q| * |k|`, Cauchy-Schwarz) rather than to the result, which
//! may cancel to near zero. Outputs are poisoned first: an element the kernel
//! does not write, or a write outside the output view, fails the comparison.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::{DevView, DevViewMut, DeviceRowLayout, Workspace};
use foveal::glimpse_scores::{cpu, cuda};
use foveal::{Error, Layout, RowLayout, RowSpec, ScoreMode};
use foveal_tests::gpu::{
    assert_bits_eq, assert_untouched, cases, download, gpu, in_sweep, poisoned, upload, GpuElem,
};
use foveal_tests::{random_elem, random_rows, rng, Bits, KvOrder, Poison, RowOpts, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

use foveal_tests::SCORE_MODES;

/// GQA group sizes: every size one block serves (1..=8), and two that need
/// several head chunks per KV head.
const GROUPS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16];

/// Elements of `T` in one 16-byte vector: head dims and q/k strides must be
/// multiples of it.
fn vec_elems<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// Memory order of q `[B, Hq, D]` or out `[B, Nv_max, Hq]`: the logical last
/// dim is always innermost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order3 {
    Contiguous,
    /// Row-major with a gap after each innermost row and after each batch.
    Padded {
        inner_gap: usize,
        outer_gap: usize,
    },
    /// The middle dim outermost: `[dim1, B, dim2]` storage.
    MiddleMajor {
        inner_gap: usize,
    },
}

impl Order3 {
    /// A random order whose gaps are multiples of `align` elements.
    fn pick(r: &mut StdRng, align: usize) -> Order3 {
        match r.random_range(0..3) {
            0 => Order3::Contiguous,
            1 => Order3::Padded {
                inner_gap: align * r.random_range(0..3),
                outer_gap: align * r.random_range(0..3),
            },
            _ => Order3::MiddleMajor {
                inner_gap: align * r.random_range(0..2),
            },
        }
    }

    /// The strides of `shape` (a zero-sized dim counts as one for them).
    fn strides(self, shape: [usize; 3]) -> [usize; 3] {
        let [a, m, n] = shape.map(|x| x.max(1));
        match self {
            Order3::Contiguous => [m * n, n, 1],
            Order3::Padded {
                inner_gap,
                outer_gap,
            } => [m * (n + inner_gap) + outer_gap, n + inner_gap, 1],
            Order3::MiddleMajor { inner_gap } => [n + inner_gap, a * (n + inner_gap), 1],
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Case {
    seed: u64,
    batch: usize,
    seq: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    scale: Option<f32>,
    mode: ScoreMode,
    /// Inputs uniform in `[-amp, amp)`: larger values spread the logits, so
    /// that the softmax has tiny and dominant entries.
    amp: f32,
    k_order: KvOrder,
    q_order: Order3,
    out_order: Order3,
    /// Start q and k one 16-byte vector into their buffers (aligned, but not
    /// at the allocation's base).
    offset: bool,
}

/// A random case of element type `T`; `long` rows hold 1,000 to 4,000 keys
/// (several key splits per row, merged by log-sum-exp).
fn random_case<T>(r: &mut StdRng, seed: u64, mode: ScoreMode, long: bool) -> Case {
    let vec = vec_elems::<T>();
    let group = GROUPS[r.random_range(0..GROUPS.len())];
    let kv_heads = if group >= 12 {
        r.random_range(1..=2)
    } else {
        r.random_range(1..=3)
    };
    let dims = [vec, 2 * vec, 3 * vec, 64, 80, 96, 128, 256];
    let mut head_dim = dims[r.random_range(0..dims.len())];
    let (batch, seq) = if long {
        // keep the CPU reference cheap: at most 1024 query-head elements
        while group * kv_heads * head_dim > 1024 && head_dim > vec {
            head_dim = if head_dim > 64 { 64 } else { vec };
        }
        (r.random_range(1..=2), r.random_range(1000..=4000))
    } else {
        (r.random_range(1..=4), r.random_range(1..=300))
    };
    Case {
        seed,
        batch,
        seq,
        kv_heads,
        group,
        head_dim,
        scale: match r.random_range(0..4) {
            0 | 1 => None,
            2 => Some(r.random_range(0.01f32..0.5)),
            _ => Some(-r.random_range(0.01f32..0.5)),
        },
        mode,
        amp: [0.5f32, 1.0, 3.0][r.random_range(0..3)],
        k_order: KvOrder::pick_aligned(r),
        q_order: Order3::pick(r, vec),
        out_order: Order3::pick(r, 1),
        offset: r.random_bool(0.25),
    }
}

/// The inputs of a case, built alike for both backends.
struct Inputs<T> {
    rows: Vec<RowSpec>,
    layout: RowLayout,
    q: Tensor<T, 3>,
    k: Tensor<T, 4>,
    /// The poisoned output both backends start from.
    out: Tensor<f32, 3>,
}

fn inputs<T: GpuElem>(c: &Case, rows: Vec<RowSpec>) -> Inputs<T> {
    let mut r = rng(c.seed ^ 0x5eed);
    let layout = RowLayout::new(c.seq, &rows).expect("rows");
    let hq = c.group * c.kv_heads;
    let offset = if c.offset { vec_elems::<T>() } else { 0 };
    let q_shape = [c.batch, hq, c.head_dim];
    let q = Tensor::from_fn(q_shape, c.q_order.strides(q_shape), T::POISON, |_| {
        random_elem(&mut r, -c.amp, c.amp)
    })
    .offset_by(offset, T::POISON);
    // Keys outside a row's valid range are poison: reading one makes the
    // row's log-sum-exp NaN.
    let k_shape = [c.batch, c.seq, c.kv_heads, c.head_dim];
    let k_strides = c.k_order.strides(&mut r, k_shape);
    let k = Tensor::from_fn(k_shape, k_strides, T::POISON, |[b, p, _, _]| {
        if p >= rows[b].start && p < rows[b].end {
            random_elem(&mut r, -c.amp, c.amp)
        } else {
            T::POISON
        }
    })
    .offset_by(offset, T::POISON);
    let out_shape = [c.batch, layout.nv_max(), hq];
    let out = Tensor::filled(out_shape, c.out_order.strides(out_shape), f32::POISON);
    Inputs {
        rows,
        layout,
        q,
        k,
        out,
    }
}

/// Runs the CUDA path on `inp` into a fresh poisoned copy of its output and
/// returns the output's storage.
fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    inp: &Inputs<T>,
    scale: Option<f32>,
    mode: ScoreMode,
) -> Vec<f32> {
    let rows = DeviceRowLayout::new(stream, &inp.layout).expect("device rows");
    let q_dev = inp.q.upload(stream);
    let k_dev = inp.k.upload(stream);
    let mut out_dev = inp.out.upload(stream);
    cuda::glimpse_scores(
        stream,
        &inp.q.dev_view(&q_dev),
        &inp.k.dev_view(&k_dev),
        &rows,
        scale,
        mode,
        &mut inp.out.dev_view_mut(&mut out_dev),
        ws,
    )
    .expect("glimpse_scores (CUDA)");
    download(stream, &out_dev)
}

/// The CPU reference's output storage.
fn run_cpu<T: GpuElem>(inp: &Inputs<T>, scale: Option<f32>, mode: ScoreMode) -> Vec<f32> {
    let mut want = inp.out.clone();
    cpu::glimpse_scores(
        inp.q.view(),
        inp.k.view(),
        &inp.layout,
        scale,
        mode,
        &mut want.view_mut(),
    )
    .expect("glimpse_scores (CPU)");
    want.data
}

/// Euclidean norm of a stored vector, in f64.
fn norm<T: GpuElem>(x: &[T]) -> f64 {
    x.iter()
        .map(|v| (v.to_f32() as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Compares the GPU output storage with the CPU one: visual entries within
/// the f32 accumulation tolerance, entries past a row's count exactly +0, the
/// storage outside the view still poison.
fn compare<T: GpuElem>(c: &Case, inp: &Inputs<T>, got: &[f32], want: &[f32]) {
    let [batch, hq, d] = inp.q.shape;
    let g = hq / c.kv_heads;
    let (q, k) = (inp.q.view(), inp.k.view());
    let scale = c.scale.unwrap_or(1.0 / (d as f32).sqrt()).abs() as f64;
    let mut logical = vec![false; got.len()];
    for b in 0..batch {
        let row = &inp.rows[b];
        let ln_n = (row.end as f64 - row.start as f64).ln();
        // |k_p| of every valid key of the row, per KV head.
        let k_norm: Vec<Vec<f64>> = (0..c.kv_heads)
            .map(|kvh| {
                (row.start..row.end)
                    .map(|p| norm(k.row([b, p, kvh, 0])))
                    .collect()
            })
            .collect();
        for h in 0..hq {
            let q_norm = norm(q.row([b, h, 0]));
            let kn = &k_norm[h / g];
            let big = scale * q_norm * kn.iter().copied().fold(0.0, f64::max);
            for i in 0..inp.layout.nv_max() {
                let o = inp.out.offset([b, i, h]);
                logical[o] = true;
                let (gv, wv) = (got[o], want[o]);
                let Some(&p) = row.visual.get(i) else {
                    assert!(
                        gv.to_bits() == 0 && wv.to_bits() == 0,
                        "{c:?}: out[{b}, {i}, {h}] is past the row's {} visual tokens: got {gv}, CPU {wv} (both must be +0)",
                        row.visual.len()
                    );
                    continue;
                };
                let small = scale * q_norm * kn[p - row.start];
                let log_bound = 1e-5 + 2e-5 * (small + 2.0 * big + ln_n);
                let bound = match c.mode {
                    ScoreMode::Logits => 1e-5 + 2e-5 * small,
                    ScoreMode::LogSoftmax => log_bound,
                    ScoreMode::Softmax => 1e-7 + wv.abs() as f64 * log_bound,
                };
                let diff = (gv as f64 - wv as f64).abs();
                assert!(
                    diff <= bound,
                    "{c:?}: out[{b}, {i}, {h}] (position {p}, row {}..{}): GPU {gv}, CPU {wv}, |diff| {diff:e} > bound {bound:e}",
                    row.start,
                    row.end
                );
            }
        }
    }
    for (o, &is_logical) in logical.iter().enumerate() {
        if !is_logical {
            let g = got[o];
            assert!(
                g.bits() == f32::POISON.bits(),
                "{c:?}: storage offset {o} outside the output view was written: {g}"
            );
        }
    }
}

fn check_case<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace, c: &Case) {
    let mut r = rng(c.seed);
    let inp = inputs::<T>(
        c,
        random_rows(&mut r, c.batch, c.seq, RowOpts::with_all_visual(true)),
    );
    let want = run_cpu(&inp, c.scale, c.mode);
    let got = run_gpu(stream, ws, &inp, c.scale, c.mode);
    compare(c, &inp, &got, &want);
}

/// 200 random cases of `T` (or `FOVEAL_GPU_CASES`): modes in turn, every
/// group size of [`GROUPS`], head dims from one vector to 256, the three KV
/// memory orders, strided q and out, ragged and left-padded rows, interleaved
/// image spans, rows without visual tokens, and one case in eight with long
/// rows. One workspace serves every case (it grows as needed).
fn random_cases<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let mut r = rng(seed);
    let mut ws = Workspace::new();
    for n in 0..cases(200) as u64 {
        let c = random_case::<T>(
            &mut r,
            seed.wrapping_mul(1000) + n,
            SCORE_MODES[n as usize % 3],
            n % 8 == 7,
        );
        check_case::<T>(stream, &mut ws, &c);
    }
}

#[test]
fn matches_cpu_f32() {
    let Some(stream) = gpu() else { return };
    random_cases::<f32>(&stream, 1);
}

#[test]
fn matches_cpu_f16() {
    let Some(stream) = gpu() else { return };
    random_cases::<f16>(&stream, 2);
}

#[test]
fn matches_cpu_bf16() {
    let Some(stream) = gpu() else { return };
    random_cases::<bf16>(&stream, 3);
}

/// Every head dim the SPEC names and every group size, in both plain KV
/// layouts, for each element type: a deterministic sweep beside the random
/// cases.
fn sweep<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let mut ws = Workspace::new();
    let mut configs = Vec::new();
    for head_dim in [64, 80, 96, 128, 256] {
        for group in GROUPS {
            for k_order in [KvOrder::Bshd, KvOrder::Bhsd] {
                configs.push((head_dim, group, k_order));
            }
        }
    }
    let total = configs.len();
    for (n, (head_dim, group, k_order)) in configs.into_iter().enumerate() {
        if !in_sweep(n, total) {
            continue;
        }
        let c = Case {
            seed: seed * 10_000 + n as u64,
            batch: 2,
            seq: 150,
            kv_heads: 1 + (n / 2) % 2,
            group,
            head_dim,
            scale: None,
            mode: SCORE_MODES[n % 3],
            amp: 1.0,
            k_order,
            q_order: Order3::Contiguous,
            out_order: Order3::Contiguous,
            offset: false,
        };
        check_case::<T>(stream, &mut ws, &c);
    }
}

#[test]
fn head_dims_and_groups_sweep() {
    let Some(stream) = gpu() else { return };
    sweep::<f32>(&stream, 1);
    sweep::<f16>(&stream, 2);
    sweep::<bf16>(&stream, 3);
}

/// Every head dim that is a multiple of the 16-byte vector, up to 256, in
/// every mode: for bf16 and f16 the tensor-core kernel's buckets (64, 128,
/// 256: exact, no zero-filled piece) and every partial one (a lane's 16-byte
/// pieces of dims 32 c + 8 t past the head dim are zeros on both the key and
/// the query side, and must add nothing even where a key is large); rows of
/// 1 to 200 keys, so that a warp's slice has fewer steps than the cp.async
/// pipeline has stages, as many, and more; groups of 1 to 8 and 12.
fn every_head_dim<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    let vec = vec_elems::<T>();
    for (n, head_dim) in (vec..=256).step_by(vec).enumerate() {
        let c = Case {
            seed: seed * 10_000 + n as u64,
            batch: r.random_range(1..=2),
            seq: r.random_range(1..=200),
            kv_heads: r.random_range(1..=2),
            group: [1, 2, 3, 5, 7, 8, 12][r.random_range(0..7)],
            head_dim,
            scale: None,
            mode: SCORE_MODES[n % 3],
            amp: [1.0f32, 3.0][r.random_range(0..2)],
            k_order: KvOrder::pick_aligned(&mut r),
            q_order: Order3::Contiguous,
            out_order: Order3::pick(&mut r, 1),
            offset: r.random_bool(0.25),
        };
        check_case::<T>(stream, &mut ws, &c);
    }
}

#[test]
fn every_head_dim_bf16() {
    let Some(stream) = gpu() else { return };
    every_head_dim::<bf16>(&stream, 4);
}

#[test]
fn every_head_dim_f16() {
    let Some(stream) = gpu() else { return };
    every_head_dim::<f16>(&stream, 5);
}

#[test]
fn every_head_dim_f32() {
    let Some(stream) = gpu() else { return };
    every_head_dim::<f32>(&stream, 6);
}

/// A long row beside short ones, one row only the glimpse token, and a row
/// of a single image filling it: many key splits for the long row, empty
/// splits for the others, in every mode.
#[test]
fn long_rows_merge_key_splits() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let seq = 6000;
    let rows = vec![
        RowSpec {
            start: 0,
            end: seq,
            visual: (200..5200).collect(),
        },
        RowSpec {
            start: seq - 1,
            end: seq,
            visual: vec![],
        },
        RowSpec {
            start: 10,
            end: 400,
            visual: (11..399).step_by(3).collect(),
        },
        RowSpec {
            start: seq - 3000,
            end: seq,
            visual: (seq - 3000..seq - 1).collect(),
        },
    ];
    for (n, (kv_heads, group, head_dim)) in [(1, 1, 128), (2, 4, 64), (1, 16, 64), (2, 7, 80)]
        .into_iter()
        .enumerate()
    {
        for (m, mode) in SCORE_MODES.into_iter().enumerate() {
            if !in_sweep(3 * n + m, 12) {
                continue;
            }
            let c = Case {
                seed: 77 + n as u64,
                batch: rows.len(),
                seq,
                kv_heads,
                group,
                head_dim,
                scale: None,
                mode,
                amp: 2.0,
                k_order: if n % 2 == 0 {
                    KvOrder::Bhsd
                } else {
                    KvOrder::Bshd
                },
                q_order: Order3::Contiguous,
                out_order: Order3::Contiguous,
                offset: false,
            };
            let inp = inputs::<bf16>(&c, rows.clone());
            let want = run_cpu(&inp, c.scale, c.mode);
            let got = run_gpu(&stream, &mut ws, &inp, c.scale, c.mode);
            compare(&c, &inp, &got, &want);
        }
    }
}

/// Batches where no row has a visual token (nothing to write: `out` is
/// `[B, 0, Hq]`), and where only some have.
#[test]
fn rows_without_visual_tokens() {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let empty = vec![
        RowSpec {
            start: 0,
            end: 5,
            visual: vec![],
        },
        RowSpec {
            start: 3,
            end: 9,
            visual: vec![],
        },
    ];
    let some = vec![
        RowSpec {
            start: 0,
            end: 5,
            visual: vec![],
        },
        RowSpec {
            start: 3,
            end: 9,
            visual: vec![4, 6, 7],
        },
    ];
    for (n, rows) in [empty, some].into_iter().enumerate() {
        for mode in SCORE_MODES {
            let c = Case {
                seed: 5 + n as u64,
                batch: 2,
                seq: 9,
                kv_heads: 2,
                group: 3,
                head_dim: 64,
                scale: Some(0.2),
                mode,
                amp: 1.0,
                k_order: KvOrder::Bshd,
                q_order: Order3::Contiguous,
                out_order: Order3::Padded {
                    inner_gap: 1,
                    outer_gap: 2,
                },
                offset: false,
            };
            let inp = inputs::<f32>(&c, rows.clone());
            let want = run_cpu(&inp, c.scale, c.mode);
            let got = run_gpu(&stream, &mut ws, &inp, c.scale, c.mode);
            compare(&c, &inp, &got, &want);
        }
    }
}

/// Issue 11, fault 3: keys whose score is -inf (a row [-inf, 0, ...]
/// against queries whose first element is positive, scale positive), about
/// one key in three and always the row's first, so that many key groups of
/// the split pass start on one. The CPU reference stays finite (a -inf
/// score weighs 0); the kernel's running log-sum-exp made the whole row NaN
/// (exp(-inf - -inf)) before the online-softmax helper. Every other case
/// also puts +inf and NaN keys in row 0: there the CPU is NaN, and the GPU
/// must be NaN exactly where the CPU is.
#[test]
fn infinite_scores_in_key_groups() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
        let mut r = rng(seed);
        let mut ws = Workspace::new();
        let mut finite = 0;
        for n in 0..cases(24) as u64 {
            let mut c = random_case::<T>(
                &mut r,
                seed * 100 + n,
                SCORE_MODES[n as usize % 3],
                n % 4 == 3,
            );
            c.scale = Some(r.random_range(0.05f32..0.5));
            let rows = random_rows(
                &mut rng(c.seed),
                c.batch,
                c.seq,
                RowOpts::with_all_visual(true),
            );
            let mut inp = inputs::<T>(&c, rows);
            poison_keys(&mut r, &c, &mut inp, n % 2 == 1);
            let want = run_cpu(&inp, c.scale, c.mode);
            let got = run_gpu(stream, &mut ws, &inp, c.scale, c.mode);
            finite += compare_non_finite(&c, &inp, &got, &want);
        }
        assert!(
            finite > 100,
            "too few finite entries ({finite}) to test anything"
        );
    }
    run::<f32>(&stream, 41);
    run::<f16>(&stream, 42);
    run::<bf16>(&stream, 43);
}

/// Gives every query head a positive first element and makes about one key
/// in three of each row, and always its first (the glimpse token excepted),
/// `[bad, 0, 0, ...]`: bad = -inf, or in row 0 with `mixed` also +inf or
/// NaN.
fn poison_keys<T: GpuElem>(r: &mut StdRng, c: &Case, inp: &mut Inputs<T>, mixed: bool) {
    let [batch, hq, d] = inp.q.shape;
    for b in 0..batch {
        for h in 0..hq {
            let o = inp.q.offset([b, h, 0]);
            inp.q.data[o] = T::from_f32(c.amp.max(0.5));
        }
        let row = &inp.rows[b];
        for p in row.start..row.end - 1 {
            if p != row.start && !r.random_bool(0.35) {
                continue;
            }
            let bad = if mixed && b == 0 {
                [f32::NEG_INFINITY, f32::INFINITY, f32::NAN][r.random_range(0..3)]
            } else {
                f32::NEG_INFINITY
            };
            for kvh in 0..c.kv_heads {
                for j in 0..d {
                    let o = inp.k.offset([b, p, kvh, j]);
                    inp.k.data[o] = T::from_f32(if j == 0 { bad } else { 0.0 });
                }
            }
        }
    }
}

/// [`compare`] for outputs that may hold infinities and NaN: where the CPU
/// is NaN the GPU must be NaN, where it is infinite the GPU must equal it,
/// elsewhere the GPU must be within the f32 accumulation bound (from the
/// size of the finite logits, at most `|scale| * D * amp^2`). Returns the
/// number of finite entries compared.
fn compare_non_finite<T: GpuElem>(c: &Case, inp: &Inputs<T>, got: &[f32], want: &[f32]) -> usize {
    let [batch, hq, d] = inp.q.shape;
    let scale = c.scale.unwrap_or(1.0 / (d as f32).sqrt()).abs() as f64;
    let amp = c.amp.max(0.5) as f64;
    let big = scale * d as f64 * amp * amp;
    let mut finite = 0;
    for b in 0..batch {
        let row = &inp.rows[b];
        let ln_n = (row.end as f64 - row.start as f64).ln();
        for h in 0..hq {
            for i in 0..inp.layout.nv_max() {
                let o = inp.out.offset([b, i, h]);
                let (gv, wv) = (got[o], want[o]);
                let what = format!("{c:?}: out[{b}, {i}, {h}]: GPU {gv}, CPU {wv}");
                if i >= row.visual.len() {
                    assert!(
                        gv.to_bits() == 0 && wv.to_bits() == 0,
                        "{what}: past the count, both +0"
                    );
                } else if wv.is_nan() {
                    assert!(gv.is_nan(), "{what}: the CPU is NaN");
                } else if wv.is_infinite() {
                    assert_eq!(gv, wv, "{what}");
                } else {
                    let log_bound = 1e-5 + 2e-5 * (3.0 * big + ln_n);
                    let bound = match c.mode {
                        ScoreMode::Logits => 1e-5 + 2e-5 * big,
                        ScoreMode::LogSoftmax => log_bound,
                        ScoreMode::Softmax => 1e-7 + wv.abs() as f64 * log_bound,
                    };
                    let diff = (gv as f64 - wv as f64).abs();
                    assert!(diff <= bound, "{what}: |diff| {diff:e} > bound {bound:e}");
                    finite += 1;
                }
            }
        }
    }
    finite
}

/// Issue 11, fault 4: logits of 1e3 to 1e6, exact in every element type and
/// in f32 (q rows `[1000, c_h, 0, ...]`, key rows `[b, e_p, 0, ...]`, small
/// integers, scale 1: `s = 1000 b + c_h e_p`), a long row (several key
/// splits, merged) beside a short one, against values computed here in f64.
/// The log-softmax is `(s - m) - ln sum`; `s - (m + ln sum)` rounded
/// `m + ln sum` at the logits' size and failed here. Logits exactly.
#[test]
fn large_logits_keep_their_precision() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace, b: f32, mode: ScoreMode) {
        let (seq, hkv, g, d) = (3000, 2, 3, 16);
        let hq = hkv * g;
        let rows = vec![
            RowSpec {
                start: 0,
                end: seq,
                visual: (10..2900).collect(),
            },
            RowSpec {
                start: 5,
                end: 200,
                visual: (6..190).step_by(3).collect(),
            },
        ];
        let layout = RowLayout::new(seq, &rows).expect("rows");
        let mut r = rng(b as u64);
        let e: Vec<f64> = (0..2 * seq * hkv)
            .map(|_| r.random_range(-6..=6) as f64)
            .collect();
        let e_at = |bi: usize, p: usize, kvh: usize| e[(bi * seq + p) * hkv + kvh];
        let c_of = |h: usize| (1 + h % 3) as f64;
        let q_shape = [2, hq, d];
        let q = Tensor::from_fn(q_shape, [hq * d, d, 1], T::POISON, |[_, h, j]| {
            T::from_f32(match j {
                0 => 1000.0,
                1 => c_of(h) as f32,
                _ => 0.0,
            })
        });
        let k_shape = [2, seq, hkv, d];
        let k = Tensor::from_fn(
            k_shape,
            [seq * hkv * d, hkv * d, d, 1],
            T::POISON,
            |[bi, p, kvh, j]| {
                if p < rows[bi].start || p >= rows[bi].end {
                    return T::POISON;
                }
                T::from_f32(match j {
                    0 => b,
                    1 => e_at(bi, p, kvh) as f32,
                    _ => 0.0,
                })
            },
        );
        let out_shape = [2, layout.nv_max(), hq];
        let out = Tensor::filled(out_shape, [layout.nv_max() * hq, hq, 1], f32::POISON);
        let inp = Inputs {
            rows,
            layout,
            q,
            k,
            out,
        };
        let got = run_gpu(stream, ws, &inp, Some(1.0), mode);
        for bi in 0..2 {
            let row = &inp.rows[bi];
            for h in 0..hq {
                let logit = |p: usize| 1000.0 * b as f64 + c_of(h) * e_at(bi, p, h / g);
                let m = (row.start..row.end)
                    .map(logit)
                    .fold(f64::NEG_INFINITY, f64::max);
                let ln_sum = (row.start..row.end)
                    .map(|p| (logit(p) - m).exp())
                    .sum::<f64>()
                    .ln();
                for (i, &p) in row.visual.iter().enumerate() {
                    let log_p = (logit(p) - m) - ln_sum;
                    let gv = got[inp.out.offset([bi, i, h])] as f64;
                    let (want, ok) = match mode {
                        ScoreMode::Logits => (logit(p), gv == logit(p)),
                        ScoreMode::LogSoftmax => {
                            (log_p, (gv - log_p).abs() <= 1e-5 * (1.0 + log_p.abs()))
                        }
                        ScoreMode::Softmax => {
                            let w = log_p.exp();
                            (w, (gv - w).abs() <= 1e-5 * (1.0 + log_p.abs()) * w)
                        }
                    };
                    assert!(
                        ok,
                        "{mode:?}, logits {}: out[{bi}, {i}, {h}] GPU {gv}, want {want}",
                        1000.0 * b
                    );
                }
            }
        }
    }
    let mut ws = Workspace::new();
    for b in [1.0, 10.0, 100.0, 1000.0] {
        for mode in SCORE_MODES {
            run::<f32>(&stream, &mut ws, b, mode);
            run::<f16>(&stream, &mut ws, b, mode);
            run::<bf16>(&stream, &mut ws, b, mode);
        }
    }
}

/// The same inputs give bit-identical outputs: twice with one workspace,
/// once more with a fresh workspace on another stream.
fn deterministic<T: GpuElem>(stream: &Arc<CudaStream>, seed: u64) {
    let other = gpu().expect("a second stream on the same device");
    let mut r = rng(seed);
    let mut ws = Workspace::new();
    for n in 0..cases(12) as u64 {
        let c = random_case::<T>(
            &mut r,
            seed * 100 + n,
            SCORE_MODES[n as usize % 3],
            n % 2 == 1,
        );
        let inp = inputs::<T>(
            &c,
            random_rows(
                &mut rng(c.seed),
                c.batch,
                c.seq,
                RowOpts::with_all_visual(true),
            ),
        );
        let first = run_gpu(stream, &mut ws, &inp, c.scale, c.mode);
        let second = run_gpu(stream, &mut ws, &inp, c.scale, c.mode);
        let third = run_gpu(&other, &mut Workspace::new(), &inp, c.scale, c.mode);
        assert_bits_eq(&second, &first, &format!("{c:?}: second run"));
        assert_bits_eq(
            &third,
            &first,
            &format!("{c:?}: run with a fresh workspace on another stream"),
        );
    }
}

#[test]
fn deterministic_runs() {
    let Some(stream) = gpu() else { return };
    deterministic::<f32>(&stream, 1);
    deterministic::<f16>(&stream, 2);
    deterministic::<bf16>(&stream, 3);
}

// ---------------------------------------------------------------------------
// Arguments the CUDA path refuses before launching
// ---------------------------------------------------------------------------

/// A small valid call of element type `T` with head dim `d`: q `[1, 2, d]`,
/// k `[1, 6, 1, d]`, rows with visual tokens at 1 and 3.
struct Small<T> {
    rows: RowLayout,
    q: Vec<T>,
    k: Vec<T>,
    d: usize,
}

impl<T: GpuElem> Small<T> {
    fn new(d: usize) -> Self {
        let rows = RowLayout::new(
            6,
            &[RowSpec {
                start: 0,
                end: 6,
                visual: vec![1, 3],
            }],
        )
        .expect("rows");
        let mut r = rng(9);
        // one spare element at the end of each buffer, for the shifted views
        let q = (0..2 * d + 1)
            .map(|_| random_elem(&mut r, -1.0, 1.0))
            .collect();
        let k = (0..6 * d + 1)
            .map(|_| random_elem(&mut r, -1.0, 1.0))
            .collect();
        Small { rows, q, k, d }
    }

    /// Runs the CUDA path with q and k starting `q_shift` / `k_shift`
    /// elements into their buffers and q's head stride `q_stride`;
    /// returns the result and the output storage (poisoned before).
    fn run(
        &self,
        stream: &Arc<CudaStream>,
        q_shift: usize,
        k_shift: usize,
        q_stride: usize,
    ) -> (Result<(), Error>, Vec<f32>) {
        let d = self.d;
        let rows = DeviceRowLayout::new(stream, &self.rows).expect("device rows");
        let q_dev = upload(stream, &self.q);
        let k_dev = upload(stream, &self.k);
        let q_layout = Layout::strided([1, 2, d], [2 * q_stride, q_stride, 1]).expect("q layout");
        let q = DevView::new(q_dev.slice(q_shift..), q_layout).expect("q view");
        let k = DevView::new(k_dev.slice(k_shift..), Layout::bshd(1, 6, 1, d)).expect("k view");
        let mut out_dev = poisoned::<f32>(stream, 2 * 2);
        let res = {
            let mut out = DevViewMut::new(out_dev.as_view_mut(), Layout::contiguous([1, 2, 2]))
                .expect("out view");
            cuda::glimpse_scores(
                stream,
                &q,
                &k,
                &rows,
                None,
                ScoreMode::LogSoftmax,
                &mut out,
                &mut Workspace::new(),
            )
        };
        (res, download(stream, &out_dev))
    }
}

fn assert_unsupported(res: Result<(), Error>, out: &[f32], what: &str) {
    match res {
        Err(Error::Unsupported { op, .. }) => assert_eq!(op, "glimpse_scores", "{what}"),
        other => panic!("{what}: expected Error::Unsupported, got {other:?}"),
    }
    assert_untouched(out, what);
}

#[test]
fn refuses_misaligned_q_and_k() {
    let Some(stream) = gpu() else { return };
    // the aligned call works
    let small = Small::<bf16>::new(64);
    let (res, out) = small.run(&stream, 0, 0, 64);
    res.expect("aligned bf16 call");
    assert!(out.iter().all(|x| x.is_finite()), "{out:?}");
    let (res, out) = small.run(&stream, 1, 0, 64);
    assert_unsupported(res, &out, "bf16 q one element into its buffer");
    let (res, out) = small.run(&stream, 0, 1, 64);
    assert_unsupported(res, &out, "bf16 k one element into its buffer");
    let small = Small::<f32>::new(16);
    let (res, out) = small.run(&stream, 1, 0, 16);
    assert_unsupported(res, &out, "f32 q one element into its buffer");
    let small = Small::<f16>::new(16);
    let (res, out) = small.run(&stream, 0, 1, 16);
    assert_unsupported(res, &out, "f16 k one element into its buffer");
}

#[test]
fn refuses_head_dims_off_the_vector_width() {
    let Some(stream) = gpu() else { return };
    let (res, out) = Small::<f32>::new(6).run(&stream, 0, 0, 6);
    assert_unsupported(res, &out, "f32 head dim 6 (vector of 4)");
    let (res, out) = Small::<bf16>::new(12).run(&stream, 0, 0, 12);
    assert_unsupported(res, &out, "bf16 head dim 12 (vector of 8)");
    let (res, out) = Small::<f16>::new(4).run(&stream, 0, 0, 4);
    assert_unsupported(res, &out, "f16 head dim 4 (vector of 8)");
    let (res, out) = Small::<bf16>::new(264).run(&stream, 0, 0, 264);
    assert_unsupported(res, &out, "bf16 head dim 264 (past 256)");
    // the smallest valid ones work
    Small::<f32>::new(4)
        .run(&stream, 0, 0, 4)
        .0
        .expect("f32 head dim 4");
    Small::<bf16>::new(8)
        .run(&stream, 0, 0, 8)
        .0
        .expect("bf16 head dim 8");
}

#[test]
fn refuses_q_strides_off_the_vector_width() {
    let Some(stream) = gpu() else { return };
    let mut small = Small::<bf16>::new(8);
    let mut r = rng(4);
    small.q = (0..2 * 12)
        .map(|_| random_elem(&mut r, -1.0, 1.0))
        .collect();
    let (res, out) = small.run(&stream, 0, 0, 11);
    assert_unsupported(res, &out, "bf16 q head stride 11");
    let (res, out) = small.run(&stream, 0, 0, 12);
    assert_unsupported(res, &out, "bf16 q head stride 12 (not a multiple of 8)");
    small.q = (0..2 * 16)
        .map(|_| random_elem(&mut r, -1.0, 1.0))
        .collect();
    small
        .run(&stream, 0, 0, 16)
        .0
        .expect("bf16 q head stride 16");
}

#[test]
fn refuses_output_of_wrong_shape() {
    let Some(stream) = gpu() else { return };
    let small = Small::<f32>::new(8);
    let rows = DeviceRowLayout::new(&stream, &small.rows).expect("device rows");
    let q_dev = upload(&stream, &small.q);
    let k_dev = upload(&stream, &small.k);
    let q = DevView::new(q_dev.as_view(), Layout::contiguous([1, 2, 8])).expect("q view");
    let k = DevView::new(k_dev.as_view(), Layout::bshd(1, 6, 1, 8)).expect("k view");
    let mut out_dev = poisoned::<f32>(&stream, 8);
    let res = {
        // [B, Hq, Nv] instead of [B, Nv, Hq]
        let mut out = DevViewMut::new(out_dev.slice_mut(..), Layout::contiguous([1, 2, 3]))
            .expect("out view");
        cuda::glimpse_scores(
            &stream,
            &q,
            &k,
            &rows,
            None,
            ScoreMode::Logits,
            &mut out,
            &mut Workspace::new(),
        )
    };
    assert!(
        matches!(res, Err(Error::Shape { arg: "out", .. })),
        "{res:?}"
    );
    assert_untouched(&download(&stream, &out_dev), "output of wrong shape");
}
