//! CPU route_topk: foveal's reference (scores of the group's descriptors read
//! in place, one sort per list) against the framework way (descriptors
//! repeated per query head, scores, a full stable argsort, the first k, a
//! sort).
//!
//! `cargo bench -p foveal-bench --bench route_topk`. Throughput is the op's
//! floor (`foveal_bench::route_topk::floor_bytes`: q and the descriptors
//! read, the routes written), the same for both.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::route_topk::cpu;
use foveal::Routes;
use foveal_bench::criterion_measuring;
use foveal_bench::route_topk::{baseline, floor_bytes, generate, Case};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(1, 1024),
            Case::new(1, 16384),
            Case::new(4, 16384),
            Case::new(1, 4096).with_queries(64),
        ]
    } else {
        vec![Case::new(1, 1024), Case::new(2, 2048).with_queries(2)]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_topk");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let heads = case.dims.q_heads;
        let mut routes = Routes::new(&input.layout, case.queries, heads, case.k);
        group.throughput(Throughput::Bytes(floor_bytes(
            &case,
            input.layout.max_regions(),
            2,
        )));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |bn| {
            bn.iter(|| {
                cpu::route_topk(
                    input.q_view(),
                    input.desc_view(),
                    &input.layout,
                    case.k,
                    &mut routes,
                )
                .unwrap()
            })
        });
        group.bench_function(BenchmarkId::new("naive_repeat_argsort", &label), |bn| {
            bn.iter(|| baseline(input.q_view(), input.desc_view(), &input.layout, case.k))
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
