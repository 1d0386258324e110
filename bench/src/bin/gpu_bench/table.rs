//! The results: one [`Row`] per comparison, printed as it comes and written
//! as markdown or CSV (see the column docs on [`COLUMNS`]).

use std::error::Error;
use std::path::Path;

use crate::ceilings;
use crate::timing::Stats;
use crate::torch::TorchTime;

/// A baseline timed beside the op (compact_kv's per-layer loop,
/// text_guided_select's unfused candle ops, dense decode attention...), and
/// the op timed the same ways.
pub struct Baseline {
    pub name: String,
    /// The baseline's GPU time: gated, or replayed from a CUDA graph
    /// (compact_kv's loop); `None` when it could not be measured.
    pub gpu_us: Option<f64>,
    /// The op issued eagerly (no gate: host launch overhead included).
    pub op_eager_us: f64,
    /// The baseline issued eagerly.
    pub eager_us: f64,
}

pub struct Row {
    /// The section's name (filled in by the harness).
    pub op: &'static str,
    /// The case's label (filled in by the harness).
    pub shape: String,
    /// The op's GPU time (gated); `None` when the case failed.
    pub stats: Option<Stats>,
    /// The op's floor: the bytes it must read plus write.
    pub bytes: u64,
    /// The op's floating-point operations, for a compute-bound row (else 0).
    pub flops: u64,
    pub baseline: Option<Baseline>,
    /// The check's verdict (filled in by the harness).
    pub check: String,
    /// The fastest PyTorch backend on the same case (filled in by the harness).
    pub torch: Option<TorchTime>,
}

impl Row {
    /// A timed row; the harness fills in the op, shape, check and torch cells.
    pub fn new(stats: Stats, bytes: u64) -> Self {
        Row {
            op: "",
            shape: String::new(),
            stats: Some(stats),
            bytes,
            flops: 0,
            baseline: None,
            check: String::new(),
            torch: None,
        }
    }

    pub fn with_flops(mut self, flops: u64) -> Self {
        self.flops = flops;
        self
    }

    pub fn with_baseline(mut self, baseline: Baseline) -> Self {
        self.baseline = Some(baseline);
        self
    }

    /// A case that could not be prepared, checked or timed.
    pub fn failed(e: &dyn Error) -> Self {
        Row {
            stats: None,
            bytes: 0,
            check: format!("ERROR: {e}"),
            ..Row::new(Stats::default(), 0)
        }
    }

    pub fn gbps(&self) -> Option<f64> {
        self.stats
            .filter(|_| self.bytes > 0)
            .map(|s| self.bytes as f64 / (s.median_us * 1e-6) / 1e9)
    }

    pub fn tflops(&self) -> Option<f64> {
        self.stats
            .filter(|_| self.flops > 0)
            .map(|s| self.flops as f64 / (s.median_us * 1e-6) / 1e12)
    }

    /// The cells of the table, in [`COLUMNS`] order (the torch columns only
    /// with `torch`).
    fn cells(&self, ceilings: &Ceilings, torch: bool) -> Vec<String> {
        let f = |x: Option<f64>, prec: usize| x.map_or(String::new(), |v| format!("{v:.prec$}"));
        let ratio = |num: Option<f64>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) => format!("{:.2}x", n / d),
            _ => String::new(),
        };
        let share = |x: Option<f64>, of: Option<f64>| match (x, of) {
            (Some(x), Some(of)) => format!("{:.1}%", 100.0 * x / of),
            _ => String::new(),
        };
        let median = self.stats.map(|s| s.median_us);
        let b = self.baseline.as_ref();
        let op_eager = b.map(|b| b.op_eager_us);
        let mut cells = vec![
            self.op.to_string(),
            self.shape.clone(),
            f(median, 1),
            f(self.stats.map(|s| s.min_us), 1),
            if self.bytes > 0 {
                self.bytes.to_string()
            } else {
                String::new()
            },
            f(self.gbps(), 1),
            share(self.gbps(), ceilings.copy_gbps),
            f(self.tflops(), 1),
            share(self.tflops(), ceilings.matmul_tflops),
            b.map_or(String::new(), |b| b.name.clone()),
            f(b.and_then(|b| b.gpu_us), 1),
            ratio(b.and_then(|b| b.gpu_us), median),
            f(op_eager, 1),
            f(b.map(|b| b.eager_us), 1),
            ratio(b.map(|b| b.eager_us), op_eager),
        ];
        if torch {
            let t = self.torch.as_ref();
            cells.push(t.map_or(String::new(), |t| t.backend.clone()));
            cells.push(f(t.map(|t| t.us), 1));
            cells.push(ratio(t.map(|t| t.us), median));
        }
        cells.push(self.check.clone());
        cells
    }
}

