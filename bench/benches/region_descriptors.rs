//! CPU region_descriptors: foveal's reference (per region and KV head, the
//! keys summed in place in f32) against the framework way (each region's keys
//! gathered to a new f32 tensor, then its mean).
//!
//! `cargo bench -p foveal-bench --bench region_descriptors`. Throughput is the
//! op's floor (`foveal_bench::region_descriptors::floor_bytes`: the region
//! tokens' keys and positions read, the descriptors written), the same for
//! both.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::region_descriptors::cpu;
use foveal::ViewMut;
use foveal_bench::region_descriptors::{baseline, floor_bytes, generate, Case};
use foveal_bench::{criterion_measuring, KvLayout};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 1024, KvLayout::Bshd),
            Case::new(1, 16384, KvLayout::Bshd),
            Case::new(1, 16384, KvLayout::Bhsd),
        ]
    } else {
        vec![
            Case::new(1, 1024, KvLayout::Bshd),
            Case::new(2, 1024, KvLayout::Bhsd),
        ]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("region_descriptors");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let shape = input.desc_shape();
        let mut desc = vec![0f32; shape.iter().product()];
        group.throughput(Throughput::Bytes(floor_bytes(&case, shape[2], 2)));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |bn| {
            bn.iter(|| {
                let mut d = ViewMut::contiguous(&mut desc, shape).unwrap();
                cpu::region_descriptors(input.k_view(), &input.layout, 0..shape[2], &mut d)
                    .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_gather_mean", &label), |bn| {
            bn.iter(|| baseline(input.k_view(), &input.layout))
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
