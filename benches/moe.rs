//! Criterion benches of the in-process MoE parts: dispatch layout, the combine sum (bf16 rows
//! summed in f32 and rounded back) and INT8 scale/quantize/dequantize of a row.

// criterion's group macro defines a public function it cannot document.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use xccl::moe::{dispatch_layout, quant, sum_rows, Dtype};

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
    let vals: Vec<f32> = (0..hidden).map(|i| i as f32 * 0.01).collect();
    let mut row = vec![0u8; hidden * 2];
    Dtype::Bf16.store_row(&mut row, &vals);
    let rows: Vec<Vec<u8>> = (0..8).map(|_| row.clone()).collect();
    let refs: Vec<&[u8]> = rows.iter().map(|r| r.as_slice()).collect();
    let weights = [0.125f32; 8];
    let mut out = vec![0u8; hidden * 2];
    let mut g = c.benchmark_group("combine_sum_bf16_7168");
    g.throughput(Throughput::Bytes((hidden * 2) as u64));
    // Normal mode on 2 ranks: two rows per token, unweighted.
    g.bench_function("2_rows", |b| {
        b.iter(|| sum_rows(Dtype::Bf16, &mut out, &refs[..2], None))
    });
    // Low-latency mode, top-8: eight rows per token, weighted.
    g.bench_function("8_rows_weighted", |b| {
        b.iter(|| sum_rows(Dtype::Bf16, &mut out, &refs, Some(&weights)))
    });
    g.finish();
}

fn int8(c: &mut Criterion) {
    let hidden = 7168;
    let vals: Vec<f32> = (0..hidden).map(|i| (i % 97) as f32 * 0.03 - 1.4).collect();
    let mut row = vec![0u8; hidden * 2];
    Dtype::Bf16.store_row(&mut row, &vals);
    let scale = quant::row_scale(Dtype::Bf16, &row, hidden).unwrap();
    let mut q = vec![0u8; hidden];
    let mut back = vec![0u8; hidden * 2];
    let mut g = c.benchmark_group("int8_bf16_7168");
    g.throughput(Throughput::Bytes((hidden * 2) as u64));
    g.bench_function("scale", |b| {
        b.iter(|| quant::row_scale(Dtype::Bf16, &row, hidden))
    });
    g.bench_function("quantize", |b| {
        b.iter(|| quant::quantize(Dtype::Bf16, &row, hidden, scale, &mut q))
    });
    g.bench_function("dequantize", |b| {
        b.iter(|| quant::dequantize(Dtype::Bf16, &q, scale, &mut back))
    });
    g.finish();
}

criterion_group!(benches, layout, reduction, int8);
criterion_main!(benches);
