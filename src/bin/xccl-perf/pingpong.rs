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

use crate::options::PingpongArgs;
use crate::report::{self, Row};
use crate::tcp_baseline::PlainTcp;
use std::time::{Duration, Instant};
use xccl::transport::{Cmp, SignalOp, Transport, Window};
use xccl::{Backend, Communicator, Error, Result};

const PAGE: usize = 4096;
/// Puts per streaming batch (osu_bw uses 64).
const STREAM_WINDOW: usize = 16;

fn round_up(n: usize) -> usize {
    n.div_ceil(PAGE).max(1) * PAGE
}

fn pattern_byte(seed: usize, k: usize) -> u8 {
    (k.wrapping_mul(131).wrapping_add(seed.wrapping_mul(7919)) >> 3) as u8
}

struct Layout {
    region: usize,
}

impl Layout {
    fn send(&self) -> usize {
        0
    }
    fn recv(&self) -> usize {
        self.region
    }
    fn status(&self) -> usize {
        2 * self.region
    }
    fn scratch(&self) -> usize {
        2 * self.region + PAGE
    }
    fn total(&self) -> usize {
        3 * self.region + PAGE
    }
}

/// Counters of the two signal words, advanced in lockstep by both partners.
struct Pair<'a> {
    t: &'a dyn Transport,
    win: Window,
    lay: Layout,
    partner: usize,
    ping: usize,
    pong: usize,
    seq: u64,
    deadline: Duration,
}

impl Pair<'_> {
    fn deadline(&self) -> Instant {
        Instant::now() + self.deadline
    }

    /// Initiator side of one round trip of `size` bytes.
    fn ping(&mut self, size: usize) -> Result<()> {
        self.send(size, self.ping)?;
        self.await_next(self.pong)
    }

    /// Responder side of one round trip.
    fn pong(&mut self, size: usize) -> Result<()> {
        self.await_next(self.ping)?;
        self.send(size, self.pong)
    }

    /// Puts the first `size` bytes of the send part into the partner's recv part and bumps
    /// its signal word `sig`.
    fn send(&self, size: usize, sig: usize) -> Result<()> {
        // SAFETY: the send part is written only by this rank (locally, in `fill`), never by a
        // peer, so it is stable while the slice lives.
        let src = unsafe { self.t.local_slice(&self.win, self.lay.send(), size)? };
        self.t.put_signal(
            self.partner,
            &self.win,
            self.lay.recv(),
            src,
            sig,
            SignalOp::Add,
            1,
        )
    }

    /// Waits for the partner's next bump of signal word `sig`.
    fn await_next(&mut self, sig: usize) -> Result<()> {
        self.seq += 1;
        self.t
            .wait(sig, Cmp::Ge, self.seq, self.deadline())
            .map(|_| ())
    }

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

