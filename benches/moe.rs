//! Criterion benches of the in-process MoE parts: dispatch layout and the combine reduction
//! (bf16 rows summed in f32 and rounded back).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xccl::moe::{dispatch_layout, Dtype};

fn layout(c: &mut Criterion) {
    let (tokens, k, experts, ranks) = (4096usize, 8usize, 64usize, 8usize);
    let idx: Vec<i64> = (0..tokens * k)
        .map(|i| ((i / k) * 13 + (i % k) * 7) as i64 % experts as i64)
        .collect();
    let placement: Vec<usize> = (0..experts).map(|e| e / (experts / ranks)).collect();
    c.bench_function("dispatch_layout_4096x8_of_64_on_8", |b| {
        b.iter(|| dispatch_layout(&idx, k, &placement, ranks).unwrap())
    });
}

fn reduction(c: &mut Criterion) {
    let hidden = 7168;
    let mut row = vec![0u8; hidden * 2];
    let vals: Vec<f32> = (0..hidden).map(|i| i as f32 * 0.01).collect();
    Dtype::Bf16.store_row(&mut row, &vals);
    let mut acc = vec![0f32; hidden];
    let mut g = c.benchmark_group("combine_reduction_bf16_7168");
    g.throughput(Throughput::Bytes((hidden * 2) as u64));
    g.bench_function("accumulate", |b| {
        b.iter(|| Dtype::Bf16.accumulate(&mut acc, &row))
    });
    g.bench_function("store_row", |b| {
        b.iter(|| Dtype::Bf16.store_row(&mut row, &vals))
    });
    g.finish();
}

criterion_group!(benches, layout, reduction);
criterion_main!(benches);
