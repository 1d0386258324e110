//! CPU token_pack: foveal's reference (each resized pixel computed once per
//! channel row and written at its packed slot) against the framework
//! computation (the resized map materialised, then the space-to-depth copy).
//!
//! `cargo bench -p foveal-bench --bench token_pack`. Throughput is the op's
//! floor (x read, out written; `foveal_bench::token_pack::Case::floor_bytes`),
//! the same for both.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use foveal::token_pack::cpu;
use foveal::ViewMut;
use foveal_bench::criterion_measuring;
use foveal_bench::token_pack::{baseline, generate, Case};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![Case::new(1, 2.0), Case::new(10, 2.0), Case::new(10, 3.0)]
    } else {
        let mut small = Case::new(2, 2.0);
        small.channels = 8;
        let mut odd = Case::new(1, 3.0);
        odd.channels = 5;
        vec![small, odd]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("token_pack");
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let shape = case.out_shape();
        let mut out = vec![bf16::ZERO; shape.iter().product()];
        group.throughput(Throughput::Bytes(case.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                let mut view = ViewMut::contiguous(&mut out, shape).unwrap();
                cpu::token_pack(input.x_view(), case.rho, &mut view).unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_resize_then_pack", &label), |b| {
            b.iter(|| baseline(&input, &mut out))
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
