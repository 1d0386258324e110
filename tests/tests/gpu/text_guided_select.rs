//! text_guided_select: the CUDA path against the CPU reference (feature
//! `cuda`; every test skips where there is no GPU).
//!
//! S is computed in another order on each side (tensor-core tiles or scalar
//! dot products, split-K log-sum-exp, expf), so the GPU's S must be within
//! the f32 rounding of the logits of the CPU's (`s_tolerance`), and the
//! GPU's kept set must be exactly the rule applied to the GPU's own S (the
//! rule is exact on given scores: fixed-point sums). Outputs are poisoned
//! first; a second run (and one on another stream) must be bit-identical.
//! bf16/f16 run on the tensor-core kernels (16-token text tiles, 64-key
//! blocks, 128-row log-sum-exp tiles), f32 on the scalar ones.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use foveal::cuda::{DevViewMut, Workspace};
use foveal::text_guided_select::cuda::DeviceLengths;
use foveal::text_guided_select::{cpu, cuda, select_from_scores, Lengths};
use foveal::{DType, Error, Layout, ViewMut};
use foveal_tests::cross_attention::aligned_strides;
use foveal_tests::gpu::{cases, download, gpu, poisoned, GpuElem};
use foveal_tests::{random_strides, random_tensor, rng, to_f64, KvOrder, Tensor};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;

struct Case<T> {
    q: Tensor<T, 4>,
    k: Tensor<T, 4>,
    lengths: Lengths,
    gamma: f32,
}

/// The sizes of a case and its lengths per row.
struct Shape {
    batch: usize,
    text: usize,
    visual: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
}

/// Query strides the path takes: any for f32, 16-byte ones for the
/// tensor-core path (bf16, f16).
fn q_strides<T: GpuElem>(r: &mut StdRng, shape: [usize; 4]) -> [usize; 4] {
    if T::DTYPE == DType::F32 {
        random_strides(r, shape)
    } else {
        aligned_strides::<T, 4>(r, shape)
    }
}

/// Inputs uniform in [-1, 1) for the given shape and lengths.
fn make_case<T: GpuElem>(
    r: &mut StdRng,
    s: &Shape,
    t: &[usize],
    n: &[usize],
    gamma: f32,
) -> Case<T> {
    let qshape = [s.batch, s.text, s.kv_heads * s.group, s.head_dim];
    let kshape = [s.batch, s.visual, s.kv_heads, s.head_dim];
    let qs = q_strides::<T>(r, qshape);
    let q = random_tensor(r, qshape, qs, -1.0, 1.0);
    let ks = KvOrder::pick_aligned(r).strides(r, kshape);
    let k = random_tensor(r, kshape, ks, -1.0, 1.0);
    Case {
        q,
        k,
        lengths: Lengths::new(t, n).unwrap(),
        gamma,
    }
}

fn random_case<T: GpuElem>(r: &mut StdRng, large: bool) -> Case<T> {
    let s = Shape {
        batch: r.random_range(1..4),
        text: r.random_range(1..if large { 64 } else { 12 }),
        visual: r.random_range(1..if large { 3000 } else { 300 }),
        kv_heads: r.random_range(1..4),
        group: r.random_range(1..=9),
        head_dim: [16, 64, 80, 96, 128, 256][r.random_range(0..6)],
    };
    let t: Vec<usize> = (0..s.batch)
        .map(|_| {
            if r.random_bool(0.1) {
                0
            } else {
                r.random_range(1..=s.text)
            }
        })
        .collect();
    let n: Vec<usize> = (0..s.batch)
        .map(|_| {
            if r.random_bool(0.1) {
                0
            } else {
                r.random_range(1..=s.visual)
            }
        })
        .collect();
    let gamma = [0.85, 1.0, 0.5, r.random_range(0.01f32..1.0)][r.random_range(0..4)];
    make_case(r, &s, &t, &n, gamma)
}

/// keep `[B, N]`, count `[B]`, scores `[B, N]` read back.
type Outputs = (Vec<i32>, Vec<i32>, Vec<f32>);

