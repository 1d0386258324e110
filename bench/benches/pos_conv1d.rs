//! CPU pos_conv1d: foveal's reference (per token, the row's taps over all
//! channels in place) against the framework computation (transpose to
//! channels-first, a padded convolution per channel, transpose back, the
//! residual).
//!
//! `cargo bench -p foveal-bench --bench pos_conv1d`. Throughput is the op's
//! floor (x read, out written; `foveal_bench::pos_conv1d::Case::floor_bytes`),
//! the same for both.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use foveal::pos_conv1d::cpu;
use foveal::ViewMut;
use foveal_bench::criterion_measuring;
use foveal_bench::pos_conv1d::{baseline, generate, Case};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 729, 896),
            Case::new(1, 7290, 896),
            Case::new(1, 2916, 3584),
        ]
    } else {
        vec![Case::new(1, 20, 16), Case::new(2, 5, 8)]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("pos_conv1d");
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let mut out = vec![bf16::ZERO; case.shape().iter().product()];
        group.throughput(Throughput::Bytes(case.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                let mut view = ViewMut::contiguous(&mut out, case.shape()).unwrap();
                cpu::pos_conv1d(
                    input.x_view(),
                    &input.lens,
                    input.weight_view(),
                    input.bias_view(),
                    &mut view,
                )
                .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_channels_first", &label), |b| {
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
