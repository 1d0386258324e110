//! What every case runs with: the device, one stream, the timer, a pool of
//! random bf16 to fill inputs from, the number of input sets that defeats
//! L2, the ceilings measured so far, and candle's CUDA device (for the
//! baselines and the matrix rate).

use std::sync::Arc;

use candle_core::{CudaDevice, Storage, Tensor};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use foveal_bench::{fmt_bytes, random_elems, rng};
use half::bf16;

use crate::table::Ceilings;
use crate::timing::{Stats, Timer};
use crate::Res;

pub struct Env {
    pub ctx: Arc<CudaContext>,
    /// The stream foveal's ops run on.
    pub stream: Arc<CudaStream>,
    /// Times work on `stream`; `timer.on(other)` for another stream.
    pub timer: Timer,
    pub pool: Pool,
    /// The ceilings measured so far in this run (for a section whose rows
    /// report the figure of whichever ceiling bounds the case).
    pub ceilings: Ceilings,
    l2_bytes: u64,
    candle: Option<CudaDevice>,
}

impl Env {
    pub fn new(ctx: Arc<CudaContext>, warmup: usize, runs: usize) -> Res<Self> {
        // One stream: no cross-stream event tracking is needed, and none is
        // wanted inside the timed region or a graph capture.
        // SAFETY: every buffer of this context is used on `stream` only
        // (candle's device has a context object of its own).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let l2_bytes = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?
            .max(0) as u64;
        let timer = Timer::new(&ctx, &stream, warmup, runs)?;
        let pool = Pool::new(&stream, 16 << 20)?;
        Ok(Env {
            ctx,
            stream,
            timer,
            pool,
            ceilings: Ceilings::default(),
            l2_bytes,
            candle: None,
        })
    }

    /// [`Timer::gpu`] on foveal's stream: `f(stream, set)`.
    pub fn gpu(
        &mut self,
        sets: usize,
        mut f: impl FnMut(&Arc<CudaStream>, usize) -> Res<()>,
    ) -> Res<Stats> {
        let stream = self.stream.clone();
        self.timer.gpu(sets, |set| f(&stream, set))
    }

    /// [`Timer::eager`] on foveal's stream: `f(stream, set)`.
    pub fn eager(
        &mut self,
        sets: usize,
        mut f: impl FnMut(&Arc<CudaStream>, usize) -> Res<()>,
    ) -> Res<Stats> {
        let stream = self.stream.clone();
        self.timer.eager(sets, |set| f(&stream, set))
    }

    pub fn l2_bytes(&self) -> u64 {
        self.l2_bytes
    }

    /// Input sets to rotate over: enough to hold 4x the L2 size together,
    /// at least 3, at most 256, within half the free memory.
    pub fn n_sets(&self, set_bytes: u64) -> Res<usize> {
        // Let the memory pool hand back the previous case's buffers first.
        self.stream.synchronize()?;
        let (free, _) = self.ctx.mem_get_info()?;
        let mut n = (4 * self.l2_bytes).div_ceil(set_bytes.max(1)).clamp(3, 256) as usize;
        while n > 3 && n as u64 * set_bytes > free as u64 / 2 {
            n -= 1;
        }
        if 3 * set_bytes > free as u64 {
            return Err(format!(
                "3 input sets of {} do not fit in {} of free memory",
                fmt_bytes(set_bytes),
                fmt_bytes(free as u64)
            )
            .into());
        }
        Ok(n)
    }

    /// `sets` buffers of `elems` each, filled from the pool.
    pub fn filled(&mut self, sets: usize, elems: usize) -> Res<Vec<CudaSlice<bf16>>> {
        (0..sets)
            .map(|_| self.pool.filled(&self.stream, elems))
            .collect()
    }

    /// `sets` zeroed buffers of `elems` (at least one) each.
    pub fn zeroed<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        sets: usize,
        elems: usize,
    ) -> Res<Vec<CudaSlice<T>>> {
        (0..sets)
            .map(|_| Ok(self.stream.alloc_zeros::<T>(elems.max(1))?))
            .collect()
    }

    /// Overwrites `buf` with `value` (an output, before a check).
    pub fn poison<T: DeviceRepr + Copy>(&self, buf: &mut CudaSlice<T>, value: T) -> Res<()> {
        self.stream.memcpy_htod(&vec![value; buf.len()], buf)?;
        Ok(())
    }

    /// candle's CUDA device 0 (made once: it loads cuBLAS and cuRAND). Its
    /// work runs on its own stream (`cuda_stream()`): time it with
    /// `timer.on(&device.cuda_stream())`.
    pub fn candle(&mut self) -> Res<CudaDevice> {
        if self.candle.is_none() {
            let candle_core::Device::Cuda(dev) = candle_core::Device::new_cuda(0)? else {
                return Err("candle gave no CUDA device".into());
            };
            self.candle = Some(dev);
        }
        Ok(self.candle.clone().expect("made above"))
    }
}

/// A pool of random bf16 on the device; buffers are filled with copies of
/// its slices at varying offsets (fast, never zeros, different per buffer).
pub struct Pool {
    data: CudaSlice<bf16>,
    salt: u64,
}

impl Pool {
    fn new(stream: &Arc<CudaStream>, elems: usize) -> Res<Self> {
        let host: Vec<bf16> = random_elems(&mut rng(0x900d_5eed), elems, -1.0, 1.0);
        Ok(Pool {
            data: stream.clone_htod(&host)?,
            salt: 1,
        })
    }

    fn fill(&mut self, stream: &Arc<CudaStream>, dst: &mut CudaSlice<bf16>) -> Res<()> {
        let p = self.data.len();
        let chunk = p / 2;
        let mut off = 0;
        while off < dst.len() {
            let n = chunk.min(dst.len() - off);
            self.salt = self
                .salt
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let from = ((self.salt >> 33) as usize) % (p - n + 1);
            stream.memcpy_dtod(
                &self.data.slice(from..from + n),
                &mut dst.slice_mut(off..off + n),
            )?;
            off += n;
        }
        Ok(())
    }

    /// A new buffer of `elems` (at least one) filled from the pool.
    pub fn filled(&mut self, stream: &Arc<CudaStream>, elems: usize) -> Res<CudaSlice<bf16>> {
        let mut buf = stream.alloc_zeros::<bf16>(elems.max(1))?;
        self.fill(stream, &mut buf)?;
        Ok(buf)
    }
}

/// The device buffer of a contiguous bf16 candle tensor, for foveal to read
/// through a view (candle and foveal use one `cudarc`, so the slice passes
/// without a copy).
pub fn candle_slice(t: &Tensor) -> Res<CudaSlice<bf16>> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        // A clone of the handle shares the allocation (no copy is made).
        Storage::Cuda(s) if layout.start_offset() == 0 && t.is_contiguous() => {
            Ok(s.as_cuda_slice::<bf16>()?.clone())
        }
        _ => Err("expected a contiguous CUDA tensor".into()),
    }
}
