//! CPU glimpse_scores: foveal's reference (one pass per head over the row's
//! keys) against the unfused framework computation (repeat_kv, q.k for every
//! cache slot, masked softmax, index_select, transpose).
//!
//! `cargo bench -p foveal-bench --bench glimpse_scores`. Throughput is the
//! op's floor (q, the keys, the output; `foveal_bench::glimpse_scores::floor_bytes`),
//! the same for both, so the baseline's GB/s is an effective figure.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::glimpse_scores::cpu;
use foveal::ViewMut;
use foveal_bench::glimpse_scores::{baseline, generate, Case};
use foveal_bench::{criterion_measuring, KvLayout};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 1024, KvLayout::Bshd),
            Case::new(1, 1024, KvLayout::Bhsd),
            Case::new(1, 4096, KvLayout::Bshd),
        ]
    } else {
        vec![
            Case::new(1, 64, KvLayout::Bshd),
            Case::new(2, 64, KvLayout::Bhsd),
        ]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("glimpse_scores");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let plan = &input.plan;
        let label = case.label();
        let mut out = vec![0f32; plan.out_len()];
        group.throughput(Throughput::Bytes(plan.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                let mut view = ViewMut::contiguous(&mut out, plan.out_shape()).unwrap();
                cpu::glimpse_scores(
                    input.q_view(),
                    input.k_view(),
                    &plan.rows,
                    None,
                    plan.mode,
                    &mut view,
                )
                .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_unfused", &label), |b| {
            b.iter(|| {
                baseline(
                    input.q_view(),
                    input.k_view(),
                    &plan.rows,
                    None,
                    plan.mode,
                    &mut out,
                )
            })
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
