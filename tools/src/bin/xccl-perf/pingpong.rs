//! `xccl-perf pingpong`: put+signal ping-pong between rank pairs (0↔1, 2↔3, ...).
//!
//! Each rank's window is `[send | recv | status | scratch]`, every part page-aligned, so
//! source and destination sit at equal page offsets (no 4 KiB copy aliasing). The timed loop
//! sends from the send part into the partner's recv part; a separate checked round after each
//! size sends a known pattern both ways and counts wrong bytes.
//!
//! Two figures per size: the one-way latency (half the median round trip; `time`, `algbw`)
//! and the streaming put bandwidth (`put_bw`: batches of puts of the same source into the
//! partner's recv part, one signal and an acknowledgement per batch, like osu_bw).
//! `--baseline` adds a plain memcpy of the same bytes and the ratio `put_bw / memcpy_bw`.

use crate::options::ByteArgs;
use crate::put_pair::{Layout, Pair};
use crate::report::{self, Row};
use crate::session::{self, Table};
use crate::tcp_baseline::PlainTcp;
use std::time::{Duration, Instant};
use xccl::transport::{Cmp, SignalOp, Transport, Window};
use xccl::{Error, Result};

/// Puts per streaming batch (osu_bw uses 64).
const STREAM_WINDOW: usize = 16;

fn pattern_byte(seed: usize, k: usize) -> u8 {
    (k.wrapping_mul(131).wrapping_add(seed.wrapping_mul(7919)) >> 3) as u8
}

impl Pair<'_> {
    /// Initiator side of one streaming batch: `window` puts of `size` bytes, one signal, and
    /// the partner's acknowledgement (osu_bw style).
    fn stream(&mut self, size: usize, window: usize) -> Result<()> {
        // SAFETY: as in `send`.
        let src = unsafe { self.t.local_slice(&self.win, self.lay.send(), size)? };
        for _ in 0..window {
            self.t.put(self.partner, &self.win, self.lay.recv(), src)?;
        }
        self.t.signal(self.partner, self.ping, SignalOp::Add, 1)?;
        self.await_next(self.pong)
    }

    /// Responder side of one streaming batch.
    fn stream_ack(&mut self) -> Result<()> {
        self.await_next(self.ping)?;
        self.t.signal(self.partner, self.pong, SignalOp::Add, 1)
    }

    fn fill(&self, size: usize, seed: usize) -> Result<()> {
        let data: Vec<u8> = (0..size).map(|k| pattern_byte(seed, k)).collect();
        self.t.write_local(&self.win, self.lay.send(), &data)
    }

    fn count_wrong(&self, size: usize, seed: usize, inject: bool) -> Result<u64> {
        let mut got = vec![0u8; size];
        self.t.read_local(&self.win, self.lay.recv(), &mut got)?;
        if let (true, Some(b)) = (inject, got.first_mut()) {
            *b ^= 0xff;
        }
        Ok(got
            .iter()
            .enumerate()
            .filter(|(k, &b)| b != pattern_byte(seed, *k))
            .count() as u64)
    }

    /// The checked round: a pattern each way; returns the wrong bytes both sides saw
    /// (initiator) or the responder's own count (responder).
    fn check(&mut self, size: usize, initiator: bool, inject: bool) -> Result<u64> {
        if initiator {
            self.fill(size, size)?;
            self.ping(size)?;
            let mine = self.count_wrong(size, size + 1, inject)?;
            let mut theirs = [0u8; 8];
            self.t
                .read_local(&self.win, self.lay.status(), &mut theirs)?;
            Ok(mine + u64::from_le_bytes(theirs))
        } else {
            self.await_next(self.ping)?;
            let wrong = self.count_wrong(size, size, false)?;
            self.fill(size, size + 1)?;
            self.t.put(
                self.partner,
                &self.win,
                self.lay.status(),
                &wrong.to_le_bytes(),
            )?;
            self.send(size, self.pong)?;
            Ok(wrong)
        }
    }
}

/// Time per copy (µs) of one batch of `count` in-process memcpys of `size` bytes between two
/// page-aligned parts of this rank's own window: the baseline of the streaming put bandwidth,
/// measured batch by batch alternately with the puts so both see the same machine.
fn memcpy_batch(
    t: &dyn Transport,
    win: &Window,
    lay: &Layout,
    size: usize,
    count: usize,
) -> Result<f64> {
    // SAFETY: send and scratch parts are written by no peer; they do not overlap.
    let (src, dst) = unsafe {
        (
            t.local_slice(win, lay.send(), size)?.as_ptr(),
            t.local_slice_mut(win, lay.scratch(), size)?.as_mut_ptr(),
        )
    };
    let s = Instant::now();
    for _ in 0..count {
        // SAFETY: both ranges are `size` bytes inside this rank's window and do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, size) };
        std::hint::black_box(dst);
    }
    Ok(s.elapsed().as_secs_f64() * 1e6 / count as f64)
}

