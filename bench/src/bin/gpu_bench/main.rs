//! gpu_bench: CUDA-event timings of foveal's GPU ops at realistic sizes,
//! against the device's copy bandwidth and bf16 matrix rate measured in the
//! same run, and (with `--torch`) against PyTorch baselines of the same cases.
//!
//! ```text
//! cargo run -p foveal-bench --features cuda --release --bin gpu_bench -- [--quick|--full] [--out FILE] [--only OPS] [--runs N] [--no-check] [--torch FILE]
//! gpu_bench --list-cases [--quick|--full] [--only OPS]     # the cases with a PyTorch baseline, as JSON; needs no GPU
//! ```
//!
//! The harness (this file and its modules `env`, `timing`, `table`,
//! `torch`, `ceilings`) and one section per op (a module named after the op,
//! listed in [`SECTIONS`]). A section gives its cases for a [`Mode`]; a
//! [`Case`] is prepared (its input sets filled on the device), checked once
//! against the CPU reference (outputs poisoned first) and timed; the harness
//! does the rest:
//!
//! - Finds device 0; without one it prints a "no GPU" line and exits 0. The
//!   binary loads the driver library, and candle's cuBLAS, cuRAND and NVRTC,
//!   at run time (cudarc's dynamic loading), so `--list-cases` runs anywhere.
//! - Measures the ceilings first ([`ceilings`]): the device-to-device copy
//!   bandwidth (bytes read + written), the ceiling of every GB/s figure, and
//!   the bf16 matrix-product rate (an 8192^3 GEMM through candle's cuBLAS
//!   matmul), the ceiling of every TFLOP/s figure.
//! - For each case: input sets on the device (at least 3, more until together
//!   they hold 4x the L2 size, at most 256), the check, then CUDA-event
//!   timing ([`timing`]): warm-up, then runs back to back, each on the next
//!   input set, so that no run finds its inputs in L2. The stream is held by
//!   a host-function gate while a chunk of runs is enqueued and released
//!   after, so the events time the GPU work alone (not the host's launch
//!   overhead); median and minimum over `--runs` runs (default 50, 20 with
//!   `--quick`). Baselines are timed the same way, and eagerly where the
//!   host's launch overhead is part of the comparison.
//! - Prints one row per comparison ([`table`]) and writes the table to
//!   `--out` (markdown when the name ends in `.md`, CSV otherwise). `bytes` is
//!   the op's floor (what it must read plus write,
//!   `foveal_bench::<op>::floor_bytes`); GB/s is bytes over the median GPU
//!   time, `of_copy` its fraction of the copy bandwidth; a compute-bound row
//!   gives TFLOP/s and `of_matmul`.
//! - `--torch FILE` (written by `bench/torch_baselines.py` from the
//!   `--list-cases` output) adds per row the fastest PyTorch backend's time
//!   and `vs_torch` = torch time / foveal time ([`torch`]).
//!
//! `--quick` takes one to three shapes per op (a smoke test; the GPU suite's
//! first phase); the default (`--full`) is every shape. `--only` takes a
//! comma-separated list of op names; the ceilings always run.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};
use foveal_bench::fmt_bytes;

mod ceilings;
mod env;
mod table;
mod timing;
mod torch;

mod compact_kv;
mod cross_attention;
mod gaze_decode;
mod gaze_route_decode;
mod glance_fusion;
mod glimpse_scores;
mod multiscale_gather;
mod pos_conv1d;
mod region_descriptors;
mod route_topk;
mod select_keep;
mod text_guided_select;
mod token_pack;
mod window_mean;

use env::Env;
use table::{Row, Table};
use torch::{TorchCase, TorchTimes};

type Res<T> = Result<T, Box<dyn Error>>;

/// Every op's section, in the order they run. A new op: its module and one line here.
const SECTIONS: [Section; 14] = [
    glimpse_scores::SECTION,
    select_keep::SECTION,
    compact_kv::SECTION,
    window_mean::SECTION,
    multiscale_gather::SECTION,
    text_guided_select::SECTION,
    region_descriptors::SECTION,
    route_topk::SECTION,
    gaze_decode::SECTION,
    gaze_route_decode::SECTION,
    cross_attention::SECTION,
    pos_conv1d::SECTION,
    token_pack::SECTION,
    glance_fusion::SECTION,
];

