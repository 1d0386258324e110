//! gpu_bench section `region_descriptors`: every region of the layout of
//! `foveal_bench::region_descriptors` (32 x 32-token frames, 6 x 6 regions,
//! Qwen2.5-VL-7B keys in bf16), and the incremental step of a video (the last
//! frame's 36 regions only). Checked once against the CPU reference
//! (descriptors poisoned first; the GPU's must be bit-identical).

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use foveal::cuda::{DevView, DevViewMut};
use foveal::gaze_layout::cuda::DeviceGazeLayout;
use foveal::region_descriptors::{cpu, cuda};
use foveal::{Layout, View, ViewMut};
use foveal_bench::region_descriptors::{self as rd, floor_bytes};
use foveal_bench::{KvLayout, VISUAL_TOKENS};
use half::bf16;

use super::{Env, Res, Row};

/// Regions of one frame.
const FRAME_REGIONS: usize = 36;

/// A case and the regions it computes.
pub(super) struct Case {
    case: rd::Case,
    last_frame: bool,
}

impl Case {
    pub(super) fn label(&self) -> String {
        let suffix = if self.last_frame { " last frame" } else { "" };
        format!("{}{suffix}", self.case.label())
    }
}

pub(super) fn cases(quick: bool) -> Vec<Case> {
    let all = |case| Case {
        case,
        last_frame: false,
    };
    if quick {
        return vec![
            all(rd::Case::new(1, 16384, KvLayout::Bshd)),
            all(rd::Case::new(4, 4096, KvLayout::Bhsd)),
        ];
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4] {
            for layout in KvLayout::ALL {
                cases.push(all(rd::Case::new(batch, nv, layout)));
            }
        }
    }
    for batch in [1, 4] {
        cases.push(Case {
            case: rd::Case::new(batch, 16384, KvLayout::Bshd),
            last_frame: true,
        });
    }
    cases
}

fn launch(
    stream: &Arc<CudaStream>,
    case: &rd::Case,
    layout: &DeviceGazeLayout,
    range: Range<usize>,
    k: &CudaSlice<bf16>,
    desc: &mut CudaSlice<f32>,
) -> Res<()> {
    let k = DevView::of(k, case.k_layout())?;
    let shape = case.desc_shape(layout.host().max_regions());
    let mut desc = DevViewMut::of(desc, Layout::contiguous(shape))?;
    cuda::region_descriptors(stream, &k, layout, range, &mut desc)?;
    Ok(())
}

pub(super) fn run(env: &mut Env, c: &Case) -> Res<Row> {
    let stream = env.stream.clone();
    let case = &c.case;
    let host = case.layout();
    let regions = host.max_regions();
    let range = if c.last_frame {
        regions - FRAME_REGIONS..regions
    } else {
        0..regions
    };
    let layout = DeviceGazeLayout::new(&stream, &host)?;
    let shape = case.desc_shape(regions);
    let (k_len, desc_len) = (case.k_layout().span(), shape.iter().product::<usize>());
    let sets = env.n_sets((k_len * 2 + desc_len * 4) as u64)?;
    let k: Vec<CudaSlice<bf16>> = (0..sets)
        .map(|_| env.pool.filled(&stream, k_len))
        .collect::<Res<_>>()?;
    let mut desc: Vec<CudaSlice<f32>> = (0..sets)
        .map(|_| stream.alloc_zeros::<f32>(desc_len))
        .collect::<Result<_, _>>()?;

    let check = if env.check {
        stream.memcpy_htod(&vec![f32::NAN; desc_len], &mut desc[0])?;
        launch(&stream, case, &layout, range.clone(), &k[0], &mut desc[0])?;
        let got = stream.clone_dtoh(&desc[0])?;
        let kh = stream.clone_dtoh(&k[0])?;
        let mut want = vec![f32::NAN; desc_len];
        cpu::region_descriptors(
            View::new(&kh, case.k_layout())?,
            &host,
            range.clone(),
            &mut ViewMut::contiguous(&mut want, shape)?,
        )?;
        if got
            .iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == w.to_bits())
        {
            format!("ok (bit-identical, {} regions, {sets} sets)", range.len())
        } else {
            "FAIL (differs from the CPU reference)".to_string()
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env.timer.gpu(|i| {
        launch(
            &stream,
            case,
            &layout,
            range.clone(),
            &k[i % sets],
            &mut desc[i % sets],
        )
    })?;
    // The incremental step moves one frame's keys per row and writes its regions.
    let bytes = if c.last_frame {
        floor_bytes(
            &rd::Case {
                visual: rd::SIDE * rd::SIDE,
                ..*case
            },
            FRAME_REGIONS,
            2,
        )
    } else {
        floor_bytes(case, regions, 2)
    };
    Ok(Row {
        op: "region_descriptors",
        shape: c.label(),
        stats: Some(stats),
        bytes,
        baseline: None,
        check,
    })
}
