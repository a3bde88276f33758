//! A checked workload over one communicator: send/recv around a ring, all-to-all-v with
//! counts that vary (zero now and then), and both MoE modes, every result checked against what
//! every rank can compute for itself. Iteration `it` runs one of the four.

use xccl::coll::Coll;
use xccl::moe::{LowLatencyBuffer, MoeBuffer};
use xccl::p2p::P2p;

pub const EXPERTS: usize = 12;
pub const HIDDEN: usize = 64;
pub const TOPK: usize = 3;
pub const MAX_TOKENS: usize = 48;

/// A hash of `seed`: the same number on every rank for the same seed.
pub fn mix(seed: u64) -> u64 {
    use rand::{RngCore, SeedableRng};
    rand::rngs::SmallRng::seed_from_u64(seed).next_u64()
}

/// The bytes rank `from` sends rank `to` in iteration `it`.
fn payload(it: u64, from: usize, to: usize, len: usize) -> Vec<u8> {
    let s = mix(it ^ (from as u64) << 40 ^ (to as u64) << 48);
    (0..len)
        .map(|k| (s >> (k % 8 * 8)) as u8 ^ k as u8)
        .collect()
}

/// How many bytes rank `from` sends rank `to` in iteration `it` (zero now and then).
fn count(it: u64, from: usize, to: usize) -> usize {
    match mix(it * 131 + from as u64 * 7 + to as u64) % 8 {
        0 => 0,
        k => (mix(it + k) % (256 << 10)) as usize + 1,
    }
}

