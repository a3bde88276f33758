//! The wait-any doorbell: one word a rank sleeps on while it waits for anything (an arrival
//! from any peer, a credit), rung by peers after they signal or publish, and skipped when the
//! rank is known to have no waiter parked.

use super::{Cmp, MappedMem, PeerPath, SignalOp, Transport, Window};
use crate::error::Result;
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

/// A doorbell over one signal word and one word of a window (this rank's count of parked
/// waiters, read by mapped peers to skip ringing an empty room).
///
/// Over a backend that counts every signal it applies ([`Transport::arrivals`]), the count is
/// the doorbell: waiters wait on it and network peers ring nothing, as their signal already
/// counts. Every rank of a job must build its doorbell with the same word and offset.
pub struct Doorbell<'t> {
    t: &'t dyn Transport,
    index: usize,
    armed_at: usize,
    own: MappedMem,
    counts_arrivals: bool,
}

/// A parked waiter, counted in the doorbell's word until dropped.
pub struct Armed<'d> {
    word: &'d MappedMem,
    at: usize,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Ok(w) = self.word.word(self.at) {
            w.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl<'t> Doorbell<'t> {
    /// A doorbell on signal word `index`, with the waiter count at `armed_at` (8-byte
    /// aligned, used for nothing else) in `win`.
    pub fn new(t: &'t dyn Transport, win: &Window, armed_at: usize, index: usize) -> Result<Self> {
        let own = t.local_mem(win)?;
        own.word(armed_at)?;
        super::check_signal(index, t.caps().num_signals)?;
        Ok(Doorbell {
            t,
            index,
            armed_at,
            own,
            counts_arrivals: t.arrivals().is_some(),
        })
    }

    /// Tells `path`'s peer that something arrived (call it after the signal or publish that
    /// carries it). Rings only where a waiter may be parked.
    pub fn ring(&self, path: &PeerPath<'_>) -> Result<()> {
        match path.mem() {
            Some(mem) => {
                // SYNC POINT: this SeqCst fence after the head/credit update and before reading
                // the count pairs with the fence in `arm` after a waiter counts itself and
                // before it looks once more: either the waiter sees the update, or this rank
                // sees the waiter.
                fence(Ordering::SeqCst);
                if mem.word(self.armed_at)?.load(Ordering::SeqCst) == 0 {
                    return Ok(());
                }
            }
            // The signal just sent counts as an arrival at the peer.
            None if self.counts_arrivals => return Ok(()),
            None => {}
        }
        self.t.signal(path.peer(), self.index, SignalOp::Add, 1)
    }

    /// Counts this rank as parked until the returned guard drops. Look once more for what
    /// you wait for after arming and before [`Doorbell::wait`]: a peer that updated before it
    /// could see the count did not ring.
    pub fn arm(&self) -> Result<Armed<'_>> {
        self.own.word(self.armed_at)?.fetch_add(1, Ordering::SeqCst);
        // SYNC POINT: partner of the fence in `ring`.
        fence(Ordering::SeqCst);
        Ok(Armed {
            word: &self.own,
            at: self.armed_at,
        })
    }

    /// The doorbell's value now, to wait past.
    pub fn seen(&self) -> Result<u64> {
        match self.t.arrivals() {
            Some(n) if self.counts_arrivals => Ok(n),
            _ => self.t.signal_value(self.index),
        }
    }

    /// Waits until the doorbell moves past `seen` (or `deadline`: `Timeout`).
    pub fn wait(&self, seen: u64, deadline: Instant) -> Result<u64> {
        if self.counts_arrivals {
            self.t.wait_arrivals(seen, deadline)
        } else {
            self.t.wait(self.index, Cmp::Gt, seen, deadline)
        }
    }
}