// ---------------------------------------------------------------------------
// The interface of a section
// ---------------------------------------------------------------------------

/// Which cases a section gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One to three shapes per op, few runs: a smoke test (`--quick`).
    Quick,
    /// Every shape (the default).
    Full,
}

/// An op's section of the benchmark.
pub struct Section {
    /// The op's name: `--only`'s word, the `op` column, the module's name.
    pub name: &'static str,
    /// The cases of the section in a mode.
    pub cases: fn(Mode) -> Vec<Box<dyn Case>>,
}

/// One case of a section.
pub trait Case {
    /// The `shape` column; `{op}/{label}` is the case's key.
    fn label(&self) -> String;
    /// The PyTorch baseline of the same case, if it has one (`--list-cases`).
    fn torch(&self) -> Option<TorchCase> {
        None
    }
    /// Fills the case's input sets on the device.
    fn prepare<'a>(&'a self, env: &mut Env) -> Res<Box<dyn Bench + 'a>>;
}

/// A prepared case.
pub trait Bench {
    /// The input sets the runs rotate over.
    fn sets(&self) -> usize;
    /// Runs the op (and any baseline that computes the same result) on input
    /// set 0 into poisoned outputs and compares with the CPU reference.
    fn check(&mut self, env: &mut Env) -> Res<Check>;
    /// Times the op and its baselines: one row per comparison (the harness
    /// fills in the op, shape, check and torch cells).
    fn time(&mut self, env: &mut Env) -> Res<Vec<Row>>;
}

/// The cases of a section as the harness takes them.
pub fn boxed<C: Case + 'static>(cases: Vec<C>) -> Vec<Box<dyn Case>> {
    cases
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Case>)
        .collect()
}

/// What a check found: what was compared and how close, or what differed.
pub enum Check {
    Pass(String),
    Fail(String),
}

impl Check {
    /// `Pass(pass)` when `ok`, else `Fail(fail)`.
    pub fn when(ok: bool, pass: impl Into<String>, fail: impl Into<String>) -> Check {
        if ok {
            Check::Pass(pass.into())
        } else {
            Check::Fail(fail.into())
        }
    }
}

/// ||got - want|| / ||want|| in f64; infinite when `got` has a non-finite
/// value where `want` is finite (an unwritten, poisoned element).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
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

/// Whether two slices are equal bit for bit (bf16, f32: NaN payloads too).
pub fn bit_equal<T: Copy, B: PartialEq>(got: &[T], want: &[T], bits: fn(T) -> B) -> bool {
    got.len() == want.len() && got.iter().zip(want).all(|(&g, &w)| bits(g) == bits(w))
}

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

fn usage() -> String {
    let ops: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
    format!(
        "usage: gpu_bench [--quick|--full] [--out FILE(.md|.csv)] [--only OPS] [--runs N] [--no-check] [--torch FILE]
       gpu_bench --list-cases [--quick|--full] [--only OPS]
OPS: a comma-separated list of {}",
        ops.join(",")
    )
}

