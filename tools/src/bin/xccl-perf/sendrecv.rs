//! `xccl-perf sendrecv`: tagged send/recv between rank pairs (0↔1, 2↔3, ...): one-way
//! latency (half the median round trip) and streaming bandwidth (a window of messages, then a
//! one-byte acknowledgement, like osu_bw). A checked exchange after each size counts wrong
//! bytes.

use crate::memcpy_baseline::Memcpy;
use crate::options::ByteArgs;
use crate::report::{self, Row};
use crate::session::{self, Pair, Table};
use crate::tcp_baseline::PlainTcp;
use std::time::{Duration, Instant};
use xccl::p2p::{P2p, P2pConfig};
use xccl::{Error, Result};

const WINDOW: usize = 16;

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k.wrapping_mul(131) ^ seed.wrapping_mul(7919)) as u8)
        .collect()
}

/// The page-aligned `len`-byte window of `raw` (which has 4096 bytes of slack).
fn page_aligned(raw: &mut [u8], len: usize) -> &mut [u8] {
    let skip = raw.as_ptr().align_offset(4096);
    &mut raw[skip..skip + len]
}

/// The pair's buffers: page-aligned, as the Open MPI benchmark uses (posix_memalign).
struct Buffers {
    sraw: Vec<u8>,
    rraw: Vec<u8>,
    max: usize,
}

impl Buffers {
    fn new(me: usize, max: usize) -> Self {
        let mut b = Buffers {
            sraw: vec![0u8; max + 8192],
            rraw: vec![1u8; max + 8192],
            max,
        };
        b.send().copy_from_slice(&pattern(me, max));
        b
    }

    fn send(&mut self) -> &mut [u8] {
        page_aligned(&mut self.sraw, self.max)
    }

    fn both(&mut self) -> (&mut [u8], &mut [u8]) {
        (
            page_aligned(&mut self.sraw, self.max),
            page_aligned(&mut self.rraw, self.max),
        )
    }
}

/// One round trip of `size` bytes.
fn round_trip(p2p: &P2p<'_>, pair: Pair, b: &mut Buffers, size: usize) -> Result<()> {
    let (sbuf, rbuf) = b.both();
    if pair.initiator {
        p2p.send(pair.partner, 1, &sbuf[..size])?;
        p2p.recv(pair.partner, 1, &mut rbuf[..size])?;
    } else {
        p2p.recv(pair.partner, 1, &mut rbuf[..size])?;
        p2p.send(pair.partner, 1, &sbuf[..size])?;
    }
    Ok(())
}

/// Streaming: `batches` windows of messages, each acknowledged; µs per message, per batch.
fn stream(
    p2p: &P2p<'_>,
    pair: Pair,
    b: &mut Buffers,
    size: usize,
    batches: usize,
) -> Result<Vec<f64>> {
    let (sbuf, rbuf) = b.both();
    let mut ack = [0u8; 1];
    let mut times = Vec::with_capacity(batches);
    for i in 0..batches + 1 {
        let s = Instant::now();
        if pair.initiator {
            p2p.scope(|sc| {
                for _ in 0..WINDOW {
                    let _ = sc.isend(pair.partner, 2, &sbuf[..size])?;
                }
                Ok(())
            })?;
            p2p.recv(pair.partner, 3, &mut ack)?;
        } else {
            for _ in 0..WINDOW {
                p2p.recv(pair.partner, 2, &mut rbuf[..size])?;
            }
            p2p.send(pair.partner, 3, &ack)?;
        }
        if i >= 1 {
            times.push(s.elapsed().as_secs_f64() * 1e6 / WINDOW as f64);
        }
    }
    Ok(times)
}

/// The checked exchange: each side sends a size-specific pattern and counts wrong bytes in
/// what it got.
fn check(
    p2p: &P2p<'_>,
    pair: Pair,
    b: &mut Buffers,
    size: usize,
    me: usize,
    inject: bool,
) -> Result<u64> {
    let (sbuf, rbuf) = b.both();
    sbuf[..size].copy_from_slice(&pattern(size + me, size));
    rbuf[..size].fill(0);
    let got = p2p.sendrecv(
        pair.partner,
        4,
        &sbuf[..size],
        pair.partner,
        4,
        &mut rbuf[..size],
    )?;
    if inject && size > 0 {
        rbuf[0] ^= 0xff;
    }
    let expect = pattern(size + pair.partner, size);
    let bad = rbuf[..size]
        .iter()
        .zip(&expect)
        .filter(|(a, b)| a != b)
        .count() as u64;
    Ok(bad + (got != size) as u64)
}

pub fn run(c: &ByteArgs) -> Result<()> {
    let sizes = c.sizes(64 << 20).map_err(Error::InvalidArgument)?;
    let comm = session::connect(c)?;
    let (me, n) = (comm.rank(), comm.world_size());
    let p2p = P2p::new(&comm, P2pConfig::default())?;
    let max = *sizes.iter().max().expect("at least one size");
    let pair = Pair::of(&comm);
    let mut bufs = Buffers::new(me, max);
    let mut table = Table::start(c, &comm, "sendrecv", true, &[]);
    // `--baseline`: over tcp, plain TCP between the same pair (its port travels by send/recv);
    // over shm, an in-process memcpy of the same bytes.
    let timeout = Duration::from_secs_f64(c.timeout);
    let mut plain = if c.baseline && c.backend == "tcp" && pair.active {
        Some(PlainTcp::connect(
            pair.initiator,
            |port| p2p.send(pair.partner, 9, &port.to_le_bytes()),
            || {
                let mut b = [0u8; 2];
                p2p.recv(pair.partner, 9, &mut b)?;
                Ok(u16::from_le_bytes(b))
            },
        )?)
    } else {
        None
    };
    let mut memcpy = (c.baseline && plain.is_none()).then(|| Memcpy::new(max));
    let mut plain_buf = vec![0u8; if plain.is_some() { max } else { 0 }];
    comm.barrier()?;
    for &size in sizes.iter().filter(|_| pair.active) {
        let iters = c.iters_for(size);
        let warm = c.warmup_for(iters);
        let times = session::timed(warm, iters, 2.0, || round_trip(&p2p, pair, &mut bufs, size))?;
        let batches = (iters / WINDOW).max(8);
        let streamed = stream(&p2p, pair, &mut bufs, size, batches)?;
        let wrong = match c.no_check() {
            true => None,
            false => Some(check(&p2p, pair, &mut bufs, size, me, c.inject_error)?),
        };
        table.count_wrong(wrong);
        // The baseline, right after (same machine state).
        let mut baseline = None;
        if let Some(p) = plain.as_mut() {
            let buf = &mut plain_buf[..size];
            baseline = p.measure(pair.initiator, buf, warm, iters, WINDOW, batches, timeout)?;
        } else if let Some(m) = memcpy.as_mut() {
            let us = m.time_us(size, iters.min(100));
            baseline = Some((us, report::gbps(size, us)));
        }
        if pair.initiator {
            let s50 = report::stats(&streamed).p50;
            table.row(Row::p2p(
                "sendrecv", &c.backend, n, size, &times, s50, baseline, wrong,
            ));
        }
    }
    table.finish(&comm)?;
    p2p.close()?;
    comm.close()
}