/// Runs the GPU path on poisoned outputs.
fn run_gpu<T: GpuElem>(
    stream: &Arc<CudaStream>,
    c: &Case<T>,
    ws: &mut Workspace,
) -> Result<Outputs, Error> {
    let (b, n) = (c.q.shape[0], c.k.shape[1]);
    let (dq, dk) = (c.q.upload(stream), c.k.upload(stream));
    let lengths = DeviceLengths::new(stream, &c.lengths)?;
    let mut keep = poisoned::<i32>(stream, b * n);
    let mut count = poisoned::<i32>(stream, b);
    let mut scores = poisoned::<f32>(stream, b * n);
    {
        let mut kv = DevViewMut::new(keep.as_view_mut(), Layout::contiguous([b, n])).unwrap();
        let mut cv = DevViewMut::new(count.as_view_mut(), Layout::contiguous([b])).unwrap();
        let mut sv = DevViewMut::new(scores.as_view_mut(), Layout::contiguous([b, n])).unwrap();
        cuda::text_guided_select(
            stream,
            &c.q.dev_view(&dq),
            &c.k.dev_view(&dk),
            &lengths,
            c.gamma,
            &mut kv,
            &mut cv,
            Some(&mut sv),
            ws,
        )?;
    }
    Ok((
        download(stream, &keep),
        download(stream, &count),
        download(stream, &scores),
    ))
}

/// The relative tolerance on S between the GPU and the CPU: 1e-5 beside
/// twice the bound on a logit's f32 error on both sides (the tensor cores'
/// accumulation and the CPU's sequential sum: `D 2^-22 scale max|q| |k|`,
/// with Cauchy-Schwarz for the sum of |q_d k_d|): S's terms are exp of a
/// logit minus a log-sum-exp, each off by at most that.
fn s_tolerance<T: GpuElem>(c: &Case<T>) -> f64 {
    let norm = |t: &Tensor<T, 4>| {
        let [a, b, h, d] = t.shape;
        let mut best = 0f64;
        for i in 0..a {
            for j in 0..b {
                for hh in 0..h {
                    let sq: f64 = (0..d).map(|e| to_f64(t.get([i, j, hh, e])).powi(2)).sum();
                    if sq.is_finite() {
                        best = best.max(sq.sqrt());
                    }
                }
            }
        }
        best
    };
    let d = c.q.shape[3] as f64;
    let logit = d * 2f64.powi(-22) * norm(&c.q) * norm(&c.k) / d.sqrt();
    1e-5 + 2.0 * logit
}

/// Runs both paths on `c` and checks the GPU against the CPU (module docs);
/// returns the GPU's outputs.
fn compare<T: GpuElem>(
    stream: &Arc<CudaStream>,
    ws: &mut Workspace,
    c: &Case<T>,
    what: &str,
) -> Outputs {
    let (b, n) = (c.q.shape[0], c.k.shape[1]);
    let (mut keep, mut count, mut scores) = (
        vec![i32::MIN; b * n],
        vec![i32::MIN; b],
        vec![f32::NAN; b * n],
    );
    cpu::text_guided_select(
        c.q.view(),
        c.k.view(),
        &c.lengths,
        c.gamma,
        &mut ViewMut::contiguous(&mut keep, [b, n]).unwrap(),
        &mut ViewMut::contiguous(&mut count, [b]).unwrap(),
        Some(&mut ViewMut::contiguous(&mut scores, [b, n]).unwrap()),
    )
    .expect("CPU");
    let (gk, gc, gs) = run_gpu(stream, c, ws).expect("CUDA");
    let what = format!(
        "{what}: q {:?}, k {:?}, {:?}, gamma {}",
        c.q.shape, c.k.shape, c.lengths, c.gamma
    );
    let tol = s_tolerance(c);
    for row in 0..b {
        let nl = c.lengths.n_len()[row];
        let s = &gs[row * n..(row + 1) * n];
        for i in 0..n {
            let w = scores[row * n + i];
            assert!(
                (s[i] as f64 - w as f64).abs() <= tol * w.abs() as f64 + 1e-7,
                "{what}: row {row}: S[{i}] GPU {}, CPU {w} (tolerance {tol:e})",
                s[i]
            );
        }
        let want: Vec<i32> = select_from_scores(&s[..nl], c.gamma)
            .iter()
            .map(|&i| i as i32)
            .collect();
        assert_eq!(gc[row] as usize, want.len(), "{what}: row {row}: count");
        assert_eq!(
            &gk[row * n..row * n + want.len()],
            &want[..],
            "{what}: row {row}: kept"
        );
        assert!(
            gk[row * n + want.len()..(row + 1) * n]
                .iter()
                .all(|&v| v == -1),
            "{what}: row {row}: padding"
        );
        // the CPU's count within the ambiguity of rounding: equal counts when S agree bitwise
        if s[..nl] == scores[row * n..row * n + nl] {
            assert_eq!(gc[row], count[row], "{what}: row {row}: same S, same count");
        }
    }
    (gk, gc, gs)
}

