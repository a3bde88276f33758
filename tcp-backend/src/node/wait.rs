//! Waiting on signal words and on the count of applied signals, with deadlines.

use super::*;

/// Checks of the caller's condition between two passes over the links in
/// [`Node::poll_for`].
const READY_CHECKS: u32 = 32;

impl Node {
    /// Current value of this rank's signal word `index`.
    pub fn signal_value(&self, index: usize) -> Result<u64> {
        self.check_index(index)?;
        Ok(self.shared.signals.load(index))
    }

    /// Waits until `pred(value)` holds for signal word `index`.
    pub fn wait(&self, index: usize, pred: impl Fn(u64) -> bool, deadline: Instant) -> Result<u64> {
        self.check_index(index)?;
        self.wait_word(index, pred, deadline)
    }

    /// How many signals this rank has applied (its peers' and its own), ever.
    pub fn arrivals(&self) -> u64 {
        self.shared.signals.load(self.shared.signals.arrivals())
    }

    /// Waits until more than `seen` signals have been applied here.
    pub fn wait_arrivals(&self, seen: u64, deadline: Instant) -> Result<u64> {
        self.wait_word(self.shared.signals.arrivals(), |v| v > seen, deadline)
    }

    /// Polls the links in this thread (applying what arrives, as a progress thread would)
    /// until `ready` returns something, the node is interrupted, or the configured polling
    /// time has passed (`Ok(None)`: sleep elsewhere, the progress threads take over). For a
    /// caller that waits on words a [`crate::SignalSink`] keeps: frames it applies itself
    /// save the wake-up of a progress thread.
    pub fn poll_for<T>(&self, mut ready: impl FnMut() -> Option<T>) -> Result<Option<T>> {
        if let Some(e) = self.shared.interrupted() {
            return Err(e);
        }
        let start = Instant::now();
        let polling = Polling::new(&self.shared);
        let mut n = 0u32;
        let out = 'wait: loop {
            // Between two passes over the links (a receive call each), `ready` is checked
            // for about as long: what the sink's other writers (peers that share memory)
            // set is seen without waiting out the system calls.
            for _ in 0..READY_CHECKS {
                if let Some(v) = ready() {
                    break 'wait Some(v);
                }
                std::hint::spin_loop();
            }
            try_progress_all(&self.shared);
            n += 1;
            if n % 16 == 0 {
                if let Some(e) = self.shared.interrupted() {
                    return Err(e);
                }
                if start.elapsed() >= self.shared.cfg.poll {
                    break None;
                }
            }
        };
        if out.is_none() {
            polling.hand_back();
        }
        Ok(out)
    }

    pub(super) fn wait_word(
        &self,
        index: usize,
        pred: impl Fn(u64) -> bool,
        deadline: Instant,
    ) -> Result<u64> {
        if let Some(e) = self.shared.interrupted() {
            return Err(e);
        }
        // Poll the links in this thread for a while (no wake-up of another thread on the
        // critical path), then sleep while the progress threads apply what arrives.
        let start = Instant::now();
        let mut n = 0u32;
        let polling = Polling::new(&self.shared);
        loop {
            let v = self.shared.signals.load(index);
            if pred(v) {
                return Ok(v);
            }
            try_progress_all(&self.shared);
            n += 1;
            if n % 16 == 0 {
                if let Some(e) = self.shared.interrupted() {
                    return Err(e);
                }
                let now = Instant::now();
                if now >= deadline || now - start >= self.shared.cfg.poll {
                    break;
                }
            }
        }
        polling.hand_back();
        match self
            .shared
            .signals
            .wait_until(index, pred, deadline, Duration::ZERO, || {
                self.shared.interrupted()
            }) {
            Outcome::Ready(v) => Ok(v),
            Outcome::Interrupted(e) => Err(e),
            Outcome::TimedOut(v) => Err(Error::Timeout(format!(
                "waiting on signal {index} (last seen {v})"
            ))),
        }
    }
}
