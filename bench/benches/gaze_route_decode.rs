//! CPU gaze_route_decode: the fused reference against route_topk then
//! gaze_decode called separately (the same work: the CPU reference is their
//! composition, so this measures the call overhead only; the fusion pays on
//! the GPU, see `gpu_bench --only gaze_route_decode`).
//!
//! `cargo bench -p foveal-bench --bench gaze_route_decode`. Throughput is the
//! plan's floor (q, o and the KV entries read).

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::gaze_decode::cpu::gaze_decode;
use foveal::gaze_route_decode::cpu::gaze_route_decode;
use foveal::route_topk::cpu::route_topk;
use foveal::{Routes, View, ViewMut};
use foveal_bench::gaze_decode::Case;
use foveal_bench::gaze_route_decode::{generate, FusedInput};
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

fn fused(f: &FusedInput<bf16>, o: &mut [bf16], routes: &mut Routes) {
    let plan = &f.input.plan;
    let mut view = ViewMut::contiguous(o, plan.o_shape()).unwrap();
    gaze_route_decode(
        f.input.q_view(),
        f.input.k_view(),
        f.input.v_view(),
        f.desc_view(),
        &plan.layout,
        f.top_k,
        None,
        &mut view,
        None,
        routes,
    )
    .unwrap();
}

fn separate(f: &FusedInput<bf16>, o: &mut [bf16], routes: &mut Routes) {
    let plan = &f.input.plan;
    let q4 = View::new(&f.input.q, f.q4_layout()).unwrap();
    route_topk(q4, f.desc_view(), &plan.layout, f.top_k, routes).unwrap();
    let mut view = ViewMut::contiguous(o, plan.o_shape()).unwrap();
    gaze_decode(
        f.input.q_view(),
        f.input.k_view(),
        f.input.v_view(),
        &plan.layout,
        routes,
        None,
        &mut view,
        None,
    )
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("gaze_route_decode");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let f = generate::<bf16>(&case);
        let plan = &f.input.plan;
        let label = case.label();
        let mut o = vec![bf16::ZERO; plan.q_layout.numel()];
        let mut routes = Routes::new(&plan.layout, 1, plan.dims.q_heads, f.top_k);
        group.throughput(Throughput::Bytes(plan.floor_bytes(2)));
        group.bench_function(BenchmarkId::new("fused_cpu", &label), |b| {
            b.iter(|| fused(&f, &mut o, &mut routes))
        });
        group.bench_function(
            BenchmarkId::new("route_topk+gaze_decode_cpu", &label),
            |b| b.iter(|| separate(&f, &mut o, &mut routes)),
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
