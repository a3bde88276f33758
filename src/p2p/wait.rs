//! Waiting for a point-to-point op: a short spin on the one chunk a lone receive needs, then
//! sleeping on that source's head counter or on the doorbell, in slices that come back to
//! progress every channel, always within the op's deadline.

use super::engine::{Engine, DRAIN_AFTER};
use super::matching::{Kind, Op, OpId, OpState};
use crate::error::{Error, Result};
use crate::transport::Cmp;
use crate::Communicator;
use std::time::{Duration, Instant};

/// What a waiting op sleeps on.
pub(super) enum Wake {
    /// One source's next chunk (source, chunks consumed so far): the engine's only op is a
    /// receive, so one cache line is all there is to watch (the chunk's header marker, or
    /// the source's head counter). The wait comes back after a slice (growing while nothing
    /// happens) to progress every channel, so other ranks' traffic is never left waiting.
    Focused(usize, u64),
    /// The doorbell, briefly: a message is parked in a ring and may need draining.
    Drain,
    /// The doorbell, which every arrival and credit bumps.
    Doorbell,
}

/// Polls of the wake word before a wait that reads the clock.
const QUICK_POLLS: usize = 64;
/// How long a receive first watches its source's next chunk (the marker where windows are
/// mapped; elsewhere the head counter, reading the links meanwhile) before the general path,
/// unless this host's ranks outnumber its CPUs: a spinning rank then holds the core the
/// sender needs, so it looks only briefly.
const QUICK_WAIT: Duration = Duration::from_micros(20);

pub(super) fn quick_wait(comm: &Communicator) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    if comm.info().local_size > cores {
        Duration::ZERO
    } else {
        QUICK_WAIT
    }
}

/// First slice of a focused wait.
const FOCUS_SLICE: Duration = Duration::from_micros(100);
impl Engine<'_> {
    /// Waits briefly for chunk `n` from `src`; true once it is here. Where the window is
    /// mapped, spins on its marker; elsewhere waits on the head counter through the
    /// transport, which meanwhile reads the links itself (a tcp receiver that only looked at
    /// the counter would wait for a progress thread to wake up).
    pub(super) fn arrives_soon(&self, src: usize, n: u64) -> bool {
        let until = Instant::now() + self.quick_wait;
        if self.paths[src].is_mapped() {
            loop {
                if (0..QUICK_POLLS).any(|_| {
                    std::hint::spin_loop();
                    self.arrived(src, n).unwrap_or(true)
                }) {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
            }
        }
        self.t()
            .wait(self.head_base + src, Cmp::Gt, n, until)
            .is_ok()
    }

    /// Progresses once; `Some` when op `id` has ended (it is then removed).
    pub(crate) fn test(&self, id: OpId) -> Result<Option<u64>> {
        self.test_inner(id).map(|(r, _)| r)
    }

    /// As `test`, also telling whether a message is parked in a ring awaiting a receive.
    pub(super) fn test_inner(&self, id: OpId) -> Result<(Option<u64>, Wake)> {
        let mut st = self.lock()?;
        self.progress(&mut st)?;
        let wake = match st.ops.get(&id) {
            Some(Op {
                kind: Kind::Recv(r),
                state: OpState::Pending,
            }) if st.ops.len() == 1 && !st.undrained => Wake::Focused(r.src, st.ch[r.src].consumed),
            _ if st.undrained => Wake::Drain,
            _ => Wake::Doorbell,
        };
        Ok((st.collect(id)?, wake))
    }

    /// Whether op `id` is still registered (not yet collected).
    pub(crate) fn is_live(&self, id: OpId) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ops
            .contains_key(&id)
    }

    /// Waits until op `id` ends or `deadline` passes, driving every channel meanwhile.
    pub(crate) fn wait(&self, id: OpId, deadline: Instant) -> Result<u64> {
        self.wait_inner(id, Some(deadline))
    }

    /// Waits with the communicator's timeout, starting the clock only if the op does not
    /// complete at once (a blocking call on a short message reads no clock at all).
    pub(crate) fn wait_default(&self, id: OpId) -> Result<u64> {
        self.wait_inner(id, None)
    }

    pub(super) fn wait_inner(&self, id: OpId, deadline: Option<Instant>) -> Result<u64> {
        let mut fixed = deadline;
        let mut deadline = || *fixed.get_or_insert_with(|| self.comm.deadline());
        let t = self.t();
        let mut slice = FOCUS_SLICE;
        loop {
            let (done, wake) = self.test_inner(id)?;
            if let Some(n) = done {
                return Ok(n);
            }
            if let Wake::Focused(src, consumed) = wake {
                // Poll briefly before anything that reads the clock: most waits for a short
                // message end here.
                if self.arrives_soon(src, consumed) {
                    continue;
                }
            }
            // Where windows are mapped, senders announce chunks by marker and doorbell only:
            // a receiver that must sleep arms the doorbell.
            let wake = match wake {
                Wake::Focused(src, _) if self.paths[src].is_mapped() => Wake::Doorbell,
                w => w,
            };
            let (until, r) = match wake {
                Wake::Focused(src, consumed) => {
                    let until = deadline().min(Instant::now() + slice);
                    slice = (slice * 2).min(Duration::from_millis(10));
                    (
                        until,
                        t.wait(self.head_base + src, Cmp::Gt, consumed, until),
                    )
                }
                Wake::Drain | Wake::Doorbell => {
                    // Arm, so that peers ring the doorbell, then look once more for anything
                    // that arrived before they could see this rank armed.
                    let _armed = self.doorbell.arm()?;
                    let seen = self.doorbell.seen()?;
                    if let (Some(n), _) = self.test_inner(id)? {
                        return Ok(n);
                    }
                    let until = match wake {
                        // With a message parked in a ring, come back in time to drain it.
                        Wake::Drain => deadline().min(Instant::now() + DRAIN_AFTER),
                        _ => deadline(),
                    };
                    (until, self.doorbell.wait(seen, until))
                }
            };
            match r {
                Ok(_) => slice = FOCUS_SLICE,
                Err(Error::Timeout { .. }) if until < deadline() => {}
                Err(Error::Timeout { .. }) => {
                    return Err(Error::Timeout {
                        op: format!("point-to-point request {id}"),
                        waited: self.comm.timeout(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }
}