fn check<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    for case in 0..cases(24) {
        let c: Case<T> = random_case(&mut r, case % 6 == 5);
        let (gk, gc, gs) = compare(&stream, &mut ws, &c, &format!("case {case}"));
        // determinism: again on this stream and on another
        let other = gpu().expect("second stream");
        assert_eq!(
            run_gpu(&stream, &c, &mut ws).expect("CUDA"),
            (gk.clone(), gc.clone(), gs.clone()),
            "case {case}: rerun"
        );
        let again = run_gpu(&other, &c, &mut Workspace::new()).expect("CUDA");
        assert!(
            again.0 == gk
                && again.1 == gc
                && again
                    .2
                    .iter()
                    .zip(&gs)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
            "case {case}: other stream"
        );
    }
}

/// The tensor-core kernels' edges, each against the CPU: text tiles of 16
/// (T 1, 15, 16, 17, 33, 100 and ragged t_len, 0 included), 64-key blocks
/// and key chunks (N 1, 63, 64, 65, 200, 1,500 and ragged n_len, 0
/// included), 128-row tiles of (text token, head) rows and odd groups (1, 3,
/// 5, 7, 9, 16: heads staged 4 at a time, 2 at head dim 256, taken in pairs),
/// head dims 64, 80, 96, 128, 256 (and 24, 48: zero-padded buckets), one to
/// three KV heads; f32 on the same cases (its scalar path).
fn tiles<T: GpuElem>(seed: u64) {
    let Some(stream) = gpu() else { return };
    let mut ws = Workspace::new();
    let mut r = rng(seed);
    #[rustfmt::skip]
    let shapes: [(usize, usize, usize, usize, usize, usize); 12] = [
        // batch, text, visual, kv_heads, group, head_dim
        (1, 1, 1, 1, 1, 64),
        (2, 15, 63, 2, 3, 80),
        (1, 16, 64, 1, 5, 96),
        (2, 17, 65, 3, 7, 128),
        (1, 33, 200, 2, 9, 256),
        (3, 100, 129, 1, 16, 64),
        (2, 16, 1500, 2, 4, 128),
        (1, 64, 700, 4, 7, 128),
        (2, 7, 300, 1, 2, 256),
        (1, 40, 90, 2, 1, 24),
        (2, 24, 333, 1, 6, 48),
        (1, 9, 1000, 8, 4, 64),
    ];
    for (n_case, &(batch, text, visual, kv_heads, group, head_dim)) in shapes.iter().enumerate() {
        let s = Shape {
            batch,
            text,
            visual,
            kv_heads,
            group,
            head_dim,
        };
        // full rows, then ragged ones (a row with no text or no keys now and then)
        for ragged in [false, true] {
            let (t, n): (Vec<usize>, Vec<usize>) = (0..batch)
                .map(|row| {
                    if !ragged {
                        (text, visual)
                    } else if row == 1 {
                        (0, visual)
                    } else if row == 2 {
                        (text, 0)
                    } else {
                        (r.random_range(1..=text), r.random_range(1..=visual))
                    }
                })
                .unzip();
            let c: Case<T> = make_case(&mut r, &s, &t, &n, 0.85);
            compare(
                &stream,
                &mut ws,
                &c,
                &format!("tile case {n_case}, ragged {ragged}"),
            );
        }
    }
}

