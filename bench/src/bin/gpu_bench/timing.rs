//! CUDA-event timing: warm-up, then runs enqueued behind a host-function
//! gate (so the events time the GPU work alone), or issued eagerly (host
//! launch overhead included); median and minimum of the runs.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaGraph, CudaStream};

use crate::Res;

/// A timing, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub median_us: f64,
    pub min_us: f64,
}

/// Runs enqueued behind one gate (a handful of launches each: far from the
/// depth at which enqueueing would block on the closed stream).
const GATE_CHUNK: usize = 16;
/// The longest a gate holds the stream (it opens itself after this, so an op
/// that synchronised with the host inside the gated region cannot hang the bench).
const GATE_TIMEOUT: Duration = Duration::from_secs(2);

/// A host function that holds `stream` until the returned sender is dropped
/// (or sends), so the launches enqueued meanwhile run back to back.
fn close_gate(stream: &CudaStream) -> Res<Sender<()>> {
    unsafe extern "C" fn wait_for_release(data: *mut std::ffi::c_void) {
        // Owns the receiver; makes no CUDA call (host functions must not).
        let receiver = unsafe { Box::from_raw(data.cast::<Receiver<()>>()) };
        let _ = receiver.recv_timeout(GATE_TIMEOUT);
    }
    let (release, receiver) = channel();
    let receiver = Box::into_raw(Box::new(receiver));
    // SAFETY: the callback takes ownership of the receiver exactly once; on a
    // failed launch it never runs and the box is reclaimed here.
    let launched = unsafe {
        cudarc::driver::result::stream::launch_host_function(
            stream.cu_stream(),
            wait_for_release,
            receiver.cast(),
        )
    };
    if let Err(e) = launched {
        drop(unsafe { Box::from_raw(receiver) });
        return Err(e.into());
    }
    Ok(release)
}

/// CUDA-event timing on one stream.
pub struct Timer {
    stream: Arc<CudaStream>,
    events: Vec<(CudaEvent, CudaEvent)>,
    warmup: usize,
    runs: usize,
}

impl Timer {
    pub fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        warmup: usize,
        runs: usize,
    ) -> Res<Self> {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (0..runs)
            .map(|_| Ok((ctx.new_event(timing)?, ctx.new_event(timing)?)))
            .collect::<Res<_>>()?;
        Ok(Timer {
            stream: stream.clone(),
            events,
            warmup,
            runs,
        })
    }

    /// A timer with the same warm-up and runs on another stream (candle's).
    pub fn on(&self, stream: &Arc<CudaStream>) -> Res<Self> {
        Timer::new(stream.context(), stream, self.warmup, self.runs)
    }

    /// The GPU time of `f(set)`, each run on the next of `sets` input sets,
    /// enqueued behind a gate.
    pub fn gpu(&mut self, sets: usize, f: impl FnMut(usize) -> Res<()>) -> Res<Stats> {
        self.time(true, sets, f)
    }

    /// The time of `f(set)` issued back to back with no gate: the larger of
    /// its GPU time and the host's time to issue it.
    pub fn eager(&mut self, sets: usize, f: impl FnMut(usize) -> Res<()>) -> Res<Stats> {
        self.time(false, sets, f)
    }

    fn time(
        &mut self,
        gated: bool,
        sets: usize,
        mut f: impl FnMut(usize) -> Res<()>,
    ) -> Res<Stats> {
        for i in 0..self.warmup {
            f(i % sets)?;
        }
        self.stream.synchronize()?;
        let mut run = 0;
        while run < self.runs {
            let chunk = run..(run + GATE_CHUNK).min(self.runs);
            let gate = if gated {
                Some(close_gate(&self.stream)?)
            } else {
                None
            };
            let issued = Instant::now();
            for i in chunk.clone() {
                self.events[i].0.record(&self.stream)?;
                f((self.warmup + i) % sets)?;
                self.events[i].1.record(&self.stream)?;
            }
            if gated && issued.elapsed() >= GATE_TIMEOUT / 2 {
                eprintln!(
                    "gpu_bench: issuing {} runs took {:.2?}: does the op wait on the GPU?",
                    chunk.len(),
                    issued.elapsed()
                );
            }
            drop(gate);
            run = chunk.end;
        }
        let mut us: Vec<f64> = self
            .events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b).map(|ms| ms as f64 * 1e3))
            .collect::<Result<_, _>>()?;
        us.sort_by(f64::total_cmp);
        let n = us.len();
        let median_us = if n % 2 == 1 {
            us[n / 2]
        } else {
            0.5 * (us[n / 2 - 1] + us[n / 2])
        };
        Ok(Stats {
            median_us,
            min_us: us[0],
        })
    }
}

/// Records `f`'s launches on `stream` into a graph (relaxed capture mode).
pub fn capture(stream: &Arc<CudaStream>, f: impl FnOnce() -> Res<()>) -> Res<CudaGraph> {
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let launched = f();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    launched?;
    graph?.ok_or_else(|| "the capture recorded nothing".into())
}
