//! CPU compact_kv: one foveal compact_kv call over every layer's K and V
//! against the per-layer loop (one gather_rows call per layer's K and per V:
//! 2L calls, the shape of an index_select loop over the cache).
//!
//! `cargo bench -p foveal-bench --bench compact_kv`. Throughput is the op's
//! floor (kept entries read once, destinations written once;
//! `foveal_bench::compact_kv::floor_bytes`). The caches are `[B, S, Hkv, D]`
//! (the per-plane row gather needs a slot's heads contiguous).

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::compact_kv::cpu;
use foveal_bench::compact_kv::{baseline, dst_views, generate, Case};
use foveal_bench::{criterion_measuring, KvLayout};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(16, 1, 1024, KvLayout::Bshd),
            Case::new(28, 1, 1024, KvLayout::Bshd),
            Case::new(16, 4, 1024, KvLayout::Bshd),
        ]
    } else {
        vec![Case::new(2, 2, 128, KvLayout::Bshd)]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("compact_kv");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let plan = &input.plan;
        let label = case.label();
        let (mut k_dst, mut v_dst) = input.new_dst();
        let (k_src, v_src) = (input.k_views(), input.v_views());
        group.throughput(Throughput::Bytes(plan.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("foveal_cpu_one_call", &label), |b| {
            b.iter(|| {
                let mut kd = dst_views(&mut k_dst, plan.dst_layout);
                let mut vd = dst_views(&mut v_dst, plan.dst_layout);
                cpu::compact_kv(&k_src, &v_src, &plan.keep, plan.padding, &mut kd, &mut vd)
                    .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("per_layer_loop_2L_calls", &label), |b| {
            b.iter(|| baseline(&input.k, &input.v, plan, &mut k_dst, &mut v_dst).unwrap())
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
