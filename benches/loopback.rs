//! Criterion benches of the in-process parts: loopback put, signal, and put+signal+wait.

// criterion's group macro defines a public function it cannot document.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use xccl::transport::loopback::Loopback;
use xccl::transport::{Cmp, SignalOp, Transport};

fn put_and_signal(c: &mut Criterion) {
    let ranks = Loopback::create(2).expect("fabric");
    let sizes = [8usize, 4096, 1 << 20];
    // Both ranks register (collective), then rank 0 drives the benchmark alone.
    let wins: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .iter()
            .map(|t| s.spawn(move || t.register(1 << 20).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (t, win) = (&ranks[0], wins[0]);
    let src = vec![1u8; 1 << 20];
    let mut g = c.benchmark_group("loopback_put");
    for size in sizes {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| t.put(1, &win, 0, &src[..size]).unwrap())
        });
    }
    g.finish();
    c.bench_function("loopback_signal_add", |b| {
        b.iter(|| t.signal(1, 0, SignalOp::Add, 1).unwrap())
    });
    c.bench_function("loopback_put_signal_wait_self", |b| {
        let mut expect = t.signal_value(1).unwrap();
        b.iter(|| {
            expect += 1;
            t.put_signal(0, &win, 0, &src[..64], 1, SignalOp::Add, 1)
                .unwrap();
            t.wait(1, Cmp::Ge, expect, Instant::now() + Duration::from_secs(5))
                .unwrap()
        })
    });
}

criterion_group!(benches, put_and_signal);
criterion_main!(benches);
