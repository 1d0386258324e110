//! CPU glance_fusion: foveal's reference (the mean instruction vector first,
//! then one pass over Vq: S x (N + M) x dt multiply-adds) against the
//! literal formula (S x N x M dot products into logits, mean, softmax,
//! weighted sum: S x N x M x dt multiply-adds).
//!
//! `cargo bench -p foveal-bench --bench glance_fusion`. Throughput is the
//! op's floor (Vq and E read, out written;
//! `foveal_bench::glance_fusion::floor_bytes`), the same for both.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use foveal::glance_fusion::cpu;
use foveal::ViewMut;
use foveal_bench::criterion_measuring;
use foveal_bench::glance_fusion::{baseline, generate, Case};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        // LLaVA-1.5-7B: 4 layers, 576 tokens, dt 4,096; short and longer instructions
        vec![Case::new(1, 1, 16), Case::new(1, 1, 64)]
    } else {
        vec![
            Case::new(1, 1, 4).with_dim(32),
            Case::new(2, 1, 3).with_dim(24),
        ]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("glance_fusion");
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let mut out = vec![bf16::ZERO; case.out_shape().iter().product()];
        group.throughput(Throughput::Bytes(case.floor_bytes(2, false)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                let mut view = ViewMut::contiguous(&mut out, case.out_shape()).unwrap();
                cpu::glance_fusion(
                    input.vq_view(),
                    input.e_view(),
                    &input.lengths,
                    &mut view,
                    None,
                )
                .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("literal_formula", &label), |b| {
            b.iter(|| baseline(input.vq_view(), input.e_view(), &input.lengths, &mut out))
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
