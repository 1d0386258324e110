//! Helpers the model tests share.
#![allow(dead_code)] // each test binary uses its own subset

pub mod focus;
pub mod gaze;
pub mod glance2gaze;
pub mod glimpse;
pub mod visor;

use std::ops::Range;

use candle_core::{Device, Result, Tensor};
use foveal_candle::prompt::byte_tokens;
use foveal_candle::{Decoder, Generation, KvCache, MASK_MIN};

/// The largest absolute difference of two tensors of one shape (f32), on
/// whatever devices they live.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_device(&Device::Cpu)? - b.to_device(&Device::Cpu)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// The first CUDA GPU, or `None` after saying `SKIP: no CUDA GPU (reason)`
/// (the GPU tests then pass without running, so CPU-only CI stays green).
/// Panics with the reason instead where `FOVEAL_REQUIRE_GPU=1` (the GPU
/// suite): there a missing driver or cuBLAS must fail, not skip.
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<Device> {
    let why = match std::panic::catch_unwind(|| Device::new_cuda(0)) {
        Ok(Ok(d)) => return Some(d),
        Ok(Err(e)) => format!("Device::new_cuda(0) failed: {e}"),
        Err(p) => format!(
            "Device::new_cuda(0) panicked: {}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("no message")
        ),
    };
    if std::env::var("FOVEAL_REQUIRE_GPU").is_ok_and(|v| v.trim() == "1") {
        panic!("FOVEAL_REQUIRE_GPU=1 but no CUDA GPU: {why}");
    }
    eprintln!("SKIP: no CUDA GPU ({why})");
    None
}

/// `mask` `[B, 1, Q, KV]` with, in row `b`, the key columns `cols[b]` hidden
/// for every query ([`MASK_MIN`]).
pub fn mask_columns(mask: Tensor, cols: &[Vec<usize>]) -> Result<Tensor> {
    let (b, _, q, kv) = mask.dims4()?;
    let mut m = mask.flatten_all()?.to_vec1::<f32>()?;
    for (row, cols) in cols.iter().enumerate() {
        for i in 0..q {
            for &c in cols {
                m[(row * q + i) * kv + c] = MASK_MIN;
            }
        }
    }
    Tensor::from_vec(m, (b, 1, q, kv), mask.device())
}

/// The logits of each row's `last[b]` position of `hidden` `[B, S, Dm]`:
/// `[B, vocab]`.
pub fn logits_at(dec: &Decoder, hidden: &Tensor, last: &[usize]) -> Result<Tensor> {
    let rows = last
        .iter()
        .enumerate()
        .map(|(b, &p)| hidden.get(b)?.narrow(0, p, 1))
        .collect::<Result<Vec<_>>>()?;
    dec.logits(&Tensor::stack(&rows, 0)?)?.squeeze(1)
}

/// A reference for decode steps `1..tokens[0].len()` of a generation: the
/// generated tokens fed back at positions `next[b]`, `next[b] + 1`, ...
/// (the caller's own account of where decoding continues) through the
/// decoder's layers in ranges split at the layers `splits`, range `i` with
/// the additive mask `mask(i, kv_len)`, over `cache`. Returns each step's
/// logits.
pub fn replay_steps(
    dec: &Decoder,
    tokens: &[Vec<u32>],
    next: &[u32],
    cache: &mut KvCache,
    splits: &[usize],
    mask: impl Fn(usize, usize) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let bounds: Vec<usize> = [0]
        .into_iter()
        .chain(splits.iter().copied())
        .chain([dec.num_layers()])
        .collect();
    let ranges: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
    let dev = dec.device();
    let (b, steps) = (tokens.len(), tokens[0].len());
    let mut out = Vec::new();
    for step in 1..steps {
        let ids: Vec<u32> = tokens.iter().map(|t| t[step - 1]).collect();
        let pos: Vec<u32> = next.iter().map(|&p| p + step as u32 - 1).collect();
        let mut h = dec.embed(&Tensor::from_vec(ids, (b, 1), dev)?)?;
        let p = Tensor::from_vec(pos, (b, 1), dev)?;
        for (i, r) in ranges.iter().enumerate() {
            let m = mask(i, cache.seq_len(r.start) + 1)?;
            h = dec.forward_layers(&h, &p, Some(&m), r.clone(), cache)?;
        }
        out.push(dec.last_logits(&h)?);
    }
    Ok(out)
}

