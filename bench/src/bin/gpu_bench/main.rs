//! gpu_bench: CUDA-event timings of foveal's GPU ops at realistic sizes,
//! against the device's measured copy bandwidth.
//!
//! ```text
//! cargo run -p foveal-bench --features cuda --release --bin gpu_bench -- [--quick] [--out FILE] [--only OPS] [--runs N] [--no-check]
//! ```
//!
//! - Finds device 0; without one (no device) it prints a "no GPU" line and
//!   exits 0. The binary links candle's CUDA backend (the unfused baseline),
//!   hence the driver library, cuBLAS, cuRAND and NVRTC: it starts only where
//!   they are (a GPU machine; scripts/gpu-suite.sh finds them there).
//! - Measures the device-to-device copy bandwidth (a 1 GiB `memcpy_dtod`,
//!   bytes read + written), the ceiling every GB/s figure is compared to.
//! - For each op (sections `glimpse_scores`, `select_keep`, `compact_kv`,
//!   `window_mean`, `multiscale_gather`, `text_guided_select`,
//!   `region_descriptors`, `route_topk`, `gaze_decode`, `gaze_route_decode`;
//!   the last four in their own modules) and
//!   case: fills input sets on the device (at least 3, more until together
//!   they hold 4x the L2 size, at most 256), checks the op once against the
//!   CPU reference (output poisoned first), then times it with CUDA events:
//!   warm-up, then runs back to back, each on the next input set, so that no
//!   run finds its inputs in L2. The stream is held by a host-function gate
//!   while a chunk of runs is enqueued and released after, so the events time
//!   the GPU work alone (not the host's launch overhead); median and minimum
//!   over `--runs` runs (default 50).
//! - compact_kv also times the per-layer baseline (one gather per layer's K
//!   and per V, `2L` launches; for the `[B, H, S, D]` order, which has no
//!   single-plane row view, `L` two-plane compact_kv launches): replayed from
//!   a CUDA graph and gated (its GPU time alone, against the op's), and
//!   eagerly, a loop of calls issued back to back without the gate (what an
//!   eager framework pays, host launch overhead included, against the op
//!   issued the same way, `eager_us`).
//! - text_guided_select is also timed against the same computation in
//!   unfused candle ops (matmul, softmax, max, mean, sort, cumsum, threshold)
//!   on candle's stream, at Qwen2.5-VL-7B-like heads, 64 text and 2,880
//!   visual tokens ([`text_guided_unfused`]): base_us is the unfused ops'
//!   gated GPU time, base_eager_us theirs issued eagerly.
//! - gaze_decode (module `gaze_decode`) also times dense decode attention
//!   over the same cache (the same kernels, every position visible), gated
//!   and eagerly.
//! - gaze_route_decode (module `gaze_route_decode`, the fused route_topk +
//!   gaze_decode) gives two rows per case: against the two ops called one
//!   after the other, and against dense decode attention.
//! - Prints one row per case and writes the table to `--out` (markdown when
//!   the name ends in `.md`, CSV otherwise). `bytes` is the op's floor: what
//!   it must read plus write (`foveal_bench::<op>::floor_bytes`); GB/s is
//!   bytes over the median GPU time.
//!
//! `--quick` runs a few cases with 20 runs each (a smoke test); `--only`
//! takes a comma-separated list of op names.

use std::error::Error;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream};
use foveal::compact_kv::{cpu as compact_cpu, cuda as compact_cuda};
use foveal::cuda::{
    DevView, DevViewMut, DeviceKeepPositions, DeviceKeepSet, DeviceRowLayout, Workspace,
};
use foveal::glimpse_scores::{cpu as glimpse_cpu, cuda as glimpse_cuda};
use foveal::multiscale_gather::{cpu as msg_cpu, cuda as msg_cuda};
use foveal::select_keep::{cpu as select_cpu, cuda as select_cuda};
use foveal::text_guided_select::cuda::DeviceLengths;
use foveal::text_guided_select::{cpu as tgs_cpu, cuda as tgs_cuda, select_from_scores};
use foveal::window_mean::{cpu as wm_cpu, cuda as wm_cuda};
use foveal::{KeepRule, KeepSet, Layout, Pool as PoolKind, ScoreMode, View, ViewMut};
use foveal_bench::multiscale_gather::{self as mg, Branches};
use foveal_bench::text_guided_select::{self as tg};
use foveal_bench::window_mean::{self as wm};
use foveal_bench::{
    compact_kv as ck, fmt_bytes, glimpse_scores as gs, random_elems, rng, select_keep as sk,
    KvLayout, VISUAL_TOKENS,
};
use half::bf16;

mod gaze_decode;
mod gaze_route_decode;
mod region_descriptors;
mod route_topk;
mod text_guided_unfused;

type Res<T> = Result<T, Box<dyn Error>>;

const USAGE: &str = "usage: gpu_bench [--quick] [--out FILE(.md|.csv)] [--only glimpse_scores,select_keep,compact_kv,window_mean,multiscale_gather,text_guided_select,region_descriptors,route_topk,gaze_decode,gaze_route_decode] [--runs N] [--no-check]";
const OPS: [&str; 10] = [
    "glimpse_scores",
    "select_keep",
    "compact_kv",
    "window_mean",
    "multiscale_gather",
    "text_guided_select",
    "region_descriptors",
    "route_topk",
    "gaze_decode",
    "gaze_route_decode",
];

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    only: Vec<String>,
    runs: Option<usize>,
    check: bool,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        quick: false,
        out: None,
        only: Vec::new(),
        runs: None,
        check: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--no-check" => args.check = false,
            "--out" => args.out = Some(it.next().ok_or("--out needs a file name")?.into()),
            "--only" => {
                let list = it.next().ok_or("--only needs a list of ops")?;
                for op in list.split(',').filter(|s| !s.is_empty()) {
                    if !OPS.contains(&op) {
                        return Err(format!("unknown op `{op}` (ops: {})", OPS.join(", ")).into());
                    }
                    args.only.push(op.to_string());
                }
            }
            "--runs" => {
                let n: usize = it.next().ok_or("--runs needs a number")?.parse()?;
                if n == 0 {
                    return Err("--runs must be at least 1".into());
                }
                args.runs = Some(n);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // `cargo bench` passes --bench to every target it runs.
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    Ok(args)
}