/// A column: its name, its width in the terminal, whether left-aligned.
type Column = (&'static str, usize, bool);

/// - `median_us`, `min_us`: the op's GPU time; `GB/s` and `of_copy`
///   (fraction of the copy bandwidth), `TFLOP/s` and `of_matmul` (fraction of
///   the bf16 matrix rate) from the median.
/// - `baseline`, `base_us`, `speedup`: the baseline's GPU time (gated, or a
///   CUDA graph replay for compact_kv's loop) and the op's speedup over it.
/// - `eager_us`, `base_eager_us`, `speedup_eager`: the op and the baseline
///   issued as eager calls back to back (host launch overhead included).
/// - With `--torch`, [`TORCH_COLUMNS`] before `check`.
/// - `check`: the comparison with the CPU reference and the input sets.
const COLUMNS: [Column; 15] = [
    ("op", 18, true),
    ("shape", 34, true),
    ("median_us", 9, false),
    ("min_us", 9, false),
    ("bytes", 11, false),
    ("GB/s", 7, false),
    ("of_copy", 7, false),
    ("TFLOP/s", 7, false),
    ("of_matmul", 9, false),
    ("baseline", 34, true),
    ("base_us", 8, false),
    ("speedup", 7, false),
    ("eager_us", 8, false),
    ("base_eager_us", 13, false),
    ("speedup_eager", 13, false),
];

/// `torch`: the fastest PyTorch backend on the same case, `torch_us` its GPU
/// time, `vs_torch` = torch_us / median_us (above 1: foveal is faster).
const TORCH_COLUMNS: [Column; 3] = [
    ("torch", 22, true),
    ("torch_us", 9, false),
    ("vs_torch", 8, false),
];

/// The measured ceilings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ceilings {
    pub copy_gbps: Option<f64>,
    pub matmul_tflops: Option<f64>,
}

impl Ceilings {
    /// Takes the ceiling a row of section `name` measured, if any.
    pub fn update(&mut self, name: &str, rows: &[Row]) {
        let Some(row) = rows.first() else { return };
        match name {
            ceilings::COPY => self.copy_gbps = row.gbps(),
            ceilings::MATMUL => self.matmul_tflops = row.tflops(),
            _ => {}
        }
    }
}

/// The rows so far, the device line and the ceilings.
pub struct Table {
    device: String,
    pub ceilings: Ceilings,
    torch: bool,
    rows: Vec<Row>,
}

impl Table {
    pub fn new(device: String, torch: bool) -> Self {
        Table {
            device,
            ceilings: Ceilings::default(),
            torch,
            rows: Vec::new(),
        }
    }

    fn columns(&self) -> Vec<Column> {
        let torch = if self.torch { &TORCH_COLUMNS[..] } else { &[] };
        COLUMNS
            .iter()
            .chain(torch)
            .chain([&("check", 0, true)])
            .copied()
            .collect()
    }

    /// The device and the ceilings.
    fn header(&self) -> String {
        let f = |x: Option<f64>| x.map_or("not measured".to_string(), |v| format!("{v:.1}"));
        format!(
            "{}; device-to-device copy: {} GB/s; bf16 matmul: {} TFLOP/s",
            self.device,
            f(self.ceilings.copy_gbps),
            f(self.ceilings.matmul_tflops)
        )
    }

    fn print_line(&self, cells: &[String]) {
        let mut line = String::new();
        for ((_, width, left), cell) in self.columns().iter().zip(cells) {
            if *left {
                line += &format!("{cell:<width$} ");
            } else {
                line += &format!("{cell:>width$} ");
            }
        }
        println!("{}", line.trim_end());
    }

    fn print_header(&self) {
        let names: Vec<String> = self.columns().iter().map(|c| c.0.to_string()).collect();
        self.print_line(&names);
    }

    /// Prints `rows` (after the column names, the first time) and keeps them.
    pub fn push(&mut self, rows: Vec<Row>) {
        if self.rows.is_empty() {
            println!();
            self.print_header();
        }
        for row in rows {
            self.print_line(&row.cells(&self.ceilings, self.torch));
            self.rows.push(row);
        }
    }

    /// The whole table again, with the ceilings in its header line.
    pub fn print_all(&self) {
        println!("\n{}", self.header());
        self.print_header();
        for row in &self.rows {
            self.print_line(&row.cells(&self.ceilings, self.torch));
        }
    }

    /// Rows that failed or did not match the CPU reference.
    pub fn failed(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.stats.is_none() || r.check.starts_with("FAIL"))
            .count()
    }

    /// The table as markdown (`.md`) or CSV.
    pub fn render(&self, path: &Path) -> String {
        let names: Vec<&str> = self.columns().iter().map(|c| c.0).collect();
        let rows = self
            .rows
            .iter()
            .map(|r| r.cells(&self.ceilings, self.torch));
        if path.extension().is_some_and(|e| e == "md") {
            let mut s = format!(
                "{}\n\n| {} |\n|{}\n",
                self.header(),
                names.join(" | "),
                "---|".repeat(names.len())
            );
            for cells in rows {
                s += &format!("| {} |\n", cells.join(" | ").replace('\n', " "));
            }
            s
        } else {
            let quote = |c: &str| {
                if c.contains([',', '"', '\n']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c.to_string()
                }
            };
            let mut s = names.join(",") + "\n";
            for cells in rows {
                s += &(cells.iter().map(|c| quote(c)).collect::<Vec<_>>().join(",") + "\n");
            }
            s
        }
    }
}