/// Over tcp with `--baseline`, plain TCP between the same processes: its port travels
/// through the window's status part and the third signal word.
fn plain_tcp(p: &Pair<'_>, initiator: bool, timeout: Duration) -> Result<PlainTcp> {
    let (t, win, partner, status, word) = (p.t, p.win, p.partner, p.lay.status(), p.pong + 1);
    PlainTcp::connect(
        initiator,
        |port| {
            t.put_signal(
                partner,
                &win,
                status,
                &(port as u64).to_le_bytes(),
                word,
                SignalOp::Add,
                1,
            )
        },
        || {
            t.wait(word, Cmp::Ge, 1, Instant::now() + timeout)?;
            let mut b = [0u8; 8];
            t.read_local(&win, status, &mut b)?;
            Ok(u64::from_le_bytes(b) as u16)
        },
    )
}

/// The streaming batches of one size (initiator: µs per put, and the memcpy baseline's when
/// asked; responder: acknowledgements only).
fn stream(
    pair: &mut Pair<'_>,
    size: usize,
    batches: usize,
    initiator: bool,
    memcpy: bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut stream_times = Vec::with_capacity(batches);
    let mut memcpy_times = Vec::with_capacity(batches);
    for i in 0..batches + 1 {
        if !initiator {
            pair.stream_ack()?;
            continue;
        }
        let s = Instant::now();
        pair.stream(size, STREAM_WINDOW)?;
        if i >= 1 {
            stream_times.push(s.elapsed().as_secs_f64() * 1e6 / STREAM_WINDOW as f64);
        }
        if memcpy {
            memcpy_times.push(memcpy_batch(
                pair.t,
                &pair.win,
                &pair.lay,
                size,
                STREAM_WINDOW,
            )?);
        }
    }
    Ok((stream_times, memcpy_times))
}

pub fn run(args: &ByteArgs) -> Result<()> {
    let c = args;
    let sizes = c.sizes(64 << 20).map_err(Error::InvalidArgument)?;
    let timeout = Duration::from_secs_f64(c.timeout);
    let comm = session::connect(c)?;
    let n = comm.world_size();
    let max = *sizes.iter().max().expect("at least one size");
    let ranks = session::Pair::of(&comm);
    let initiator = ranks.initiator;
    let (lease, mut pair) = Pair::lease(&comm, Layout::for_messages(max), ranks, timeout)?;
    // Over tcp, the baseline is plain TCP between the same processes; over shm, an
    // in-process memcpy.
    let mut plain = match c.baseline && c.backend == "tcp" && ranks.active {
        true => Some(plain_tcp(&pair, initiator, timeout)?),
        false => None,
    };
    let mut plain_buf = vec![0u8; if plain.is_some() { max } else { 0 }];
    let mut table = Table::start(c, &comm, "pingpong", true, &[]);
    comm.barrier()?;
    for &size in sizes.iter().filter(|_| ranks.active) {
        let iters = c.iters_for(size);
        let warm = c.warmup_for(iters);
        if initiator {
            pair.fill(size, 0)?;
        }
        let times = pair.round_trips(initiator, size, warm, iters)?;
        // Streaming bandwidth: batches of STREAM_WINDOW puts, one signal and an ack each.
        let batches = (iters / STREAM_WINDOW).max(8);
        let (streamed, memcpy) = stream(&mut pair, size, batches, initiator, c.baseline)?;
        let wrong = match c.no_check() {
            true => None,
            false => Some(pair.check(size, initiator, c.inject_error)?),
        };
        table.count_wrong(wrong);
        // Plain TCP, same sizes and counts, right after (same machine state).
        let plain_base = match plain.as_mut() {
            Some(p) => {
                let buf = &mut plain_buf[..size];
                p.measure(initiator, buf, warm, iters, STREAM_WINDOW, batches, timeout)?
            }
            None => None,
        };
        if initiator {
            let stream_us = report::stats(&streamed).p50;
            let baseline = match (plain_base, c.baseline) {
                (Some(b), _) => Some(b),
                (None, true) => {
                    let us = report::stats(&memcpy[1..]).p50;
                    Some((us, report::gbps(size, us)))
                }
                (None, false) => None,
            };
            table.row(Row::p2p(
                "pingpong", &c.backend, n, size, &times, stream_us, baseline, wrong,
            ));
        }
    }
    table.finish(&comm)?;
    lease.close()?;
    comm.close()
}