impl Args {
    fn wants(&self, op: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == op)
    }
}

// ---------------------------------------------------------------------------
// Device discovery
// ---------------------------------------------------------------------------

/// Device 0's context, or why there is none. cudarc loads libcuda at run
/// time and panics when it cannot: the probe runs under catch_unwind, with
/// the panic message kept off stderr.
fn probe_gpu() -> Result<Arc<CudaContext>, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probed = std::panic::catch_unwind(|| -> Result<Arc<CudaContext>, String> {
        let n = CudaContext::device_count().map_err(|e| format!("the CUDA driver failed: {e}"))?;
        if n < 1 {
            return Err("the CUDA driver reports no device".into());
        }
        CudaContext::new(0).map_err(|e| format!("device 0 could not be opened: {e}"))
    });
    std::panic::set_hook(hook);
    match probed {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            // cudarc's message lists every library name it tried; keep the first sentence.
            Err(msg.split(" - searched").next().unwrap_or(&msg).to_string())
        }
    }
}

// ---------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Stats {
    median_us: f64,
    min_us: f64,
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

/// CUDA-event timing on one stream (see the module docs).
struct Timer {
    stream: Arc<CudaStream>,
    events: Vec<(CudaEvent, CudaEvent)>,
    warmup: usize,
    runs: usize,
}

