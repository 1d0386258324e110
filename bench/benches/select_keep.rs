//! CPU select_keep: foveal's reference against the framework computation
//! (sigmoid materialised, a full stable argsort of each row, a sort of the
//! kept indices).
//!
//! `cargo bench -p foveal-bench --bench select_keep`. Throughput is the op's
//! floor (the valid logits read, the padded indices and counts written;
//! `foveal_bench::select_keep::floor_bytes`).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use foveal::select_keep::cpu;
use foveal::{KeepRule, KeepSet};
use foveal_bench::criterion_measuring;
use foveal_bench::select_keep::{baseline, generate, Case};

fn cases() -> Vec<Case> {
    let capped = KeepRule {
        threshold: 0.5,
        max_ratio: Some(0.25),
        min_keep: 1,
    };
    if criterion_measuring() {
        vec![
            Case::new(1, 1024),
            Case::new(1, 16384),
            Case::new(8, 4096),
            Case::new(8, 16384).with_rule(capped),
        ]
    } else {
        vec![Case::new(1, 256), Case::new(3, 256).with_rule(capped)]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("select_keep");
    for case in cases() {
        let input = generate(&case);
        let label = case.label();
        let mut keep = KeepSet::new(&input.rows);
        group.throughput(Throughput::Bytes(input.floor_bytes()));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                cpu::select_keep(input.logits_view(), &input.rows, &input.rule, &mut keep).unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("full_sort", &label), |b| {
            b.iter(|| baseline(input.logits_view(), &input.rows, &input.rule))
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
