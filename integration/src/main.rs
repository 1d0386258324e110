//! The main job: every method end to end on the built-in small model.
//!
//! Today: the GlimpsePrune kernel pipeline on a synthetic batch, CPU by
//! default; with the feature `cuda` and a GPU present, on the GPU too, checked
//! against the CPU run.

use std::time::Instant;

use foveal_candle::glimpse_pipeline::{keep_rule, run_cpu, Batch, Config, Outcome};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> foveal::Result<()> {
    let batch = Batch::new(Config::default())?;
    let rule = keep_rule();
    let cfg = &batch.cfg;
    println!(
        "foveal main job: GlimpsePrune kernels on a synthetic batch ({} rows, {} layers up to K, {} query / {} KV heads, head dim {}, bf16 KV)",
        batch.batch(),
        cfg.layers + 1,
        cfg.q_heads,
        cfg.kv_heads,
        cfg.head_dim
    );
    let t = Instant::now();
    let cpu = run_cpu(&batch, &rule)?;
    report("CPU", &batch, &cpu, t.elapsed().as_secs_f64());

    #[cfg(feature = "cuda")]
    match foveal_candle::glimpse_pipeline::cuda::stream() {
        None => println!("\nGPU: none found; the CPU run above is the result."),
        Some(stream) => {
            let t = Instant::now();
            let gpu = foveal_candle::glimpse_pipeline::cuda::run(&stream, &batch, &rule)?;
            report("GPU", &batch, &gpu, t.elapsed().as_secs_f64());
            let max_diff = cpu.scores.iter().zip(&gpu.scores).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let same = cpu.keep == gpu.keep && cpu.positions == gpu.positions && cpu.k == gpu.k && cpu.v == gpu.v
                && cpu.hidden == gpu.hidden && cpu.position_ids == gpu.position_ids;
            println!("GPU vs CPU: max |score difference| {max_diff:.2e}; kept sets and compacted caches identical: {same}");
            if !same || max_diff > 1e-3 {
                return Err(foveal::Error::Cuda { op: "main", msg: "the GPU run disagrees with the CPU reference".into() });
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!("\n(built without the feature `cuda`: CPU only; see the README to build the GPU path)");
    Ok(())
}

fn report(backend: &str, batch: &Batch, out: &Outcome, secs: f64) {
    println!("\n{backend} ({:.1} ms)", secs * 1e3);
    println!("{:>4} {:>8} {:>7} {:>6} {:>14} {:>10} {:>9}", "row", "valid", "visual", "kept", "salient kept", "KV before", "KV after");
    let layers = batch.cfg.layers + 1;
    for b in 0..batch.batch() {
        let kept: Vec<usize> = out.keep.kept(b).iter().map(|&i| batch.rows.visual(b)[i as usize] as usize).collect();
        let salient = &batch.salient[b];
        let hit = salient.iter().filter(|p| kept.binary_search(p).is_ok()).count();
        println!(
            "{:>4} {:>8} {:>7} {:>6} {:>8}/{:<5} {:>10} {:>9}",
            b,
            batch.rows.len(b),
            batch.rows.nv(b),
            kept.len(),
            hit,
            salient.len(),
            batch.rows.len(b) * layers,
            out.positions.row(b).len() * layers
        );
    }
}
