//! Monotonic 64-bit signal words, one per 128-byte line, with spin/yield/park waiting.

use crate::futex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes per signal word: two cache lines, so adjacent prefetching never couples two words.
pub const SIGNAL_LINE: usize = 128;

/// One signal line as laid out in memory.
#[repr(C, align(128))]
struct Line {
    value: AtomicU64,
    /// Number of parked (or about to park) waiters on this word.
    waiters: AtomicU32,
    /// Futex word, bumped by every waker that saw waiters.
    seq: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Line>() == SIGNAL_LINE);

/// How a waiter spends its time before a deadline: spin with `pause`, then `sched_yield`,
/// then park on the futex in slices (re-checking interruptions after each slice).
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy {
    /// Time spent spinning before yielding. Waking a parked process on another core costs
    /// 60–170 µs on a virtual machine, so a short spin pays off when peers have their own core.
    pub spin: Duration,
    /// Time spent yielding before parking.
    pub yield_for: Duration,
    /// Longest single park; interruptions are also re-checked after each.
    pub park_slice: Duration,
}

impl WaitPolicy {
    /// A policy for `local_ranks` processes sharing `cores` cores: spin only when every rank
    /// can have a core of its own (otherwise spinning steals the core of the rank we wait for).
    pub fn for_load(local_ranks: usize, cores: usize) -> Self {
        let oversubscribed = local_ranks > cores;
        WaitPolicy {
            // Oversubscribed, a rank that waits mostly waits for a rank that is not running:
            // a brief spin catches a partner on the other core, then the core is handed over
            // (500 ns measured best for 4 and 8 ranks on 2 cores, against 0 and 2 µs).
            spin: if oversubscribed {
                Duration::from_nanos(500)
            } else {
                Duration::from_micros(200)
            },
            yield_for: if oversubscribed {
                Duration::from_micros(500)
            } else {
                Duration::from_millis(2)
            },
            park_slice: Duration::from_millis(20),
        }
    }
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitOutcome<E> {
    /// The condition held; the word's value at that moment.
    Ready(u64),
    /// The interruption check returned this.
    Interrupted(E),
    /// The deadline passed first; the last value seen.
    TimedOut(u64),
}

/// A view of `count` signal lines in (possibly shared) memory.
#[derive(Clone, Copy)]
pub struct SignalArray {
    base: *const Line,
    count: usize,
}

// SAFETY: every access goes through atomics in the lines; the memory outlives the view by the
// contract of `from_raw`.
unsafe impl Send for SignalArray {}
// SAFETY: as above.
unsafe impl Sync for SignalArray {}

impl SignalArray {
    /// Bytes needed for `count` lines.
    pub const fn bytes_for(count: usize) -> usize {
        count * SIGNAL_LINE
    }