struct Args {
    mode: Mode,
    out: Option<PathBuf>,
    only: Vec<String>,
    runs: Option<usize>,
    check: bool,
    torch: Option<PathBuf>,
    list_cases: bool,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        mode: Mode::Full,
        out: None,
        only: Vec::new(),
        runs: None,
        check: true,
        torch: None,
        list_cases: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.mode = Mode::Quick,
            "--full" => args.mode = Mode::Full,
            "--no-check" => args.check = false,
            "--list-cases" => args.list_cases = true,
            "--out" => args.out = Some(it.next().ok_or("--out needs a file name")?.into()),
            "--torch" => args.torch = Some(it.next().ok_or("--torch needs a file name")?.into()),
            "--only" => {
                let list = it.next().ok_or("--only needs a list of ops")?;
                for op in list.split(',').filter(|s| !s.is_empty()) {
                    if !SECTIONS.iter().any(|s| s.name == op) {
                        let ops: Vec<_> = SECTIONS.iter().map(|s| s.name).collect();
                        return Err(format!("unknown op `{op}` (ops: {})", ops.join(", ")).into());
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
                println!("{}", usage());
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
    /// The ceilings, then the sections `--only` names (all without it).
    fn sections(&self) -> impl Iterator<Item = &Section> {
        ceilings::SECTIONS.iter().chain(
            SECTIONS
                .iter()
                .filter(|s| self.only.is_empty() || self.only.iter().any(|o| o == s.name)),
        )
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Quick => "quick",
            Mode::Full => "full",
        }
    }

    fn warmup(&self) -> usize {
        match self.mode {
            Mode::Quick => 2,
            Mode::Full => 5,
        }
    }

    fn runs(&self) -> usize {
        self.runs.unwrap_or(match self.mode {
            Mode::Quick => 20,
            Mode::Full => 50,
        })
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
// The run
// ---------------------------------------------------------------------------

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_bench: {e}\n{}", usage());
            std::process::exit(2);
        }
    };
    if args.list_cases {
        if let Err(e) = torch::list_cases(&args) {
            eprintln!("gpu_bench: error: {e}");
            std::process::exit(1);
        }
        return;
    }
    // A bad baseline file fails before anything is measured.
    let torch = match args.torch.as_deref().map(TorchTimes::read).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
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
    if let Err(e) = run(ctx, &args, torch.as_ref()) {
        eprintln!("gpu_bench: error: {e}");
        std::process::exit(1);
    }
}

fn run(ctx: Arc<CudaContext>, args: &Args, torch: Option<&TorchTimes>) -> Res<()> {
    let name = ctx.name()?;
    let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let total = ctx.total_mem()?;
    let mut env = Env::new(ctx, args.warmup(), args.runs())?;
    let device = format!(
        "device: {name}, {sms} SMs, L2 {}, memory {}; {} mode",
        fmt_bytes(env.l2_bytes()),
        fmt_bytes(total as u64),
        args.mode_name(),
    );
    println!("{device}");
    println!(
        "timing: {} warm-up runs, then the median of {} runs over input sets holding 4x the L2 size",
        args.warmup(),
        args.runs()
    );
    if let Some(t) = torch {
        println!("{}", t.describe());
    }

    let mut table = Table::new(device, torch.is_some());
    let mut with_torch = Vec::new();
    for section in args.sections() {
        for case in (section.cases)(args.mode) {
            let key = format!("{}/{}", section.name, case.label());
            if torch.is_some() && case.torch().is_some() {
                with_torch.push(key.clone());
            }
            let mut rows = run_case(&mut env, case.as_ref(), args.check)
                .unwrap_or_else(|e| vec![Row::failed(e.as_ref())]);
            for row in &mut rows {
                row.op = section.name;
                row.shape = case.label();
                row.torch = torch.and_then(|t| t.best(&key));
            }
            table.ceilings.update(section.name, &rows);
            env.ceilings = table.ceilings;
            if section.name == ceilings::COPY && table.ceilings.copy_gbps.is_none() {
                return Err(format!(
                    "the copy bandwidth could not be measured: {}",
                    rows[0].check
                )
                .into());
            }
            table.push(rows);
            if let Some(path) = &args.out {
                std::fs::write(path, table.render(path))?;
            }
        }
    }
    if let Some(t) = torch {
        t.warn_unmatched(&with_torch);
    }

    // The whole table again, last, so that the end of the output carries it.
    table.print_all();
    if let Some(path) = &args.out {
        println!("table written to {}", path.display());
    }
    let failed = table.failed();
    if failed > 0 {
        return Err(format!("{failed} case(s) failed or did not match the CPU reference").into());
    }
    Ok(())
}

/// Prepares, checks (unless `check` is off) and times one case.
fn run_case(env: &mut Env, case: &dyn Case, check: bool) -> Res<Vec<Row>> {
    let mut bench = case.prepare(env)?;
    let sets = bench.sets();
    let check = if check {
        match bench.check(env)? {
            Check::Pass(how) => format!("ok ({how}; {sets} sets)"),
            Check::Fail(what) => format!("FAIL ({what})"),
        }
    } else {
        format!("unchecked ({sets} sets)")
    };
    let mut rows = bench.time(env)?;
    for row in &mut rows {
        row.check = check.clone();
    }
    Ok(rows)
}