impl Timer {
    fn new(
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

    /// The GPU time of `f(i)` (run `i`; rotate input sets by it), enqueued
    /// behind a gate.
    fn gpu(&mut self, f: impl FnMut(usize) -> Res<()>) -> Res<Stats> {
        self.time(true, f)
    }

    /// The time of `f(i)` issued back to back with no gate: the larger of its
    /// GPU time and the host's time to issue it.
    fn eager(&mut self, f: impl FnMut(usize) -> Res<()>) -> Res<Stats> {
        self.time(false, f)
    }

    fn time(&mut self, gated: bool, mut f: impl FnMut(usize) -> Res<()>) -> Res<Stats> {
        for i in 0..self.warmup {
            f(i)?;
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
                f(self.warmup + i)?;
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
fn capture(stream: &Arc<CudaStream>, f: impl FnOnce() -> Res<()>) -> Res<CudaGraph> {
    stream.synchronize()?;
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let launched = f();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    launched?;
    graph?.ok_or_else(|| "the capture recorded nothing".into())
}

// ---------------------------------------------------------------------------
// Device inputs
// ---------------------------------------------------------------------------

/// A pool of random bf16 on the device; buffers are filled with copies of
/// its slices at varying offsets (fast, never zeros, different per buffer).
struct Pool {
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

    fn filled(&mut self, stream: &Arc<CudaStream>, elems: usize) -> Res<CudaSlice<bf16>> {
        let mut buf = stream.alloc_zeros::<bf16>(elems.max(1))?;
        self.fill(stream, &mut buf)?;
        Ok(buf)
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// A baseline (compact_kv's per-layer loop, gaze_decode's dense decode), and
/// the op timed the same ways.
struct Baseline {
    name: String,
    /// The op issued eagerly (no gate).
    op_eager_us: f64,
    /// The loop issued eagerly.
    eager_us: f64,
    /// The baseline's GPU time, gated (compact_kv: the loop replayed from a
    /// graph; gaze_decode: dense decode attention).
    graph_us: Option<f64>,
}

struct Row {
    op: &'static str,
    shape: String,
    /// GPU time (gated).
    stats: Option<Stats>,
    bytes: u64,
    baseline: Option<Baseline>,
    check: String,
}

impl Row {
    fn failed(op: &'static str, shape: String, e: &dyn Error) -> Self {
        Row {
            op,
            shape,
            stats: None,
            bytes: 0,
            baseline: None,
            check: format!("ERROR: {e}"),
        }
    }

    fn gbps(&self) -> Option<f64> {
        self.stats
            .map(|s| self.bytes as f64 / (s.median_us * 1e-6) / 1e9)
    }

    /// The cells of the table, in COLUMNS order.
    fn cells(&self, copy_gbps: f64) -> Vec<String> {
        let f = |x: Option<f64>, prec: usize| x.map_or(String::new(), |v| format!("{v:.prec$}"));
        let median = self.stats.map(|s| s.median_us);
        let speedup = |base: Option<f64>, op: Option<f64>| match (base, op) {
            (Some(b), Some(m)) => format!("{:.2}x", b / m),
            _ => String::new(),
        };
        let b = self.baseline.as_ref();
        let op_eager = b.map(|b| b.op_eager_us);
        vec![
            self.op.to_string(),
            self.shape.clone(),
            f(median, 1),
            f(self.stats.map(|s| s.min_us), 1),
            self.bytes.to_string(),
            f(self.gbps(), 1),
            self.gbps()
                .map_or(String::new(), |g| format!("{:.1}%", 100.0 * g / copy_gbps)),
            b.map_or(String::new(), |b| b.name.clone()),
            f(b.and_then(|b| b.graph_us), 1),
            speedup(b.and_then(|b| b.graph_us), median),
            f(op_eager, 1),
            f(b.map(|b| b.eager_us), 1),
            speedup(b.map(|b| b.eager_us), op_eager),
            self.check.clone(),
        ]
    }
}

/// median_us, min_us: the op's GPU time; GB/s and of_copy from the median.
/// For compact_kv: base_us, speedup: the per-layer loop's GPU time (graph
/// replay) and the op's speedup over it; eager_us, base_eager_us,
/// speedup_eager: the op and the loop issued eagerly (host overhead included).
/// For text_guided_select vs unfused: the same with the unfused candle ops
/// (their gated GPU time, not a graph) in place of the loop.
/// For gaze_decode the same columns with dense decode attention as the baseline.
const COLUMNS: [&str; 14] = [
    "op",
    "shape",
    "median_us",
    "min_us",
    "bytes",
    "GB/s",
    "of_copy",
    "baseline",
    "base_us",
    "speedup",
    "eager_us",
    "base_eager_us",
    "speedup_eager",
    "check",
];

fn print_row(cells: &[String]) {
    println!(
        "{:<14} {:<32} {:>9} {:>9} {:>11} {:>7} {:>7}  {:<34} {:>8} {:>7} {:>8} {:>13} {:>13}  {}",
        cells[0],
        cells[1],
        cells[2],
        cells[3],
        cells[4],
        cells[5],
        cells[6],
        cells[7],
        cells[8],
        cells[9],
        cells[10],
        cells[11],
        cells[12],
        cells[13]
    );
}

fn print_header() {
    print_row(&COLUMNS.map(String::from));
}

/// The table as markdown (`.md`) or CSV.
fn render(path: &std::path::Path, header: &str, rows: &[Row], copy_gbps: f64) -> String {
    let markdown = path.extension().is_some_and(|e| e == "md");
    let mut s = String::new();
    if markdown {
        s += &format!(
            "{header}\n\n| {} |\n|{}\n",
            COLUMNS.join(" | "),
            "---|".repeat(COLUMNS.len())
        );
        for r in rows {
            s += &format!(
                "| {} |\n",
                r.cells(copy_gbps).join(" | ").replace('\n', " ")
            );
        }
    } else {
        let quote = |c: &str| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.to_string()
            }
        };
        s += &(COLUMNS.join(",") + "\n");
        for r in rows {
            s += &(r
                .cells(copy_gbps)
                .iter()
                .map(|c| quote(c))
                .collect::<Vec<_>>()
                .join(",")
                + "\n");
        }
    }
    s
}

/// ||got - want|| / ||want|| in f64; infinite when `got` has a non-finite
/// value where `want` is finite (an unwritten, poisoned element).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() && w.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct Env {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    timer: Timer,
    pool: Pool,
    l2_bytes: u64,
    check: bool,
}

impl Env {
    /// Input sets to rotate over: enough to hold 4x the L2 size together,
    /// at least 3, at most 256, within half the free memory.
    fn n_sets(&self, set_bytes: u64) -> Res<usize> {
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
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_bench: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let ctx = match probe_gpu() {
        Ok(ctx) => ctx,
        Err(why) => {
            println!("gpu_bench: no GPU, nothing to measure ({why}).");
            return;
        }
    };
    if let Err(e) = run(ctx, &args) {
        eprintln!("gpu_bench: error: {e}");
        std::process::exit(1);
    }
}

fn run(ctx: Arc<CudaContext>, args: &Args) -> Res<()> {
    // One stream: no cross-stream event tracking is needed, and none is wanted
    // inside the timed region or a graph capture.
    // SAFETY: every buffer below is used on this one stream only.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    let name = ctx.name()?;
    let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let l2_bytes = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?
        .max(0) as u64;
    let total = ctx.total_mem()?;
    let header = format!(
        "device: {name}, {sms} SMs, L2 {}, memory {}; {} mode",
        fmt_bytes(l2_bytes),
        fmt_bytes(total as u64),
        if args.quick { "quick" } else { "full" }
    );
    println!("{header}");

    let runs = args.runs.unwrap_or(if args.quick { 20 } else { 50 });
    let warmup = if args.quick { 2 } else { 5 };
    let timer = Timer::new(&ctx, &stream, warmup, runs)?;
    let pool = Pool::new(&stream, 16 << 20)?;
    let mut env = Env {
        ctx,
        stream,
        timer,
        pool,
        l2_bytes,
        check: args.check,
    };
    println!("timing: {warmup} warm-up runs, then the median of {runs} runs over input sets holding 4x the L2 size");

    // The ceiling: a large device-to-device copy, bytes read + written.
    let copy_bytes: usize = if args.quick { 256 << 20 } else { 1 << 30 };
    let copy = copy_bandwidth(&mut env, copy_bytes)?;
    let copy_gbps = copy.gbps().expect("measured");
    let header = format!("{header}; device-to-device copy: {copy_gbps:.1} GB/s");
    println!(
        "copy bandwidth: {copy_gbps:.1} GB/s ({} copied, median {:.1} us)\n",
        fmt_bytes(copy_bytes as u64),
        copy.stats.unwrap().median_us
    );
    print_header();
    print_row(&copy.cells(copy_gbps));
    let mut rows = vec![copy];

    let write_out = |rows: &[Row]| -> Res<()> {
        if let Some(path) = &args.out {
            std::fs::write(path, render(path, &header, rows, copy_gbps))?;
        }
        Ok(())
    };

    if args.wants("glimpse_scores") {
        for case in glimpse_cases(args.quick) {
            let row = glimpse_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("glimpse_scores", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("select_keep") {
        for case in select_cases(args.quick) {
            let row = select_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("select_keep", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("compact_kv") {
        for case in compact_cases(args.quick) {
            let row = compact_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("compact_kv", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("window_mean") {
        for case in window_cases(args.quick) {
            let row = window_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("window_mean", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("multiscale_gather") {
        for case in multiscale_cases(args.quick) {
            let row = multiscale_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("multiscale_gather", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("text_guided_select") {
        for case in text_cases(args.quick) {
            let row = text_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("text_guided_select", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
        for case in text_guided_unfused::cases(args.quick) {
            let row = text_guided_unfused::case(&mut env, &case).unwrap_or_else(|e| {
                Row::failed(
                    "text_guided_select",
                    format!("{} vs unfused", case.label()),
                    e.as_ref(),
                )
            });
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("region_descriptors") {
        for case in region_descriptors::cases(args.quick) {
            let row = region_descriptors::run(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("region_descriptors", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("route_topk") {
        for case in route_topk::cases(args.quick) {
            let row = route_topk::run(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("route_topk", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("gaze_decode") {
        for case in gaze_decode::cases(args.quick) {
            let row = gaze_decode::run_case(&mut env, &case)
                .unwrap_or_else(|e| Row::failed("gaze_decode", case.label(), e.as_ref()));
            print_row(&row.cells(copy_gbps));
            rows.push(row);
            write_out(&rows)?;
        }
    }
    if args.wants("gaze_route_decode") {
        for case in gaze_route_decode::cases(args.quick) {
            let new_rows = gaze_route_decode::run_case(&mut env, &case).unwrap_or_else(|e| {
                vec![Row::failed("gaze_route_decode", case.label(), e.as_ref())]
            });
            for row in new_rows {
                print_row(&row.cells(copy_gbps));
                rows.push(row);
            }
            write_out(&rows)?;
        }
    }

    // The whole table again, last, so that the end of the output carries it.
    println!("\n{header}");
    print_header();
    for r in &rows {
        print_row(&r.cells(copy_gbps));
    }
    if let Some(path) = &args.out {
        println!("table written to {}", path.display());
    }
    let failed = rows
        .iter()
        .filter(|r| r.stats.is_none() || r.check.starts_with("FAIL"))
        .count();
    if failed > 0 {
        return Err(format!("{failed} case(s) failed or did not match the CPU reference").into());
    }
    Ok(())
}

fn copy_bandwidth(env: &mut Env, bytes: usize) -> Res<Row> {
    let n = bytes / 2;
    let stream = env.stream.clone();
    let src = env.pool.filled(&stream, n)?;
    let mut dst = stream.alloc_zeros::<bf16>(n)?;
    let stats = env.timer.gpu(|_| Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(Row {
        op: "copy",
        shape: format!("memcpy_dtod {}", fmt_bytes(bytes as u64)),
        stats: Some(stats),
        bytes: 2 * bytes as u64,
        baseline: None,
        check: String::new(),
    })
}

// ---------------------------------------------------------------------------
// glimpse_scores
// ---------------------------------------------------------------------------

fn glimpse_cases(quick: bool) -> Vec<gs::Case> {
    if quick {
        return vec![
            gs::Case::new(1, 1024, KvLayout::Bshd),
            gs::Case::new(4, 16384, KvLayout::Bshd),
            gs::Case::new(4, 16384, KvLayout::Bhsd).with_mode(ScoreMode::Logits),
        ];
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4] {
            for layout in KvLayout::ALL {
                for mode in [ScoreMode::LogSoftmax, ScoreMode::Logits] {
                    cases.push(gs::Case::new(batch, nv, layout).with_mode(mode));
                }
            }
        }
    }
    cases
}

#[allow(clippy::too_many_arguments)]
fn glimpse_launch(
    stream: &Arc<CudaStream>,
    plan: &gs::Plan,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    rows: &DeviceRowLayout,
    out: &mut CudaSlice<f32>,
    ws: &mut Workspace,
) -> Res<()> {
    let q = DevView::of(q, plan.q_layout)?;
    let k = DevView::of(k, plan.k_layout)?;
    let mut out = DevViewMut::of(out, Layout::contiguous(plan.out_shape()))?;
    glimpse_cuda::glimpse_scores(stream, &q, &k, rows, None, plan.mode, &mut out, ws)?;
    Ok(())
}

fn glimpse_case(env: &mut Env, case: &gs::Case) -> Res<Row> {
    let plan = gs::plan(case);
    let stream = env.stream.clone();
    let (q_len, k_len, out_len) = (plan.q_layout.span(), plan.k_layout.span(), plan.out_len());
    let sets = env.n_sets((2 * q_len + 2 * k_len + 4 * out_len) as u64)?;
    let q: Vec<CudaSlice<bf16>> = (0..sets)
        .map(|_| env.pool.filled(&stream, q_len))
        .collect::<Res<_>>()?;
    let k: Vec<CudaSlice<bf16>> = (0..sets)
        .map(|_| env.pool.filled(&stream, k_len))
        .collect::<Res<_>>()?;
    let mut out: Vec<CudaSlice<f32>> = (0..sets)
        .map(|_| stream.alloc_zeros::<f32>(out_len))
        .collect::<Result<_, _>>()?;
    let rows = DeviceRowLayout::new(&stream, &plan.rows)?;
    let mut ws = Workspace::new();

    let check = if env.check {
        stream.memcpy_htod(&vec![f32::NAN; out_len], &mut out[0])?;
        glimpse_launch(&stream, &plan, &q[0], &k[0], &rows, &mut out[0], &mut ws)?;
        let got = stream.clone_dtoh(&out[0])?;
        let (qh, kh) = (stream.clone_dtoh(&q[0])?, stream.clone_dtoh(&k[0])?);
        let mut want = vec![0f32; out_len];
        let mut want_view = ViewMut::contiguous(&mut want, plan.out_shape())?;
        glimpse_cpu::glimpse_scores(
            View::new(&qh, plan.q_layout)?,
            View::new(&kh, plan.k_layout)?,
            &plan.rows,
            None,
            plan.mode,
            &mut want_view,
        )?;
        let err = rel_err(&got, &want);
        if err <= 1e-4 {
            format!("ok (rel err {err:.0e}, {sets} sets)")
        } else {
            format!("FAIL (rel err {err:.1e})")
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env.timer.gpu(|i| {
        let s = i % sets;
        glimpse_launch(&stream, &plan, &q[s], &k[s], &rows, &mut out[s], &mut ws)
    })?;
    Ok(Row {
        op: "glimpse_scores",
        shape: case.label(),
        stats: Some(stats),
        bytes: plan.floor_bytes(2),
        baseline: None,
        check,
    })
}

// ---------------------------------------------------------------------------
// select_keep
// ---------------------------------------------------------------------------

fn select_cases(quick: bool) -> Vec<sk::Case> {
    let capped = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    if quick {
        return vec![
            sk::Case::new(1, 1024),
            sk::Case::new(8, 16384).with_rule(capped),
        ];
    }
    let mut cases = Vec::new();
    for nv in VISUAL_TOKENS {
        for batch in [1, 4, 8] {
            cases.push(sk::Case::new(batch, nv));
            cases.push(sk::Case::new(batch, nv).with_rule(capped));
        }
    }
    cases
}

fn select_case(env: &mut Env, case: &sk::Case) -> Res<Row> {
    let input = sk::generate(case);
    let stream = env.stream.clone();
    let (b, nv_max) = (input.rows.batch(), input.rows.nv_max());
    let layout = Layout::contiguous([b, nv_max]);
    let sets = env.n_sets((b * nv_max * 8) as u64)?;
    let host: Vec<Vec<f32>> = (0..sets)
        .map(|s| {
            if s == 0 {
                input.logits.clone()
            } else {
                sk::predictor_logits(&mut rng(case.seed + s as u64), &input.rows)
            }
        })
        .collect();
    let logits: Vec<CudaSlice<f32>> = host
        .iter()
        .map(|h| stream.clone_htod(h))
        .collect::<Result<_, _>>()?;
    let rows = DeviceRowLayout::new(&stream, &input.rows)?;
    let mut keep: Vec<DeviceKeepSet> = (0..sets)
        .map(|_| DeviceKeepSet::new(&stream, &rows))
        .collect::<Result<_, _>>()?;

    let check = if env.check {
        select_cuda::select_keep(
            &stream,
            &DevView::of(&logits[0], layout)?,
            &rows,
            &input.rule,
            &mut keep[0],
        )?;
        let got = keep[0].to_host(&stream)?;
        let mut want = KeepSet::new(&input.rows);
        select_cpu::select_keep(input.logits_view(), &input.rows, &input.rule, &mut want)?;
        let kept: usize = (0..b).map(|r| want.kept(r).len()).sum();
        if got == want {
            format!("ok (exact, {kept} kept, {sets} sets)")
        } else {
            "FAIL (differs from the CPU reference)".to_string()
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let rule = input.rule;
    let stats = env.timer.gpu(|i| {
        let s = i % sets;
        select_cuda::select_keep(
            &stream,
            &DevView::of(&logits[s], layout)?,
            &rows,
            &rule,
            &mut keep[s],
        )?;
        Ok(())
    })?;
    Ok(Row {
        op: "select_keep",
        shape: case.label(),
        stats: Some(stats),
        bytes: input.floor_bytes(),
        baseline: None,
        check,
    })
}

// ---------------------------------------------------------------------------
// compact_kv
// ---------------------------------------------------------------------------

fn compact_cases(quick: bool) -> Vec<ck::Case> {
    if quick {
        return vec![
            ck::Case::new(16, 1, 1024, KvLayout::Bshd),
            ck::Case::new(28, 4, 16384, KvLayout::Bshd),
            ck::Case::new(28, 4, 16384, KvLayout::Bhsd),
        ];
    }
    let mut cases = Vec::new();
    for layers in [16, 28] {
        for batch in [1, 4] {
            for nv in VISUAL_TOKENS {
                for layout in KvLayout::ALL {
                    cases.push(ck::Case::new(layers, batch, nv, layout));
                }
            }
        }
    }
    cases
}

/// The K and V planes of one input set, sources and destinations.
struct KvSet {
    k_src: Vec<CudaSlice<bf16>>,
    v_src: Vec<CudaSlice<bf16>>,
    k_dst: Vec<CudaSlice<bf16>>,
    v_dst: Vec<CudaSlice<bf16>>,
}

fn src_views<'a>(
    planes: &'a [CudaSlice<bf16>],
    layout: Layout<4>,
) -> Res<Vec<DevView<'a, bf16, 4>>> {
    Ok(planes
        .iter()
        .map(|p| DevView::of(p, layout))
        .collect::<Result<_, _>>()?)
}

fn dst_views<'a>(
    planes: &'a mut [CudaSlice<bf16>],
    layout: Layout<4>,
) -> Res<Vec<DevViewMut<'a, bf16, 4>>> {
    Ok(planes
        .iter_mut()
        .map(|p| DevViewMut::of(p, layout))
        .collect::<Result<_, _>>()?)
}

/// The op: every layer's K and V in one compact_kv call.
fn compact_one_call(
    stream: &Arc<CudaStream>,
    plan: &ck::Plan,
    keep: &DeviceKeepPositions,
    set: &mut KvSet,
) -> Res<()> {
    let (ks, vs) = (
        src_views(&set.k_src, plan.src_layout)?,
        src_views(&set.v_src, plan.src_layout)?,
    );
    let mut kd = dst_views(&mut set.k_dst, plan.dst_layout)?;
    let mut vd = dst_views(&mut set.v_dst, plan.dst_layout)?;
    compact_cuda::compact_kv(stream, &ks, &vs, keep, plan.padding, &mut kd, &mut vd)?;
    Ok(())
}

/// The name of the per-layer baseline of `plan`.
fn per_layer_name(plan: &ck::Plan) -> String {
    match plan.src_rows_layout() {
        Some(_) => format!("per-layer gather_rows ({} launches)", 2 * plan.layers),
        None => format!("per-layer compact_kv ({} launches)", plan.layers),
    }
}

/// The baseline: one gather_rows per layer's K and per V (2L launches); for
/// the [B, H, S, D] order, which has no [B, S, W] row view, one two-plane
/// compact_kv per layer (L launches).
fn compact_per_layer(
    stream: &Arc<CudaStream>,
    plan: &ck::Plan,
    keep: &DeviceKeepPositions,
    set: &mut KvSet,
) -> Res<()> {
    match (plan.src_rows_layout(), plan.dst_rows_layout()) {
        (Some(src3), Some(dst3)) => {
            for l in 0..plan.layers {
                for (src, dst) in [
                    (&set.k_src[l], &mut set.k_dst[l]),
                    (&set.v_src[l], &mut set.v_dst[l]),
                ] {
                    let s = DevView::of(src, src3)?;
                    let mut d = DevViewMut::of(dst, dst3)?;
                    compact_cuda::gather_rows(
                        stream,
                        &[s],
                        keep,
                        plan.padding,
                        std::slice::from_mut(&mut d),
                    )?;
                }
            }
        }
        _ => {
            for l in 0..plan.layers {
                let ks = DevView::of(&set.k_src[l], plan.src_layout)?;
                let vs = DevView::of(&set.v_src[l], plan.src_layout)?;
                let mut kd = DevViewMut::of(&mut set.k_dst[l], plan.dst_layout)?;
                let mut vd = DevViewMut::of(&mut set.v_dst[l], plan.dst_layout)?;
                compact_cuda::compact_kv(
                    stream,
                    &[ks],
                    &[vs],
                    keep,
                    plan.padding,
                    std::slice::from_mut(&mut kd),
                    std::slice::from_mut(&mut vd),
                )?;
            }
        }
    }
    Ok(())
}

/// Checks set 0's first K and last V destination planes, written by `f`
/// after poisoning, against the CPU reference on the downloaded sources.
fn compact_check(
    stream: &Arc<CudaStream>,
    plan: &ck::Plan,
    set: &mut KvSet,
    want: &[Vec<u16>; 2],
    f: impl FnOnce(&mut KvSet) -> Res<()>,
) -> Res<bool> {
    let last = plan.layers - 1;
    let nan = vec![bf16::NAN; plan.dst_len()];
    stream.memcpy_htod(&nan, &mut set.k_dst[0])?;
    stream.memcpy_htod(&nan, &mut set.v_dst[last])?;
    f(set)?;
    let bits = |v: Vec<bf16>| v.into_iter().map(bf16::to_bits).collect::<Vec<_>>();
    let got = [
        bits(stream.clone_dtoh(&set.k_dst[0])?),
        bits(stream.clone_dtoh(&set.v_dst[last])?),
    ];
    Ok(&got == want)
}

fn compact_case(env: &mut Env, case: &ck::Case) -> Res<Row> {
    let plan = ck::plan(case);
    let stream = env.stream.clone();
    let (src_len, dst_len) = (plan.src_len(), plan.dst_len());
    let sets = env.n_sets((plan.planes() * (src_len + dst_len) * 2) as u64)?;
    let mut data: Vec<KvSet> = Vec::with_capacity(sets);
    for _ in 0..sets {
        let mut src = || {
            (0..plan.layers)
                .map(|_| env.pool.filled(&stream, src_len))
                .collect::<Res<Vec<_>>>()
        };
        let (k_src, v_src) = (src()?, src()?);
        let dst = || {
            (0..plan.layers)
                .map(|_| stream.alloc_zeros::<bf16>(dst_len))
                .collect::<Result<Vec<_>, _>>()
        };
        data.push(KvSet {
            k_src,
            v_src,
            k_dst: dst()?,
            v_dst: dst()?,
        });
    }
    let keep = DeviceKeepPositions::from_host(&stream, &plan.keep)?;

    let check = if env.check {
        // The CPU reference on set 0's first K and last V planes.
        let last = plan.layers - 1;
        let (kh, vh) = (
            stream.clone_dtoh(&data[0].k_src[0])?,
            stream.clone_dtoh(&data[0].v_src[last])?,
        );
        let (mut kw, mut vw) = (vec![bf16::ZERO; dst_len], vec![bf16::ZERO; dst_len]);
        {
            let mut kd = ViewMut::new(&mut kw, plan.dst_layout)?;
            let mut vd = ViewMut::new(&mut vw, plan.dst_layout)?;
            compact_cpu::compact_kv(
                &[View::new(&kh, plan.src_layout)?],
                &[View::new(&vh, plan.src_layout)?],
                &plan.keep,
                plan.padding,
                std::slice::from_mut(&mut kd),
                std::slice::from_mut(&mut vd),
            )?;
        }
        let want = [
            kw.iter().map(|x| x.to_bits()).collect(),
            vw.iter().map(|x| x.to_bits()).collect(),
        ];
        let one = compact_check(&stream, &plan, &mut data[0], &want, |s| {
            compact_one_call(&stream, &plan, &keep, s)
        })?;
        let base = compact_check(&stream, &plan, &mut data[0], &want, |s| {
            compact_per_layer(&stream, &plan, &keep, s)
        })?;
        match (one, base) {
            (true, true) => format!("ok (exact, {sets} sets)"),
            (false, _) => "FAIL (compact_kv differs from the CPU reference)".to_string(),
            (true, false) => "FAIL (the baseline differs from the CPU reference)".to_string(),
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env
        .timer
        .gpu(|i| compact_one_call(&stream, &plan, &keep, &mut data[i % sets]))?;
    let op_eager = env
        .timer
        .eager(|i| compact_one_call(&stream, &plan, &keep, &mut data[i % sets]))?;
    let eager = env
        .timer
        .eager(|i| compact_per_layer(&stream, &plan, &keep, &mut data[i % sets]))?;
    // The same loop replayed from a graph per input set: its GPU time alone.
    let graphs: Res<Vec<CudaGraph>> = data
        .iter_mut()
        .map(|set| capture(&stream, || compact_per_layer(&stream, &plan, &keep, set)))
        .collect();
    let graph_us = match graphs {
        Ok(graphs) => Some(env.timer.gpu(|i| Ok(graphs[i % sets].launch()?))?.median_us),
        Err(e) => {
            eprintln!(
                "compact_kv {}: graph capture of the baseline failed: {e}",
                case.label()
            );
            None
        }
    };
    Ok(Row {
        op: "compact_kv",
        shape: case.label(),
        stats: Some(stats),
        bytes: plan.floor_bytes(2),
        baseline: Some(Baseline {
            name: per_layer_name(&plan),
            op_eager_us: op_eager.median_us,
            eager_us: eager.median_us,
            graph_us,
        }),
        check,
    })
}

// ---------------------------------------------------------------------------
// window_mean
// ---------------------------------------------------------------------------

fn window_cases(quick: bool) -> Vec<wm::Case> {
    if quick {
        return vec![wm::Case::new(1, 24, 1024), wm::Case::new(4, 48, 4096)];
    }
    let mut cases = Vec::new();
    for grid in wm::GRIDS {
        for channels in wm::CHANNELS {
            for batch in [1, 4] {
                cases.push(wm::Case::new(batch, grid, channels));
            }
        }
    }
    cases.push(wm::Case::new(4, 48, 4096).with_pool(PoolKind::Max));
    cases
}

fn window_launch(
    stream: &Arc<CudaStream>,
    case: &wm::Case,
    x: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
) -> Res<()> {
    let x = DevView::of(x, Layout::contiguous(case.x_shape()))?;
    let mut out = DevViewMut::of(out, Layout::contiguous(case.out_shape()))?;
    wm_cuda::window_mean(stream, &x, case.window, case.pool, &mut out)?;
    Ok(())
}

fn window_case(env: &mut Env, case: &wm::Case) -> Res<Row> {
    let stream = env.stream.clone();
    let (x_len, out_len) = (case.x_len(), case.out_len());
    let sets = env.n_sets(((x_len + out_len) * 2) as u64)?;
    let x: Vec<CudaSlice<bf16>> = (0..sets)
        .map(|_| env.pool.filled(&stream, x_len))
        .collect::<Res<_>>()?;
    let mut out: Vec<CudaSlice<bf16>> = (0..sets)
        .map(|_| stream.alloc_zeros::<bf16>(out_len.max(1)))
        .collect::<Result<_, _>>()?;

    let check = if env.check {
        stream.memcpy_htod(&vec![bf16::NAN; out_len], &mut out[0])?;
        window_launch(&stream, case, &x[0], &mut out[0])?;
        let got = stream.clone_dtoh(&out[0])?;
        let xh = stream.clone_dtoh(&x[0])?;
        let mut want = vec![bf16::ZERO; out_len];
        wm_cpu::window_mean(
            View::contiguous(&xh, case.x_shape())?,
            case.window,
            case.pool,
            &mut ViewMut::contiguous(&mut want, case.out_shape())?,
        )?;
        let same = got
            .iter()
            .zip(&want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        if same {
            format!("ok (exact, {sets} sets)")
        } else {
            "FAIL (differs from the CPU reference)".to_string()
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env.timer.gpu(|i| {
        let s = i % sets;
        window_launch(&stream, case, &x[s], &mut out[s])
    })?;
    Ok(Row {
        op: "window_mean",
        shape: case.label(),
        stats: Some(stats),
        bytes: case.floor_bytes(2),
        baseline: None,
        check,
    })
}

// ---------------------------------------------------------------------------
// multiscale_gather
// ---------------------------------------------------------------------------

fn multiscale_cases(quick: bool) -> Vec<mg::Case> {
    if quick {
        return vec![
            mg::Case::new(1, 24, 1024, Branches::Three),
            mg::Case::new(4, 48, 4096, Branches::Seven),
        ];
    }
    let mut cases = Vec::new();
    for grid in wm::GRIDS {
        for channels in wm::CHANNELS {
            for branches in Branches::ALL {
                for batch in [1, 4] {
                    cases.push(mg::Case::new(batch, grid, channels, branches));
                }
            }
        }
    }
    cases.push(mg::Case::new(4, 48, 4096, Branches::Three).with_prob(true));
    cases
}

/// One input set of multiscale_gather: the map and logits, the outputs.
struct GatherSet {
    x: CudaSlice<bf16>,
    z: CudaSlice<f32>,
    tokens: CudaSlice<bf16>,
    positions: CudaSlice<i32>,
    count: CudaSlice<i32>,
}

fn multiscale_launch(
    stream: &Arc<CudaStream>,
    case: &mg::Case,
    scales: &foveal::ScaleSet,
    set: &mut GatherSet,
    ws: &mut Workspace,
) -> Res<()> {
    let (b, n_out) = (case.batch, case.n_out());
    let x = DevView::of(&set.x, Layout::contiguous(case.x_shape()))?;
    let z = DevView::of(&set.z, Layout::contiguous(case.z_shape()))?;
    let mut t = DevViewMut::of(&mut set.tokens, Layout::contiguous(case.tokens_shape()))?;
    let mut p = DevViewMut::of(&mut set.positions, Layout::contiguous([b, n_out]))?;
    let mut c = DevViewMut::of(&mut set.count, Layout::contiguous([b]))?;
    msg_cuda::multiscale_gather(
        stream,
        &x,
        &z,
        case.window,
        scales,
        case.scale_by_prob,
        &mut t,
        &mut p,
        &mut c,
        ws,
    )?;
    Ok(())
}

fn multiscale_case(env: &mut Env, case: &mg::Case) -> Res<Row> {
    let stream = env.stream.clone();
    let scales = case.branches.set();
    let (b, n_out) = (case.batch, case.n_out());
    let (x_len, z_len, t_len) = (case.x_len(), case.z_len(), case.tokens_len());
    let sets = env.n_sets(((x_len + t_len) * 2 + z_len * 4 + b * n_out * 4) as u64)?;
    let mut data: Vec<GatherSet> = Vec::with_capacity(sets);
    for s in 0..sets {
        let z = mg::selector_logits(&mut rng(case.seed + s as u64), z_len);
        data.push(GatherSet {
            x: env.pool.filled(&stream, x_len)?,
            z: stream.clone_htod(&z)?,
            tokens: stream.alloc_zeros::<bf16>(t_len.max(1))?,
            positions: stream.alloc_zeros::<i32>((b * n_out).max(1))?,
            count: stream.alloc_zeros::<i32>(b)?,
        });
    }
    let mut ws = Workspace::new();

    let check = if env.check {
        let set = &mut data[0];
        stream.memcpy_htod(&vec![bf16::NAN; t_len], &mut set.tokens)?;
        stream.memcpy_htod(&vec![i32::MIN; b * n_out], &mut set.positions)?;
        stream.memcpy_htod(&vec![i32::MIN; b], &mut set.count)?;
        multiscale_launch(&stream, case, &scales, set, &mut ws)?;
        let (got_t, got_p, got_c) = (
            stream.clone_dtoh(&set.tokens)?,
            stream.clone_dtoh(&set.positions)?,
            stream.clone_dtoh(&set.count)?,
        );
        let (xh, zh) = (stream.clone_dtoh(&set.x)?, stream.clone_dtoh(&set.z)?);
        let (mut want_t, mut want_p, mut want_c) = (
            vec![bf16::ZERO; t_len],
            vec![0i32; b * n_out],
            vec![0i32; b],
        );
        msg_cpu::multiscale_gather(
            View::contiguous(&xh, case.x_shape())?,
            View::contiguous(&zh, case.z_shape())?,
            case.window,
            &scales,
            case.scale_by_prob,
            &mut ViewMut::contiguous(&mut want_t, case.tokens_shape())?,
            &mut ViewMut::contiguous(&mut want_p, [b, n_out])?,
            &mut ViewMut::contiguous(&mut want_c, [b])?,
        )?;
        let kept: i64 = want_c.iter().map(|&c| c as i64).sum();
        let index_ok = got_p == want_p && got_c == want_c;
        // Without the probability the tokens are maxima of the inputs: exact.
        // With it, expf against the host's exp can move a bf16 rounding.
        let (tokens_ok, how) = if case.scale_by_prob {
            let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
            let err = rel_err(&f(&got_t), &f(&want_t));
            (err <= 1e-3, format!("rel err {err:.0e}"))
        } else {
            (
                got_t
                    .iter()
                    .zip(&want_t)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "exact".to_string(),
            )
        };
        match (index_ok, tokens_ok) {
            (true, true) => format!("ok ({how}, {kept} tokens, {sets} sets)"),
            (false, _) => "FAIL (positions or counts differ from the CPU reference)".to_string(),
            (true, false) => format!("FAIL (tokens differ from the CPU reference: {how})"),
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env
        .timer
        .gpu(|i| multiscale_launch(&stream, case, &scales, &mut data[i % sets], &mut ws))?;
    Ok(Row {
        op: "multiscale_gather",
        shape: case.label(),
        stats: Some(stats),
        bytes: case.floor_bytes(2),
        baseline: None,
        check,
    })
}

// ---------------------------------------------------------------------------
// text_guided_select
// ---------------------------------------------------------------------------

fn text_cases(quick: bool) -> Vec<tg::Case> {
    if quick {
        return vec![
            tg::Case::new(1, 2880, KvLayout::Bshd),
            tg::Case::new(4, 2880, KvLayout::Bhsd),
        ];
    }
    let mut cases = Vec::new();
    for nv in tg::VISUAL {
        for batch in [1, 4] {
            for layout in KvLayout::ALL {
                cases.push(tg::Case::new(batch, nv, layout));
            }
        }
    }
    cases.push(tg::Case::new(1, 2880, KvLayout::Bshd).with_text(256));
    cases
}

/// One input set of text_guided_select: q, k and the outputs.
struct SelectSet {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    keep: CudaSlice<i32>,
    count: CudaSlice<i32>,
}

fn text_launch(
    stream: &Arc<CudaStream>,
    case: &tg::Case,
    lengths: &DeviceLengths,
    set: &mut SelectSet,
    scores: Option<&mut CudaSlice<f32>>,
    ws: &mut Workspace,
) -> Res<()> {
    let (b, n) = (case.batch, case.visual);
    let q = DevView::of(&set.q, case.q_layout())?;
    let k = DevView::of(&set.k, case.k_layout())?;
    let mut keep = DevViewMut::of(&mut set.keep, Layout::contiguous([b, n]))?;
    let mut count = DevViewMut::of(&mut set.count, Layout::contiguous([b]))?;
    let mut scores = scores
        .map(|s| DevViewMut::of(s, Layout::contiguous([b, n])))
        .transpose()?;
    tgs_cuda::text_guided_select(
        stream,
        &q,
        &k,
        lengths,
        case.gamma,
        &mut keep,
        &mut count,
        scores.as_mut(),
        ws,
    )?;
    Ok(())
}

fn text_case(env: &mut Env, case: &tg::Case) -> Res<Row> {
    let stream = env.stream.clone();
    let (b, n) = (case.batch, case.visual);
    let (q_len, k_len) = (case.q_layout().span(), case.k_layout().span());
    let sets = env.n_sets(((q_len + k_len) * 2 + b * n * 4) as u64)?;
    // The structured inputs of the generator (attention concentrates as in a
    // real model), one seed per set.
    let mut data: Vec<SelectSet> = Vec::with_capacity(sets);
    for s in 0..sets {
        let (q, k) = tg::attention_inputs::<bf16>(&mut rng(case.seed + s as u64), case);
        data.push(SelectSet {
            q: stream.clone_htod(&q)?,
            k: stream.clone_htod(&k)?,
            keep: stream.alloc_zeros::<i32>((b * n).max(1))?,
            count: stream.alloc_zeros::<i32>(b)?,
        });
    }
    let host_lengths = case.lengths();
    let lengths = DeviceLengths::new(&stream, &host_lengths)?;
    let mut ws = Workspace::new();

    let check = if env.check {
        // With the scores output: S against the CPU reference's, the kept set
        // exactly the rule on the GPU's own S; then without it (the timed
        // form): the same kept set.
        let set = &mut data[0];
        let mut scores = stream.clone_htod(&vec![f32::NAN; b * n])?;
        stream.memcpy_htod(&vec![i32::MIN; b * n], &mut set.keep)?;
        stream.memcpy_htod(&vec![i32::MIN; b], &mut set.count)?;
        text_launch(&stream, case, &lengths, set, Some(&mut scores), &mut ws)?;
        let (got_s, got_k, got_c) = (
            stream.clone_dtoh(&scores)?,
            stream.clone_dtoh(&set.keep)?,
            stream.clone_dtoh(&set.count)?,
        );
        stream.memcpy_htod(&vec![i32::MIN; b * n], &mut set.keep)?;
        stream.memcpy_htod(&vec![i32::MIN; b], &mut set.count)?;
        text_launch(&stream, case, &lengths, set, None, &mut ws)?;
        let (own_k, own_c) = (
            stream.clone_dtoh(&set.keep)?,
            stream.clone_dtoh(&set.count)?,
        );

        let (qh, kh) = (stream.clone_dtoh(&set.q)?, stream.clone_dtoh(&set.k)?);
        let (mut want_k, mut want_c, mut want_s) =
            (vec![0i32; b * n], vec![0i32; b], vec![0f32; b * n]);
        tgs_cpu::text_guided_select(
            View::new(&qh, case.q_layout())?,
            View::new(&kh, case.k_layout())?,
            &host_lengths,
            case.gamma,
            &mut ViewMut::contiguous(&mut want_k, [b, n])?,
            &mut ViewMut::contiguous(&mut want_c, [b])?,
            Some(&mut ViewMut::contiguous(&mut want_s, [b, n])?),
        )?;
        let err = rel_err(&got_s, &want_s);
        let mut rule_k = vec![-1i32; b * n];
        let mut rule_c = vec![0i32; b];
        for row in 0..b {
            let kept = select_from_scores(&got_s[row * n..][..n], case.gamma);
            rule_c[row] = kept.len() as i32;
            for (slot, &i) in rule_k[row * n..].iter_mut().zip(&kept) {
                *slot = i as i32;
            }
        }
        let kept: i64 = got_c.iter().map(|&c| c as i64).sum();
        let share = 100.0 * kept as f64 / (b * n) as f64;
        if err > 1e-4 {
            format!("FAIL (S rel err {err:.1e})")
        } else if got_k != rule_k || got_c != rule_c {
            "FAIL (the kept set is not the rule on the GPU's S)".to_string()
        } else if own_k != got_k || own_c != got_c {
            "FAIL (without the scores output the kept set differs)".to_string()
        } else {
            format!("ok (S rel err {err:.0e}, kept {share:.0}%, {sets} sets)")
        }
    } else {
        format!("unchecked ({sets} sets)")
    };

    let stats = env
        .timer
        .gpu(|i| text_launch(&stream, case, &lengths, &mut data[i % sets], None, &mut ws))?;
    Ok(Row {
        op: "text_guided_select",
        shape: case.label(),
        stats: Some(stats),
        bytes: case.floor_bytes(2),
        baseline: None,
        check,
    })
}
