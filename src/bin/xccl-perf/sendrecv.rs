//! `xccl-perf sendrecv`: tagged send/recv between rank pairs (0↔1, 2↔3, ...): one-way
//! latency (half the median round trip) and streaming bandwidth (a window of messages, then a
//! one-byte acknowledgement, like osu_bw). A checked exchange after each size counts wrong
//! bytes.

use crate::memcpy_baseline::Memcpy;
use crate::options::Common;
use crate::report::{self, Row};
use crate::tcp_baseline::PlainTcp;
use std::time::{Duration, Instant};
use xccl::p2p::{P2p, P2pConfig};
use xccl::{Backend, Communicator, Error, Result};

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

pub fn run(c: &Common) -> Result<()> {
    let sizes = c.sizes(64 << 20).map_err(Error::InvalidArgument)?;
    let comm = Communicator::builder()
        .backend(c.backend.parse::<Backend>()?)
        .timeout(Duration::from_secs_f64(c.timeout))
        .build()?;
    let (me, n) = (comm.rank(), comm.world_size());
    if n < 2 {
        return Err(Error::InvalidArgument(
            "sendrecv needs at least 2 ranks (-n 2)".into(),
        ));
    }
    let p2p = P2p::new(&comm, P2pConfig::default())?;
    let max = *sizes.iter().max().expect("at least one size");
    let initiator = me % 2 == 0;
    let partner = if initiator { me + 1 } else { me - 1 };
    let active = partner < n;
    // Page-aligned buffers, as the Open MPI benchmark uses (posix_memalign), touched once.
    let mut sraw = vec![0u8; max + 8192];
    let mut rraw = vec![1u8; max + 8192];
    let (sbuf, rbuf) = (page_aligned(&mut sraw, max), page_aligned(&mut rraw, max));
    sbuf.copy_from_slice(&pattern(me, max));
    let mut ack = [0u8; 1];
    if me == 0 {
        println!("{}", report::header("sendrecv", &c.backend, n));
        println!("{}", report::columns(true, c.baseline));
    }
    // `--baseline`: over tcp, plain TCP between the same pair (its port travels by send/recv);
    // over shm, an in-process memcpy of the same bytes.
    let timeout = Duration::from_secs_f64(c.timeout);
    let mut plain = if c.baseline && c.backend == "tcp" && active {
        Some(PlainTcp::connect(
            initiator,
            |port| p2p.send(partner, 9, &port.to_le_bytes()),
            || {
                let mut b = [0u8; 2];
                p2p.recv(partner, 9, &mut b)?;
                Ok(u16::from_le_bytes(b))
            },
        )?)
    } else {
        None
    };
    let mut memcpy = (c.baseline && plain.is_none()).then(|| Memcpy::new(max));
    let mut plain_buf = vec![0u8; if plain.is_some() { max } else { 0 }];
    comm.barrier()?;
    let mut rows = Vec::new();
    let mut total_wrong = 0u64;
    if active {
        for &size in &sizes {
            let iters = c.iters_for(size);
            let warm = c.warmup_for(iters);
            let mut times = Vec::with_capacity(iters);
            // One clock read per round trip: each sample ends where the next begins.
            let mut last = Instant::now();
            for i in 0..warm + iters {
                if initiator {
                    p2p.send(partner, 1, &sbuf[..size])?;
                    p2p.recv(partner, 1, &mut rbuf[..size])?;
                } else {
                    p2p.recv(partner, 1, &mut rbuf[..size])?;
                    p2p.send(partner, 1, &sbuf[..size])?;
                }
                let now = Instant::now();
                if i >= warm {
                    times.push((now - last).as_secs_f64() * 1e6 / 2.0);
                }
                last = now;
            }
            let batches = (iters / WINDOW).max(8);
            let mut stream = Vec::with_capacity(batches);
            for i in 0..batches + 1 {
                let s = Instant::now();
                if initiator {
                    p2p.scope(|sc| {
                        for _ in 0..WINDOW {
                            let _ = sc.isend(partner, 2, &sbuf[..size])?;
                        }
                        Ok(())
                    })?;
                    p2p.recv(partner, 3, &mut ack)?;
                } else {
                    for _ in 0..WINDOW {
                        p2p.recv(partner, 2, &mut rbuf[..size])?;
                    }
                    p2p.send(partner, 3, &ack)?;
                }
                if i >= 1 {
                    stream.push(s.elapsed().as_secs_f64() * 1e6 / WINDOW as f64);
                }
            }
            // Checked exchange: each side sends a size-specific pattern and checks what it got.
            let wrong = if c.no_check {
                None
            } else {
                sbuf[..size].copy_from_slice(&pattern(size + me, size));
                rbuf[..size].fill(0);
                let got = p2p.sendrecv(partner, 4, &sbuf[..size], partner, 4, &mut rbuf[..size])?;
                if c.inject_error && size > 0 {
                    rbuf[0] ^= 0xff;
                }
                let expect = pattern(size + partner, size);
                let bad = rbuf[..size]
                    .iter()
                    .zip(&expect)
                    .filter(|(a, b)| a != b)
                    .count() as u64;
                Some(bad + (got != size) as u64)
            };
            total_wrong += wrong.unwrap_or(0);
            // The baseline, right after (same machine state).
            let mut baseline = None;
            if let Some(p) = plain.as_mut() {
                let buf = &mut plain_buf[..size];
                baseline = p.measure(initiator, buf, warm, iters, WINDOW, batches, timeout)?;
            } else if let Some(m) = memcpy.as_mut() {
                let us = m.time_us(size, iters.min(100));
                baseline = Some((us, report::gbps(size, us)));
            }
            if initiator {
                let s50 = report::stats(&mut stream).0;
                let row = Row::p2p(
                    "sendrecv", &c.backend, n, size, &mut times, s50, baseline, wrong,
                );
                report::emit(me, &mut rows, row);
            }
        }
    }
    comm.barrier()?;
    report::finish(me, c, &rows, total_wrong)?;
    p2p.close()?;
    comm.close()
}
