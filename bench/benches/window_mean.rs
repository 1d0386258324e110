//! CPU window_mean: foveal's reference (per window, all channels at once in
//! a contiguous row) against the naive framework computation (a contiguous
//! copy, then a loop per window and per channel over the window's cells).
//!
//! `cargo bench -p foveal-bench --bench window_mean`. Throughput is the op's
//! floor (the map read, the window means written;
//! `foveal_bench::window_mean::floor_bytes`), the same for both.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use foveal::window_mean::cpu;
use foveal::ViewMut;
use foveal_bench::criterion_measuring;
use foveal_bench::window_mean::{baseline, generate, Case};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 24, 1024),
            Case::new(1, 48, 1024),
            Case::new(1, 48, 4096),
        ]
    } else {
        vec![Case::new(1, 8, 64), Case::new(2, 10, 32)]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("window_mean");
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let mut out = vec![bf16::ZERO; case.out_len()];
        group.throughput(Throughput::Bytes(case.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                let mut view = ViewMut::contiguous(&mut out, case.out_shape()).unwrap();
                cpu::window_mean(input.x_view(), case.window, case.pool, &mut view).unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_per_window", &label), |b| {
            b.iter(|| baseline(input.x_view(), case.window, case.pool, &mut out))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
