//! CPU gaze_decode: the reference over the visible keys and the routed
//! regions against dense decode attention over the same cache (the same
//! reference with every position visible and no region,
//! `foveal_bench::gaze_decode::Plan::dense`).
//!
//! `cargo bench -p foveal-bench --bench gaze_decode`. Throughput is each
//! plan's own floor (q, o and the KV entries it reads), so GB/s compares how
//! fast each streams what it reads; the time ratio is the saving.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::gaze_decode::cpu;
use foveal::ViewMut;
use foveal_bench::gaze_decode::{generate, Case, Input, Plan};
use foveal_bench::{criterion_measuring, KvLayout};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 1024, 10, KvLayout::Bshd),
            Case::new(1, 4096, 10, KvLayout::Bshd),
            Case::new(1, 4096, 50, KvLayout::Bhsd),
        ]
    } else {
        vec![
            Case::new(1, 64, 10, KvLayout::Bshd),
            Case::new(2, 64, 50, KvLayout::Bhsd),
        ]
    }
}

fn run(input: &Input<bf16>, plan: &Plan, o: &mut [bf16]) {
    let mut view = ViewMut::contiguous(o, plan.o_shape()).unwrap();
    cpu::gaze_decode(
        input.q_view(),
        input.k_view(),
        input.v_view(),
        &plan.layout,
        &plan.routes,
        None,
        &mut view,
        None,
    )
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("gaze_decode");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let dense = input.plan.dense();
        let label = case.label();
        let mut o = vec![bf16::ZERO; input.plan.q_layout.numel()];
        group.throughput(Throughput::Bytes(input.plan.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| run(&input, &input.plan, &mut o))
        });
        group.throughput(Throughput::Bytes(dense.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("dense_cpu", &label), |b| {
            b.iter(|| run(&input, &dense, &mut o))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
