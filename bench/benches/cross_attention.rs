//! CPU cross_attention: foveal's reference (per KV head the keys and values
//! widened once, f32 dot products, f64 softmax sums; S never materialised)
//! against the naive framework computation (repeat_kv, S = Q K^T
//! materialised, softmax, P V).
//!
//! `cargo bench -p foveal-bench --bench cross_attention`. Throughput is the
//! op's FLOPs (`foveal_bench::cross_attention::Case::flops`), the same for
//! both: on the CPU the op is compute-bound at every shape of the sweep but
//! decode.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use foveal::cross_attention::cpu;
use foveal::ViewMut;
use foveal_bench::cross_attention::{baseline, generate, Case, ONEVISION_05B};
use foveal_bench::{criterion_measuring, KvLayout, ModelDims, QWEN25_VL_7B};
use half::bf16;

fn cases() -> Vec<Case> {
    if criterion_measuring() {
        vec![
            Case::new(ONEVISION_05B, 1, 16, 729),
            Case::new(ONEVISION_05B, 1, 64, 2916),
            Case::new(QWEN25_VL_7B, 1, 1, 7290),
            Case::new(QWEN25_VL_7B, 1, 16, 2916).with_layout(KvLayout::Bhsd),
        ]
    } else {
        let tiny = ModelDims {
            layers: 1,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        vec![
            Case::new(tiny, 1, 3, 40),
            Case::new(tiny, 2, 1, 33).with_layout(KvLayout::Bhsd),
        ]
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cross_attention");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases() {
        let input = generate::<bf16>(&case);
        let label = case.label();
        let shape = case.q_layout().shape();
        let mut o = vec![bf16::ZERO; case.q_layout().numel()];
        group.throughput(Throughput::Elements(case.flops()));
        group.bench_function(BenchmarkId::new("foveal_cpu", &label), |b| {
            b.iter(|| {
                let mut view = ViewMut::contiguous(&mut o, shape).unwrap();
                cpu::cross_attention(
                    input.q_view(),
                    input.k_view(),
                    input.v_view(),
                    &input.lens,
                    None,
                    &mut view,
                    None,
                )
                .unwrap();
            })
        });
        group.bench_function(BenchmarkId::new("naive_unfused", &label), |b| {
            b.iter(|| baseline(&input, &mut o))
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
