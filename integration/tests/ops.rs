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
