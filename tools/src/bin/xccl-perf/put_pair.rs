//! A put+signal ping-pong between two ranks, shared by `pingpong` and the MoE floor: each
//! rank's window is `[send | recv | status | scratch]`, every part page-aligned, so source and
//! destination sit at equal page offsets (no 4 KiB copy aliasing); a round trip puts from
//! the send part into the partner's recv part with a signal, and back.

use crate::session;
use std::time::{Duration, Instant};
use xccl::transport::{Cmp, SignalOp, Transport, Window};
use xccl::{Communicator, Lease, Result};

pub const PAGE: usize = 4096;

/// Where the parts of a pair's window lie, each `region` bytes (a multiple of a page) but the
/// status part, one page.
pub struct Layout {
    region: usize,
}

impl Layout {
    /// Parts large enough for messages of `max` bytes.
    pub fn for_messages(max: usize) -> Self {
        Layout {
            region: max.div_ceil(PAGE).max(1) * PAGE,
        }
    }
    pub fn send(&self) -> usize {
        0
    }
    pub fn recv(&self) -> usize {
        self.region
    }
    pub fn status(&self) -> usize {
        2 * self.region
    }
    pub fn scratch(&self) -> usize {
        2 * self.region + PAGE
    }
    pub fn total(&self) -> usize {
        3 * self.region + PAGE
    }
}

/// This rank's side of a pair: counters of the two signal words, advanced in lockstep by
/// both partners.
pub struct Pair<'a> {
    pub t: &'a dyn Transport,
    pub win: Window,
    pub lay: Layout,
    pub partner: usize,
    pub ping: usize,
    pub pong: usize,
    seq: u64,
    deadline: Duration,
}

impl<'a> Pair<'a> {
    /// Collective: leases the window (`lay.total()` bytes, two signal words) and makes this
    /// rank's side of the pair with `ranks.partner`; every wait ends after `timeout`.
    pub fn lease(
        comm: &'a Communicator,
        lay: Layout,
        ranks: session::Pair,
        timeout: Duration,
    ) -> Result<(Lease<'a>, Self)> {
        let lease = comm.lease("the pingpong window", lay.total(), 2, "pingpong")?;
        let (win, sigs) = (*lease.window(), lease.signals().start);
        let pair = Pair {
            t: comm.transport(),
            win,
            lay,
            partner: ranks.partner,
            ping: sigs,
            pong: sigs + 1,
            seq: 0,
            deadline: timeout,
        };
        Ok((lease, pair))
    }

    pub fn deadline(&self) -> Instant {
        Instant::now() + self.deadline
    }

    /// Initiator side of one round trip of `size` bytes.
    pub fn ping(&mut self, size: usize) -> Result<()> {
        self.send(size, self.ping)?;
        self.await_next(self.pong)
    }

    /// Responder side of one round trip.
    pub fn pong(&mut self, size: usize) -> Result<()> {
        self.await_next(self.ping)?;
        self.send(size, self.pong)
    }

    /// Puts the first `size` bytes of the send part into the partner's recv part and bumps
    /// its signal word `sig`.
    pub fn send(&self, size: usize, sig: usize) -> Result<()> {
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
    pub fn await_next(&mut self, sig: usize) -> Result<()> {
        self.seq += 1;
        self.t
            .wait(sig, Cmp::Ge, self.seq, self.deadline())
            .map(|_| ())
    }

    /// Both sides of `warm + iters` round trips of `size` bytes: the initiator's one-way
    /// times (half of each round trip, µs); the responder's are empty.
    pub fn round_trips(
        &mut self,
        initiator: bool,
        size: usize,
        warm: usize,
        iters: usize,
    ) -> Result<Vec<f64>> {
        match initiator {
            true => session::timed(warm, iters, 2.0, || self.ping(size)),
            false => (0..warm + iters)
                .try_for_each(|_| self.pong(size))
                .map(|_| Vec::new()),
        }
    }

    /// As [`Pair::round_trips`] with `trips` timed round trips (after a tenth as many
    /// untimed), each side copying what it received into `scratch` (its length) before it
    /// answers: a transfer into the other's hands each way.
    pub fn round_trips_reading(
        &mut self,
        initiator: bool,
        size: usize,
        scratch: &mut [u8],
        trips: usize,
    ) -> Result<Vec<f64>> {
        let warm = (trips / 10).max(1);
        let (t, win, recv) = (self.t, self.win, self.lay.recv());
        let read = move |scratch: &mut [u8]| match scratch.is_empty() {
            true => Ok(()),
            false => t.read_local(&win, recv, scratch),
        };
        match initiator {
            true => session::timed(warm, trips, 2.0, || {
                self.send(size, self.ping)?;
                self.await_next(self.pong)?;
                read(scratch)
            }),
            false => (0..warm + trips)
                .try_for_each(|_| {
                    self.await_next(self.ping)?;
                    read(scratch)?;
                    self.send(size, self.pong)
                })
                .map(|_| Vec::new()),
        }
    }
}
