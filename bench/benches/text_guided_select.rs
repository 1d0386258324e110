//! CPU text_guided_select: foveal's reference (per text token, the running
//! max over heads of the log-probabilities; A never stored) against the
//! unfused framework computation (A `[Hq, T, N]` materialised, softmax, max
//! over heads, mean over text, full argsort, cumsum, sort of the kept).
//!
//! `cargo bench -p foveal-bench --bench text_guided_select`. Throughput is
//! the op's floor (q and k read, the kept indices and counts written;
//! `foveal_bench::text_guided_select::floor_bytes`), the same for both, so
//! the GB/s are effective figures: on the CPU the op is compute-bound
//! (`T * Hq * N * D` multiply-adds).

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::text_guided_select::cpu;
use foveal::ViewMut;
use foveal_bench::text_guided_select::{baseline, generate, Case};
use foveal_bench::{criterion_measuring, KvLayout};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 576, KvLayout::Bshd),
            Case::new(1, 2880, KvLayout::Bshd),
            Case::new(1, 2880, KvLayout::Bhsd),
        ]
    } else {
        vec![
            Case::new(1, 64, KvLayout::Bshd).with_text(4),
            Case::new(2, 48, KvLayout::Bhsd).with_text(3),
        ]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("text_guided_select");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let (b, n) = (case.batch, case.visual);
        let mut keep = vec![0i32; b * n];
        let mut count = vec![0i32; b];
        group.throughput(Throughput::Bytes(case.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |bn| {
            bn.iter(|| {
                let mut k = ViewMut::contiguous(&mut keep, [b, n]).unwrap();
                let mut c = ViewMut::contiguous(&mut count, [b]).unwrap();
                cpu::text_guided_select(
                    input.q_view(),
                    input.k_view(),
                    &input.lengths,
                    case.gamma,
                    &mut k,
                    &mut c,
                    None,
                )
                .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_unfused", &label), |bn| {
            bn.iter(|| baseline(input.q_view(), input.k_view(), &input.lengths, case.gamma))
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