#[test]
fn tile_edges_f32() {
    tiles::<f32>(61);
}

#[test]
fn tile_edges_f16() {
    tiles::<f16>(62);
}

#[test]
fn tile_edges_bf16() {
    tiles::<bf16>(63);
}

/// Non-finite logits, as the CPU reference treats them: a key holding -inf
/// (where every query's first component is positive) has logit -inf in
/// every head, weighs 0 and gets S = 0, the other keys unchanged; a key
/// holding NaN makes every logit of its row NaN in each head's log-sum-exp,
/// so every log-probability of the row is NaN, ignored by the max over the
/// heads: S = 0 everywhere and the row keeps every token.
#[test]
fn non_finite_keys() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, ws: &mut Workspace) {
        let mut r = rng(64);
        let s = Shape {
            batch: 2,
            text: 20,
            visual: 150,
            kv_heads: 2,
            group: 3,
            head_dim: 64,
        };
        let mut c: Case<T> = make_case(&mut r, &s, &[20, 20], &[150, 150], 0.85);
        let [_, t, hq, _] = c.q.shape;
        for j in 0..t {
            for h in 0..hq {
                let o = c.q.offset([0, j, h, 0]);
                c.q.data[o] = T::from_f32(0.5);
            }
        }
        for kvh in 0..2 {
            let o = c.k.offset([0, 37, kvh, 0]);
            c.k.data[o] = T::from_f32(f32::NEG_INFINITY);
            let o = c.k.offset([1, 101, kvh, 5]);
            c.k.data[o] = T::from_f32(f32::NAN);
        }
        let (keep, count, scores) =
            compare(stream, ws, &c, &format!("{:?} non-finite keys", T::DTYPE));
        assert_eq!(scores[37], 0.0, "a key at -inf weighs 0");
        assert!(scores[..150].iter().filter(|&&v| v > 0.0).count() > 100);
        assert!(scores[150..].iter().all(|&v| v == 0.0), "a NaN key: S = 0");
        assert_eq!(count[1], 150, "a NaN key: every token kept");
        assert!(keep[150..].iter().copied().eq(0..150));
    }
    let mut ws = Workspace::new();
    run::<f32>(&stream, &mut ws);
    run::<f16>(&stream, &mut ws);
    run::<bf16>(&stream, &mut ws);
}

/// The tensor-core path copies query rows in 16-byte pieces: bf16 / f16
/// queries whose strides are not multiples of 16 bytes are refused before
/// launching (the outputs untouched); f32 takes them.
#[test]
fn queries_must_be_aligned_on_tensor_cores() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(65);
    fn case<T: GpuElem>(r: &mut StdRng) -> Case<T> {
        // q [1, 3, 2, 16] with a text stride of 33 elements
        let q = random_tensor(r, [1, 3, 2, 16], [3 * 33, 33, 16, 1], -1.0, 1.0);
        let k = random_tensor(r, [1, 20, 1, 16], [320, 16, 16, 1], -1.0, 1.0);
        Case {
            q,
            k,
            lengths: Lengths::full(1, 3, 20),
            gamma: 0.85,
        }
    }
    for res in [
        run_gpu(&stream, &case::<bf16>(&mut r), &mut Workspace::new()),
        run_gpu(&stream, &case::<f16>(&mut r), &mut Workspace::new()),
    ] {
        assert!(
            matches!(&res, Err(Error::Unsupported { msg, .. }) if msg.contains("q_text")),
            "{res:?}"
        );
    }
    compare(
        &stream,
        &mut Workspace::new(),
        &case::<f32>(&mut r),
        "f32, text stride 33",
    );
}

