//! foveal's ops on candle tensors: strided (non-contiguous) views are read in
//! place and give what contiguous copies give; compaction equals candle's own
//! index_select of the kept positions.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use foveal::{KeepRule, Padding, RowLayout, RowSpec, ScoreMode};
use foveal_candle::ops;

fn rows() -> RowLayout {
    RowLayout::new(
        12,
        &[
            RowSpec {
                start: 0,
                end: 12,
                visual: vec![2, 3, 4, 5, 6, 7],
            },
            RowSpec {
                start: 3,
                end: 12,
                visual: vec![5, 6, 8],
            },
        ],
    )
    .unwrap()
}

#[test]
fn glimpse_scores_reads_a_transposed_cache_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (2, 4, 16), &dev)?;
    // Keys stored [B, S, Hkv, D]; the op takes [B, Hkv, S, D]: a transposed view.
    let k_bshd = Tensor::randn(0f32, 1.0, (2, 12, 2, 16), &dev)?;
    let k_view = k_bshd.transpose(1, 2)?;
    assert!(!k_view.is_contiguous());
    for mode in [ScoreMode::Logits, ScoreMode::LogSoftmax, ScoreMode::Softmax] {
        let a = ops::glimpse_scores(&q, &k_view, &rows(), None, mode)?;
        let b = ops::glimpse_scores(&q, &k_view.contiguous()?, &rows(), None, mode)?;
        assert_eq!(a.dims(), &[2, 6, 4]);
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
            "{mode:?}"
        );
    }
    Ok(())
}

#[test]
fn compaction_equals_index_select_of_the_kept_positions() -> Result<()> {
    let dev = Device::Cpu;
    let rows = rows();
    let logits = Tensor::new(
        &[
            [3f32, -1.0, 2.0, -4.0, 0.5, 1.0],
            [-2.0, 4.0, 0.0, 0.0, 0.0, 0.0],
        ],
        &dev,
    )?;
    let plan = ops::plan_keep(
        &logits,
        &rows,
        &KeepRule {
            threshold: 0.5,
            max_ratio: None,
            min_keep: 1,
        },
        true,
    )?;
    // Row 0 keeps visual 0, 2, 4, 5 (logits > 0); row 1 keeps visual 1.
    assert_eq!(plan.kept_visual()?, vec![vec![0, 2, 4, 5], vec![1]]);
    let caches: Vec<(Tensor, Tensor)> = (0..3)
        .map(|_| {
            Ok((
                Tensor::randn(0f32, 1.0, (2, 2, 12, 8), &dev)?.to_dtype(DType::BF16)?,
                Tensor::randn(0f32, 1.0, (2, 2, 12, 8), &dev)?.to_dtype(DType::BF16)?,
            ))
        })
        .collect::<Result<_>>()?;
    let out = ops::compact_kv(&caches, &plan, Padding::Right)?;
    let positions = plan.positions()?;
    let s_new = plan.max_len();
    for (l, ((k, v), (kc, vc))) in caches.iter().zip(&out).enumerate() {
        assert_eq!(kc.dims(), &[2, 2, s_new, 8]);
        for b in 0..2 {
            let idx: Vec<u32> = positions.row(b).iter().map(|&p| p as u32).collect();
            let n = idx.len();
            let idx = Tensor::new(idx.as_slice(), &dev)?;
            for (src, dst) in [(k, kc), (v, vc)] {
                let want = src.i(b)?.index_select(&idx, 1)?;
                let got = dst.i(b)?.narrow(1, 0, n)?;
                assert_eq!(
                    got.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                    "layer {l} row {b}"
                );
                let pad = dst.i(b)?.narrow(1, n, s_new - n)?;
                assert!(
                    pad.flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?
                        .iter()
                        .all(|&x| x == 0.0),
                    "padding is zero"
                );
            }
        }
    }
    // The same gather on position ids (u32) and hidden states.
    let pos = Tensor::arange(0u32, 24, &dev)?.reshape((2, 12, 1))?;
    let g = ops::gather_rows(&pos, &plan, Padding::Right)?;
    for b in 0..2 {
        let want: Vec<u32> = positions
            .row(b)
            .iter()
            .map(|&p| (b * 12) as u32 + p as u32)
            .collect();
        assert_eq!(
            &g.i(b)?.flatten_all()?.to_vec1::<u32>()?[..want.len()],
            &want[..]
        );
    }
    Ok(())
}

/// window_mean of a transposed map (strided, read in place) against the
/// means candle computes window by window, border windows smaller.
#[test]
fn window_mean_reads_a_transposed_map_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let (h, w, c, win) = (6, 7, 5, 4);
    let whc = Tensor::randn(0f32, 1.0, (2, w, h, c), &dev)?;
    let x = whc.transpose(1, 2)?; // [B, H, W, C] view, channels contiguous
    assert!(!x.is_contiguous());
    let got = ops::window_mean(&x, win, foveal::Pool::Mean)?;
    assert_eq!(got.dims(), &[2, 4, c]);
    for (m, (y0, x0)) in [(0, 0), (0, 4), (4, 0), (4, 4)].into_iter().enumerate() {
        let (hh, ww) = ((y0 + win).min(h) - y0, (x0 + win).min(w) - x0);
        let want = x
            .i((.., y0..y0 + hh, x0..x0 + ww, ..))?
            .sum((1, 2))?
            .affine(1.0 / (hh * ww) as f64, 0.0)?;
        let d = (got.i((.., m, ..))? - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "window {m}: differs by {d}");
    }
    Ok(())
}

/// text_guided_select on transposed `[B, H, S, D]` views equals it on
/// contiguous `[B, S, H, D]` copies, and the counts match the kept lists.
#[test]
fn text_guided_select_reads_head_major_views_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (2, 4, 5, 16), &dev)?.transpose(1, 2)?; // [B, T, Hq, D] view
    let k = Tensor::randn(0f32, 1.0, (2, 2, 9, 16), &dev)?.transpose(1, 2)?; // [B, N, Hkv, D] view
    let lengths = foveal::text_guided_select::Lengths::new(&[5, 3], &[9, 7])
        .map_err(candle_core::Error::wrap)?;
    let a = ops::text_guided_select(&q, &k, &lengths, 0.85)?;
    let b = ops::text_guided_select(&q.contiguous()?, &k.contiguous()?, &lengths, 0.85)?;
    let (ka, kb) = (a.kept()?, b.kept()?);
    assert_eq!(ka, kb);
    assert!(
        ka[1].iter().all(|&i| i < 7),
        "row 1 keeps only its valid tokens"
    );
    assert_eq!(
        a.count.to_vec1::<i32>()?,
        ka.iter().map(|r| r.len() as i32).collect::<Vec<_>>()
    );
    assert!(
        ops::text_guided_select(&q, &k, &lengths, 0.0).is_err(),
        "gamma 0 is refused"
    );
    Ok(())
}
