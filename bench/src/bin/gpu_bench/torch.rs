//! The PyTorch baselines' two files (bench/torch_baselines.py's docs).
//!
//! `--list-cases` prints the cases that have a PyTorch baseline, so that the
//! shapes have one source of truth (needs no GPU):
//!
//! ```text
//! {"mode": "quick", "warmup": 2, "runs": 20,
//!  "cases": [{"key": "gaze_decode/B1 Nv16384 10% bshd", "op": "gaze_decode",
//!             "baseline": "sdpa_decode", "params": {"batch": 1, ...}}, ...]}
//! ```
//!
//! `--torch FILE` reads what the script measured, the GPU time of each
//! backend per case key (`null`: the backend refused the case):
//!
//! ```text
//! {"torch": "2.11.0", "device": "NVIDIA H200",
//!  "cases": {"gaze_decode/B1 Nv16384 10% bshd": {"sdpa_flash": 41.2, "sdpa_cudnn": null}, ...}}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::{Args, Res};

/// A case's PyTorch baseline: which of the script's baselines, and the shape
/// parameters it needs.
pub struct TorchCase {
    baseline: &'static str,
    params: Value,
}

impl TorchCase {
    pub fn new(baseline: &'static str, params: Value) -> Self {
        TorchCase { baseline, params }
    }
}

/// Prints the case list (module docs) of the sections `args` selects.
pub fn list_cases(args: &Args) -> Res<()> {
    let mut keys = BTreeSet::new();
    let mut cases = Vec::new();
    for section in args.sections() {
        for case in (section.cases)(args.mode) {
            let key = format!("{}/{}", section.name, case.label());
            if !keys.insert(key.clone()) {
                return Err(format!("two cases have the key `{key}`").into());
            }
            if let Some(t) = case.torch() {
                cases.push(json!({
                    "key": key,
                    "op": section.name,
                    "baseline": t.baseline,
                    "params": t.params,
                }));
            }
        }
    }
    // One case a line (a compact_kv case carries every kept position).
    let lines: Vec<String> = cases.iter().map(Value::to_string).collect();
    println!(
        "{{\"mode\": \"{}\", \"warmup\": {}, \"runs\": {}, \"cases\": [\n{}\n]}}",
        args.mode_name(),
        args.warmup(),
        args.runs(),
        lines.join(",\n")
    );
    Ok(())
}

/// The fastest backend of a case.
#[derive(Debug, Clone)]
pub struct TorchTime {
    pub backend: String,
    pub us: f64,
}

/// The times of a baseline file (module docs).
pub struct TorchTimes {
    about: String,
    /// Per case key, each backend's median GPU time (`None`: refused).
    cases: BTreeMap<String, BTreeMap<String, Option<f64>>>,
}

impl TorchTimes {
    pub fn read(path: &Path) -> Res<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the PyTorch baselines {}: {e}", path.display()))?;
        let bad = |why: &str| format!("{}: {why}", path.display());
        let root: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let name = |field: &str| {
            root.get(field)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        let about = format!(
            "PyTorch baselines: torch {} on {} ({})",
            name("torch"),
            name("device"),
            path.display()
        );
        let mut cases = BTreeMap::new();
        let list = root
            .get("cases")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `cases` object"))?;
        for (key, backends) in list {
            let backends = backends
                .as_object()
                .ok_or_else(|| bad(&format!("case `{key}`: not an object of backends")))?;
            let mut times = BTreeMap::new();
            for (backend, us) in backends {
                let us = match us {
                    Value::Null => None,
                    v => Some(v.as_f64().filter(|us| *us > 0.0).ok_or_else(|| {
                        bad(&format!(
                            "case `{key}`, backend `{backend}`: {v} is not a time in us"
                        ))
                    })?),
                };
                times.insert(backend.clone(), us);
            }
            cases.insert(key.clone(), times);
        }
        Ok(TorchTimes { about, cases })
    }

    pub fn describe(&self) -> &str {
        &self.about
    }

    /// The fastest backend of case `key`, if any ran it.
    pub fn best(&self, key: &str) -> Option<TorchTime> {
        self.cases
            .get(key)?
            .iter()
            .filter_map(|(b, us)| {
                us.map(|us| TorchTime {
                    backend: b.clone(),
                    us,
                })
            })
            .min_by(|a, b| a.us.total_cmp(&b.us))
    }

    /// Warns about cases of this run with a baseline that the file lacks, or
    /// where every backend refused, and about the file's cases no case of
    /// this run has (a file made from another mode or `--only`).
    pub fn warn_unmatched(&self, expected: &[String]) {
        for key in expected {
            match self.cases.get(key) {
                None => eprintln!("gpu_bench: warning: the PyTorch baselines lack case `{key}`"),
                Some(_) if self.best(key).is_none() => {
                    eprintln!("gpu_bench: warning: every PyTorch backend refused case `{key}`")
                }
                Some(_) => {}
            }
        }
        for key in self.cases.keys().filter(|k| !expected.contains(k)) {
            eprintln!("gpu_bench: warning: the PyTorch baselines' case `{key}` is not in this run");
        }
    }
}