/// Issue 11, fault 4: logits of 1e3 to 1e6, exact in every element type and
/// in f32 (D 16: scale 1/4; q rows `[1000, c, 0, ...]`, key rows `[b, e_i, 0,
/// ...]`, small integers `c`, `e_i`), 300 visual tokens (three key chunks,
/// merged): S against its f64 value computed here from those integers. log A
/// is formed as `(l - m) - ln sum`; `l - (m + ln sum)` rounded `m + ln sum`
/// at the logits' size (1e-2 relative in S at 1e6) and failed here.
#[test]
fn large_logits_keep_their_precision() {
    let Some(stream) = gpu() else { return };
    fn run<T: GpuElem>(stream: &Arc<CudaStream>, b: f32) {
        let (t, n, hkv, g, d) = (3, 300, 2, 2, 16);
        let hq = hkv * g;
        let mut r = rng(b as u64);
        let c_of = |j: usize, h: usize| (1 + (h + j) % 3) as f64;
        let e: Vec<f64> = (0..n).map(|_| r.random_range(-6..=6) as f64).collect();
        let q = Tensor::from_fn(
            [1, t, hq, d],
            [t * hq * d, hq * d, d, 1],
            T::from_f32(0.0),
            |[_, j, h, x]| {
                T::from_f32(match x {
                    0 => 1000.0,
                    1 => c_of(j, h) as f32,
                    _ => 0.0,
                })
            },
        );
        let k = Tensor::from_fn(
            [1, n, hkv, d],
            [n * hkv * d, hkv * d, d, 1],
            T::from_f32(0.0),
            |[_, i, _, x]| {
                T::from_f32(match x {
                    0 => b,
                    1 => e[i] as f32,
                    _ => 0.0,
                })
            },
        );
        // S in f64: logits (1000 b + c e_i) / 4, softmax over i, max over h, mean over j
        let mut want = vec![0f64; n];
        for j in 0..t {
            let mut best = vec![0f64; n];
            for h in 0..hq {
                let l: Vec<f64> = e
                    .iter()
                    .map(|&ei| (1000.0 * b as f64 + c_of(j, h) * ei) / 4.0)
                    .collect();
                let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = l.iter().map(|x| (x - m).exp()).sum();
                for i in 0..n {
                    best[i] = best[i].max((l[i] - m).exp() / z);
                }
            }
            for i in 0..n {
                want[i] += best[i] / t as f64;
            }
        }
        let c = Case {
            q,
            k,
            lengths: Lengths::full(1, t, n),
            gamma: 0.85,
        };
        let (_, _, got) = run_gpu(stream, &c, &mut Workspace::new()).expect("CUDA");
        for i in 0..n {
            let (g, w) = (got[i] as f64, want[i]);
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.ln().abs()) * w + 1e-30,
                "logits {}: S[{i}] GPU {g}, want {w}",
                250.0 * b
            );
        }
    }
    for b in [4.0, 40.0, 400.0, 4000.0] {
        run::<f32>(&stream, b);
        run::<f16>(&stream, b);
        run::<bf16>(&stream, b);
    }
}

#[test]
fn matches_cpu_f32() {
    check::<f32>(31);
}

#[test]
fn matches_cpu_f16() {
    check::<f16>(32);
}

#[test]
fn matches_cpu_bf16() {
    check::<bf16>(33);
}

#[test]
fn refuses_unsupported_head_dims_and_bad_gamma() {
    let Some(stream) = gpu() else { return };
    let mut r = rng(34);
    let q: Tensor<f32, 4> = random_tensor(&mut r, [1, 2, 2, 6], [24, 12, 6, 1], -1.0, 1.0);
    let k: Tensor<f32, 4> = random_tensor(&mut r, [1, 5, 1, 6], [30, 6, 6, 1], -1.0, 1.0);
    let c = Case {
        q,
        k,
        lengths: Lengths::full(1, 2, 5),
        gamma: 0.85,
    };
    assert!(
        matches!(
            run_gpu(&stream, &c, &mut Workspace::new()),
            Err(Error::Unsupported { .. })
        ),
        "head dim 6"
    );
    let q: Tensor<f32, 4> = random_tensor(&mut r, [1, 2, 2, 8], [32, 16, 8, 1], -1.0, 1.0);
    let k: Tensor<f32, 4> = random_tensor(&mut r, [1, 5, 1, 8], [40, 8, 8, 1], -1.0, 1.0);
    let c = Case {
        q,
        k,
        lengths: Lengths::full(1, 2, 5),
        gamma: 0.0,
    };
    assert!(matches!(
        run_gpu(&stream, &c, &mut Workspace::new()),
        Err(Error::Value { arg: "gamma", .. })
    ));
}