    /// Views `count` lines starting at `base`.
    ///
    /// # Safety
    /// `base` must be 128-byte aligned, valid for `bytes_for(count)` bytes for as long as the
    /// view (and its copies) are used, and only ever accessed atomically by anyone.
    pub unsafe fn from_raw(base: *mut u8, count: usize) -> Self {
        debug_assert_eq!(base as usize % SIGNAL_LINE, 0);
        SignalArray {
            base: base as *const Line,
            count,
        }
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when there are no words.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn line(&self, i: usize) -> &Line {
        assert!(
            i < self.count,
            "signal index {i} out of range {}",
            self.count
        );
        // SAFETY: `i < count`, and `from_raw`'s contract makes every line valid and atomic-only.
        unsafe { &*self.base.add(i) }
    }

    /// Current value (Acquire: partner of the SeqCst updates in `add`/`set`).
    pub fn load(&self, i: usize) -> u64 {
        self.line(i).value.load(Ordering::Acquire)
    }

    /// Adds `v` and wakes parked waiters. Ordered after every earlier write of this thread
    /// (SeqCst includes Release; partner: the Acquire/SeqCst loads of waiters).
    pub fn add(&self, i: usize, v: u64) -> u64 {
        let l = self.line(i);
        let old = l.value.fetch_add(v, Ordering::SeqCst);
        Self::wake_line(l);
        old.wrapping_add(v)
    }

    /// Stores `v` and wakes parked waiters (same ordering as [`SignalArray::add`]).
    pub fn set(&self, i: usize, v: u64) {
        let l = self.line(i);
        l.value.store(v, Ordering::SeqCst);
        Self::wake_line(l);
    }

    /// Wakes waiters on word `i` without changing it (after setting an interruption flag).
    pub fn wake(&self, i: usize) {
        Self::wake_line(self.line(i));
    }

    /// Wakes waiters on every word.
    pub fn wake_every(&self) {
        for i in 0..self.count {
            self.wake(i);
        }
    }

    fn wake_line(l: &Line) {
        // SeqCst: the update of `value` (or of an interruption flag) before this load and the
        // waiter's `waiters` increment before its value load are in one total order, so either
        // the waiter sees the update or we see the waiter (partner: `wait_until`).
        if l.waiters.load(Ordering::SeqCst) != 0 {
            l.seq.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(&l.seq);
        }
    }

    /// Waits until `pred(value)` holds for word `i`, `interrupted()` returns something, or
    /// `deadline` passes. Spins, yields, then parks as `policy` says.
    pub fn wait_until<E>(
        &self,
        i: usize,
        pred: impl Fn(u64) -> bool,
        deadline: Instant,
        policy: &WaitPolicy,
        interrupted: impl Fn() -> Option<E>,
    ) -> WaitOutcome<E> {
        let l = self.line(i);
        let v = l.value.load(Ordering::Acquire);
        if pred(v) {
            return WaitOutcome::Ready(v);
        }
        let start = Instant::now();
        let mut n: u32 = 0;
        let mut yielding = false;
        loop {
            // Spin phase, then yield phase: both re-check cheaply. Once yielding, every check
            // gives the core away (the rank we wait for may need it); the clock is read only
            // every 64 checks while spinning, every 8 while yielding.
            let v = l.value.load(Ordering::Acquire);
            if pred(v) {
                return WaitOutcome::Ready(v);
            }
            n = n.wrapping_add(1);
            if yielding {
                std::thread::yield_now();
            }
            if n % (if yielding { 8 } else { 64 }) == 0 {
                if let Some(e) = interrupted() {
                    return WaitOutcome::Interrupted(e);
                }
                let now = Instant::now();
                if now >= deadline {
                    return WaitOutcome::TimedOut(v);
                }
                let spent = now - start;
                if spent >= policy.spin + policy.yield_for {
                    break;
                }
                yielding = spent >= policy.spin;
            }
            if !yielding {
                std::hint::spin_loop();
            }
        }
        // Park phase.
        loop {
            // SeqCst increment: partner of the SeqCst `waiters` load in `wake_line`.
            l.waiters.fetch_add(1, Ordering::SeqCst);
            let seq = l.seq.load(Ordering::SeqCst);
            let v = l.value.load(Ordering::SeqCst);
            let outcome = if pred(v) {
                Some(WaitOutcome::Ready(v))
            } else if let Some(e) = interrupted() {
                Some(WaitOutcome::Interrupted(e))
            } else {
                let now = Instant::now();
                if now >= deadline {
                    Some(WaitOutcome::TimedOut(v))
                } else {
                    futex::wait(&l.seq, seq, (deadline - now).min(policy.park_slice));
                    None
                }
            };
            l.waiters.fetch_sub(1, Ordering::SeqCst);
            if let Some(o) = outcome {
                return o;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(128))]
    struct Lines([u8; 4 * SIGNAL_LINE]);

    #[test]
    fn parked_waiter_is_woken_by_add() {
        let mut mem = Box::new(Lines([0; 4 * SIGNAL_LINE]));
        // SAFETY: the box is aligned, 4 lines long, outlives the scope, and is used atomically.
        let sig = unsafe { SignalArray::from_raw(mem.0.as_mut_ptr(), 4) };
        let policy = WaitPolicy {
            spin: Duration::ZERO,
            yield_for: Duration::ZERO,
            park_slice: Duration::from_secs(10),
        };
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                sig.wait_until(
                    2,
                    |v| v >= 5,
                    Instant::now() + Duration::from_secs(20),
                    &policy,
                    || None::<()>,
                )
            });
            for _ in 0..5 {
                sig.add(2, 1);
            }
            assert_eq!(h.join().unwrap(), WaitOutcome::Ready(5));
        });
        let r = sig.wait_until(
            1,
            |v| v > 0,
            Instant::now() + Duration::from_millis(10),
            &policy,
            || None::<()>,
        );
        assert_eq!(r, WaitOutcome::TimedOut(0));
    }
}
