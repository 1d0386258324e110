//! CPU multiscale_gather: foveal's reference (each window pooled once, at its
//! chosen scale, straight into its output slots) against the framework
//! computation (every window pooled at every scale, softmax, argmax, then a
//! copy of the chosen scale's tokens per window).
//!
//! `cargo bench -p foveal-bench --bench multiscale_gather`. Throughput is the
//! op's floor (the map and logits read, the whole outputs written;
//! `foveal_bench::multiscale_gather::floor_bytes`), the same for both.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::multiscale_gather::cpu;
use foveal::ViewMut;
use foveal_bench::criterion_measuring;
use foveal_bench::multiscale_gather::{baseline, generate, Branches, Case};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 24, 1024, Branches::Three),
            Case::new(1, 48, 1024, Branches::Three),
            Case::new(1, 48, 1024, Branches::Seven),
            Case::new(1, 48, 4096, Branches::Seven),
        ]
    } else {
        vec![
            Case::new(1, 8, 32, Branches::Three),
            Case::new(2, 8, 16, Branches::Seven).with_prob(true),
        ]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("multiscale_gather");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let scales = case.branches.set();
        let (n_out, b) = (case.n_out(), case.batch);
        let mut tokens = vec![bf16::ZERO; case.tokens_len()];
        let mut positions = vec![0i32; b * n_out];
        let mut count = vec![0i32; b];
        group.throughput(Throughput::Bytes(case.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |bn| {
            bn.iter(|| {
                let mut t = ViewMut::contiguous(&mut tokens, case.tokens_shape()).unwrap();
                let mut p = ViewMut::contiguous(&mut positions, [b, n_out]).unwrap();
                let mut c = ViewMut::contiguous(&mut count, [b]).unwrap();
                cpu::multiscale_gather(
                    input.x_view(),
                    input.z_view(),
                    case.window,
                    &scales,
                    case.scale_by_prob,
                    &mut t,
                    &mut p,
                    &mut c,
                )
                .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("pool_every_scale", &label), |bn| {
            bn.iter(|| {
                baseline(
                    input.x_view(),
                    input.z_view(),
                    case.window,
                    &scales,
                    case.scale_by_prob,
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