/// Rank `me`'s MoE input in iteration `it`: rows, expert choices (some -1) and weights.
fn moe_input(it: u64, me: usize) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let seed = mix(it * 1_000_003 + me as u64);
    let tokens = (seed % (MAX_TOKENS as u64 + 1)) as usize;
    let x: Vec<f32> = (0..tokens * HIDDEN)
        .map(|k| (mix(seed ^ k as u64) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut idx = Vec::with_capacity(tokens * TOPK);
    let mut w = Vec::with_capacity(tokens * TOPK);
    for t in 0..tokens {
        let first = mix(seed + t as u64) as usize % EXPERTS;
        for j in 0..TOPK {
            let skip = mix(seed ^ (t * TOPK + j) as u64) % 10 == 0;
            idx.push(if skip {
                -1
            } else {
                ((first + j) % EXPERTS) as i64
            });
            w.push(0.25 * (j + 1) as f32);
        }
    }
    (x, idx, w)
}

/// Expert e scales its input by c(e).
fn c(e: usize) -> f32 {
    (e % 3 + 1) as f32
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Checks a combine's output against sum over the chosen experts of w · c_e · x.
fn check_combined(it: u64, mode: &str, x: &[f32], idx: &[i64], w: &[f32], out: &[u8]) -> usize {
    let got = f32s(out);
    for t in 0..idx.len() / TOPK {
        for j in 0..HIDDEN {
            let v = x[t * HIDDEN + j];
            let want: f32 = (0..TOPK)
                .filter(|&q| idx[t * TOPK + q] >= 0)
                .map(|q| w[t * TOPK + q] * c(idx[t * TOPK + q] as usize) * v)
                .sum();
            let g = got[t * HIDDEN + j];
            assert!(
                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "iteration {it} {mode}: token {t} element {j}: {g} vs {want}"
            );
        }
    }
    out.len()
}

pub fn send_recv(it: u64, p2p: &P2p, me: usize, n: usize) -> u64 {
    let (to, from) = ((me + 1) % n, (me + n - 1) % n);
    let len = count(it, me, to).max(1) * 4;
    let data = payload(it, me, to, len);
    let want = payload(it, from, me, count(it, from, me).max(1) * 4);
    let mut buf = vec![0u8; want.len()];
    let got = p2p.sendrecv(to, it, &data, from, it, &mut buf).unwrap();
    assert_eq!(got, want.len(), "iteration {it}: send/recv length");
    assert!(
        buf == want,
        "iteration {it}: send/recv bytes from rank {from}"
    );
    want.len() as u64
}

pub fn all_to_all_v(it: u64, coll: &Coll, me: usize, n: usize) -> u64 {
    let scounts: Vec<usize> = (0..n).map(|j| count(it, me, j)).collect();
    let rcounts: Vec<usize> = (0..n).map(|j| count(it, j, me)).collect();
    let displs = |c: &[usize]| -> Vec<usize> {
        c.iter()
            .scan(0, |at, &k| {
                let d = *at;
                *at += k;
                Some(d)
            })
            .collect()
    };
    let (sd, rd) = (displs(&scounts), displs(&rcounts));
    let send: Vec<u8> = (0..n)
        .flat_map(|j| payload(it, me, j, scounts[j]))
        .collect();
    let mut recv = vec![0u8; rcounts.iter().sum()];
    coll.alltoallv_bytes(&send, &scounts, &sd, &mut recv, &rcounts, &rd)
        .unwrap();
    for j in 0..n {
        let block = &recv[rd[j]..rd[j] + rcounts[j]];
        assert!(
            block == payload(it, j, me, rcounts[j]),
            "iteration {it}: block from {j}"
        );
    }
    recv.len() as u64
}

pub fn normal_moe(it: u64, buf: &mut MoeBuffer, me: usize) -> u64 {
    let (x, idx, w) = moe_input(it, me);
    let xb = f32_bytes(&x);
    let view = buf.dispatch(&xb, &idx, &w).unwrap();
    let rows = view.rows().unwrap();
    let mut reduced = Vec::with_capacity(rows.len() * HIDDEN * 4);
    for row in &rows {
        let y: Vec<f32> = f32s(row.data)
            .iter()
            .map(|&v| row.experts.iter().map(|&(e, w)| w * c(e) * v).sum())
            .collect();
        reduced.extend(f32_bytes(&y));
    }
    let received = reduced.len() as u64;
    drop(rows);
    let mut out = vec![0u8; xb.len()];
    buf.combine(&reduced, &mut out).unwrap();
    received + check_combined(it, "normal", &x, &idx, &w, &out) as u64
}

pub fn low_latency_moe(it: u64, buf: &mut LowLatencyBuffer, me: usize) -> u64 {
    let (x, idx, w) = moe_input(it, me);
    let xb = f32_bytes(&x);
    let view = buf.dispatch(&xb, &idx, &w).unwrap();
    let outputs = super::low_latency::weighted_sums(&view, |e, v| c(e) * v);
    let received = outputs.len() as u64;
    let _ = view;
    let mut out = vec![0u8; xb.len()];
    buf.combine(&outputs, &mut out).unwrap();
    received + check_combined(it, "low-latency", &x, &idx, &w, &out) as u64
}

/// Everything one rank of the workload uses: point-to-point, collectives and both MoE
/// buffers, on one communicator.
pub struct Workload<'c> {
    pub p2p: P2p<'c>,
    pub coll: Coll<'c>,
    pub normal: MoeBuffer<'c>,
    pub low: LowLatencyBuffer<'c>,
}

impl<'c> Workload<'c> {
    /// The objects, sized for the workload's MoE shape.
    pub fn new(comm: &'c xccl::Communicator) -> Self {
        use xccl::moe::{Dtype, MoeConfig};
        let cfg = MoeConfig::new(EXPERTS, HIDDEN, TOPK, MAX_TOKENS, Dtype::F32);
        Workload {
            p2p: P2p::new(comm, xccl::p2p::P2pConfig::default()).unwrap(),
            coll: Coll::new(comm).unwrap(),
            normal: MoeBuffer::new(comm, cfg.clone()).unwrap(),
            low: LowLatencyBuffer::new(comm, cfg).unwrap(),
        }
    }

    /// Iteration `it` (one of the four operations, by turns), checked; the bytes checked.
    pub fn step(&mut self, it: u64, me: usize, n: usize) -> u64 {
        match it % 4 {
            0 => send_recv(it, &self.p2p, me, n),
            1 => all_to_all_v(it, &self.coll, me, n),
            2 => normal_moe(it, &mut self.normal, me),
            _ => low_latency_moe(it, &mut self.low, me),
        }
    }
}
