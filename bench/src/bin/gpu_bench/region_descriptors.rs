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

use crate::env::Env;
use crate::table::Row;
use crate::{bit_equal, boxed, Bench, Case, Check, Mode, Res, Section};

pub const SECTION: Section = Section {
    name: "region_descriptors",
    cases,
};

/// Regions of one frame.
const FRAME_REGIONS: usize = 36;

/// A case and the regions it computes.
struct Regions {
    case: rd::Case,
    last_frame: bool,
}

fn cases(mode: Mode) -> Vec<Box<dyn Case>> {
    let all = |case| Regions {
        case,
        last_frame: false,
    };
    if mode == Mode::Quick {
        return boxed(vec![
            all(rd::Case::new(1, 16384, KvLayout::Bshd)),
            all(rd::Case::new(4, 4096, KvLayout::Bhsd)),
        ]);
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
        cases.push(Regions {
            case: rd::Case::new(batch, 16384, KvLayout::Bshd),
            last_frame: true,
        });
    }
    boxed(cases)
}

impl Case for Regions {
    fn label(&self) -> String {
        let suffix = if self.last_frame { " last frame" } else { "" };
        format!("{}{suffix}", self.case.label())
    }

    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>> {
        let case = &self.case;
        let host = case.layout();
        let regions = host.max_regions();
        let range = if self.last_frame {
            regions - FRAME_REGIONS..regions
        } else {
            0..regions
        };
        let (k_len, desc_len) = (
            case.k_layout().span(),
            case.desc_shape(regions).iter().product::<usize>(),
        );
        let sets = env.n_sets((k_len * 2 + desc_len * 4) as u64)?;
        Ok(Box::new(Prepared {
            case: self,
            layout: DeviceGazeLayout::new(&env.stream, &host)?,
            range,
            k: env.filled(sets, k_len)?,
            desc: env.zeroed(sets, desc_len)?,
        }))
    }
}

/// The input sets of a case.
struct Prepared<'a> {
    case: &'a Regions,
    layout: DeviceGazeLayout,
    range: Range<usize>,
    k: Vec<CudaSlice<bf16>>,
    desc: Vec<CudaSlice<f32>>,
}

impl Prepared<'_> {
    fn desc_shape(&self) -> [usize; 4] {
        self.case.case.desc_shape(self.layout.host().max_regions())
    }

    fn launch(&mut self, stream: &Arc<CudaStream>, set: usize) -> Res<()> {
        let shape = Layout::contiguous(self.desc_shape());
        let k = DevView::of(&self.k[set], self.case.case.k_layout())?;
        let mut desc = DevViewMut::of(&mut self.desc[set], shape)?;
        cuda::region_descriptors(stream, &k, &self.layout, self.range.clone(), &mut desc)?;
        Ok(())
    }
}

impl Bench for Prepared<'_> {
    fn sets(&self) -> usize {
        self.k.len()
    }

    fn check(&mut self, env: &mut Env) -> Res<Check> {
        let stream = &env.stream;
        env.poison(&mut self.desc[0], f32::NAN)?;
        self.launch(stream, 0)?;
        let (got, k) = (
            stream.clone_dtoh(&self.desc[0])?,
            stream.clone_dtoh(&self.k[0])?,
        );
        let mut want = vec![f32::NAN; got.len()];
        cpu::region_descriptors(
            View::new(&k, self.case.case.k_layout())?,
            self.layout.host(),
            self.range.clone(),
            &mut ViewMut::contiguous(&mut want, self.desc_shape())?,
        )?;
        Ok(Check::when(
            bit_equal(&got, &want, f32::to_bits),
            format!("bit-identical, {} regions", self.range.len()),
            "differs from the CPU reference",
        ))
    }

    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>> {
        let stats = env.gpu(self.sets(), |stream, set| self.launch(stream, set))?;
        // The incremental step moves one frame's keys per row and writes its regions.
        let case = &self.case.case;
        let bytes = if self.case.last_frame {
            floor_bytes(
                &rd::Case {
                    visual: rd::SIDE * rd::SIDE,
                    ..*case
                },
                FRAME_REGIONS,
                2,
            )
        } else {
            floor_bytes(case, self.layout.host().max_regions(), 2)
        };
        Ok(vec![Row::new(stats, bytes)])
    }
}