pub fn run(args: &PingpongArgs) -> Result<()> {
    let c = &args.common;
    let sizes = c.sizes(64 << 20).map_err(Error::InvalidArgument)?;
    let timeout = Duration::from_secs_f64(c.timeout);
    let comm = Communicator::builder()
        .backend(c.backend.parse::<Backend>()?)
        .timeout(timeout)
        .build()?;
    let (me, n) = (comm.rank(), comm.world_size());
    if n < 2 {
        return Err(Error::InvalidArgument(
            "pingpong needs at least 2 ranks (-n 2)".into(),
        ));
    }
    let max = *sizes.iter().max().expect("at least one size");
    let lay = Layout {
        region: round_up(max),
    };
    let lease = comm.lease("the pingpong window", lay.total(), 3, "pingpong")?;
    let (win, sigs) = (*lease.window(), lease.signals().start);
    let t = comm.transport();
    let initiator = me % 2 == 0;
    let partner = if initiator { me + 1 } else { me - 1 };
    let active = partner < n;
    let mut pair = Pair {
        t,
        win,
        lay,
        partner,
        ping: sigs,
        pong: sigs + 1,
        seq: 0,
        deadline: timeout,
    };
    // Over tcp, the baseline is plain TCP between the same processes (its port travels
    // through the window and a third signal word); over shm, an in-process memcpy.
    let mut plain = if c.baseline && c.backend == "tcp" && active {
        let status = pair.lay.status();
        Some(PlainTcp::connect(
            initiator,
            |port| {
                t.put_signal(
                    partner,
                    &win,
                    status,
                    &(port as u64).to_le_bytes(),
                    sigs + 2,
                    SignalOp::Add,
                    1,
                )
            },
            || {
                t.wait(sigs + 2, Cmp::Ge, 1, Instant::now() + timeout)?;
                let mut b = [0u8; 8];
                t.read_local(&win, status, &mut b)?;
                Ok(u64::from_le_bytes(b) as u16)
            },
        )?)
    } else {
        None
    };
    let mut plain_buf = if plain.is_some() {
        vec![0u8; *sizes.iter().max().expect("a size")]
    } else {
        Vec::new()
    };
    if me == 0 {
        println!("{}", report::header("pingpong", &c.backend, n));
        println!("{}", report::columns(true, c.baseline));
    }
    comm.barrier()?;
    let mut rows = Vec::new();
    let mut total_wrong = 0;
    if active {
        for &size in &sizes {
            let iters = c.iters_for(size);
            let warm = c.warmup_for(iters);
            if initiator {
                pair.fill(size, 0)?;
            }
            let mut times = Vec::with_capacity(iters);
            // One clock read per round trip: each sample ends where the next begins.
            let mut last = Instant::now();
            for i in 0..warm + iters {
                if initiator {
                    pair.ping(size)?;
                    let now = Instant::now();
                    if i >= warm {
                        times.push((now - last).as_secs_f64() * 1e6 / 2.0);
                    }
                    last = now;
                } else {
                    pair.pong(size)?;
                }
            }
            // Streaming bandwidth: batches of WINDOW puts, one signal and an ack per batch.
            let batches = (iters / STREAM_WINDOW).max(8);
            let mut stream_times = Vec::with_capacity(batches);
            let mut memcpy_times = Vec::with_capacity(batches);
            for i in 0..batches + 1 {
                if initiator {
                    let s = Instant::now();
                    pair.stream(size, STREAM_WINDOW)?;
                    if i >= 1 {
                        stream_times.push(s.elapsed().as_secs_f64() * 1e6 / STREAM_WINDOW as f64);
                    }
                    if c.baseline {
                        memcpy_times.push(memcpy_batch(t, &win, &pair.lay, size, STREAM_WINDOW)?);
                    }
                } else {
                    pair.stream_ack()?;
                }
            }
            let wrong = if c.no_check {
                None
            } else {
                Some(pair.check(size, initiator, c.inject_error)?)
            };
            total_wrong += wrong.unwrap_or(0);
            // Plain TCP, same sizes and counts, right after (same machine state).
            let plain_base = match plain.as_mut() {
                Some(p) => {
                    let buf = &mut plain_buf[..size];
                    p.measure(initiator, buf, warm, iters, STREAM_WINDOW, batches, timeout)?
                }
                None => None,
            };
            if initiator {
                let stream_us = report::stats(&mut stream_times).0;
                let baseline = match (plain_base, c.baseline) {
                    (Some(b), _) => Some(b),
                    (None, true) => {
                        let us = report::stats(&mut memcpy_times[1..]).0;
                        Some((us, report::gbps(size, us)))
                    }
                    (None, false) => None,
                };
                let row = Row::p2p(
                    "pingpong", &c.backend, n, size, &mut times, stream_us, baseline, wrong,
                );
                report::emit(me, &mut rows, row);
            }
        }
    }
    comm.barrier()?;
    report::finish(me, c, &rows, total_wrong)?;
    lease.close()?;
    comm.close()
}