/// Asserts every step's logits agree within `tol`.
pub fn assert_steps_close(got: &[Tensor], want: &[Tensor], tol: f32, what: &str) -> Result<()> {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (step, (a, b)) in got.iter().zip(want).enumerate() {
        let d = max_abs_diff(a, b)?;
        assert!(d < tol, "{what}, step {step}: logits differ by {d}");
    }
    Ok(())
}

/// The smallest margin, relative to the size of what is compared, by which
/// every discrete decision (a greedy token, a route, a kept token, a
/// sampled scale) of a whole-model GPU test's inputs must win on the CPU.
/// Both devices compute in f32 (candle's cuBLAS GEMMs in full f32, not
/// TF32), so a CPU and a GPU run of these tiny models differ by rounding,
/// about 1e-6 relative: a decision that wins by 1e-4 is the same on both,
/// and the GPU tests may compare decisions exactly. The CPU tests that
/// share those inputs assert the margins (CI runs them; the GPU tests only
/// run where a GPU is).
pub const DECISION_MARGIN: f64 = 1e-4;

/// How far a GPU run's logits may be from the CPU's (absolute; the logits of
/// the tiny models are of order 1-10, and the devices' f32 rounding should
/// move them by about 1e-5: the first GPU run measures it).
pub const GPU_LOGIT_TOL: f32 = 2.5e-4;

/// Asserts two recorded weight vectors (attention probabilities, fusion
/// weights: values in [0, 1]) of a CPU and a GPU run agree: the same
/// length, every weight finite and within [`GPU_LOGIT_TOL`] of the other.
pub fn assert_close(cpu: &[f32], gpu: &[f32], what: &str) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
    for (i, (a, b)) in cpu.iter().zip(gpu).enumerate() {
        assert!(
            a.is_finite() && b.is_finite() && (a - b).abs() < GPU_LOGIT_TOL,
            "{what}: weight {i}: CPU {a}, GPU {b}"
        );
    }
}

/// Asserts that every greedy token of `logits` (each step `[B, vocab]`)
/// beats the runner-up by more than twice [`GPU_LOGIT_TOL`]: logits that
/// move by less than that on another device cannot change the token.
pub fn assert_token_margins(logits: &[Tensor], what: &str) -> Result<()> {
    for (step, l) in logits.iter().enumerate() {
        for (b, row) in l
            .to_dtype(candle_core::DType::F64)?
            .to_vec2::<f64>()?
            .iter()
            .enumerate()
        {
            let mut top = [f64::NEG_INFINITY; 2];
            for &x in row {
                if x > top[0] {
                    top = [x, top[0]];
                } else if x > top[1] {
                    top[1] = x;
                }
            }
            let margin = top[0] - top[1];
            assert!(
                margin > 2.0 * f64::from(GPU_LOGIT_TOL),
                "{what}: step {step}, row {b}: the greedy token wins by only {margin:e}: \
                 a GPU test comparing tokens exactly would be unsound"
            );
        }
    }
    Ok(())
}

/// The image questions the method tests share: a system prompt and two
/// questions of different lengths (a ragged, left-padded batch).
pub fn system_and_questions() -> (Vec<u32>, Vec<Vec<u32>>) {
    (
        byte_tokens("You see an image."),
        vec![
            byte_tokens("Where is the red square?"),
            byte_tokens("Count the shapes."),
        ],
    )
}

/// Asserts that row `b` of `gen` was decoded from `next[b]` on, one position
/// per token: where the dense layout ends, by the test's own account.
pub fn assert_decodes_from(gen: &Generation, next: &[u32], what: &str) {
    for (b, &n) in next.iter().enumerate() {
        let want: Vec<u32> = (n..).take(gen.tokens[b].len()).collect();
        assert_eq!(
            gen.positions[b], want,
            "{what}: row {b} decodes after its dense layout"
        );
    }
}

/// Asserts that a row generated alone (`alone`, one row) and as row 0 of a
/// batch agree: the same tokens and positions, logits within 1e-4.
pub fn assert_row_alone_as_in_batch(alone: &Generation, batch: &Generation) -> Result<()> {
    assert_eq!(alone.tokens[0], batch.tokens[0]);
    assert_eq!(alone.positions[0], batch.positions[0]);
    for (step, (a, b)) in alone.logits.iter().zip(&batch.logits).enumerate() {
        let d = max_abs_diff(a, &b.narrow(0, 0, 1)?)?;
        assert!(
            d < 1e-4,
            "step {step}: the row alone and in a batch differ by {d}"
        );
    }
    Ok(())
}
