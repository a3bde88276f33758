//! Monotonic 64-bit signal words of one rank, updated by progress threads and waited on by
//! the owner: spin briefly, then sleep on a condition variable in slices. The words may live
//! elsewhere (a [`SignalSink`]: the signal page local peers also update).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Signal words kept outside the node, so that signals from the network land in the same
/// words, and wake the same waiters, as signals from peers that share memory with this rank.
///
/// The node calls `apply` from its progress threads, after the writes the signal follows
/// are in memory; `wake` when waiters must look again (an abort, a failed peer).
pub trait SignalSink: Send + Sync {
    /// Current value of word `index` (an Acquire load).
    fn load(&self, index: usize) -> u64;
    /// Stores (`set`) or adds `value` to word `index`, ordered after every earlier write to
    /// this rank's memory, and wakes its waiters.
    fn apply(&self, index: usize, set: bool, value: u64);
    /// Wakes every waiter, whatever word it waits on.
    fn wake(&self);
}

#[repr(align(128))]
struct Word(AtomicU64);

pub(crate) struct Signals {
    /// The words, or, with a sink, only the arrival count (past the sink's words).
    words: Box<[Word]>,
    sink: Option<Arc<dyn SignalSink>>,
    waiters: AtomicUsize,
    lock: Mutex<u64>,
    cv: Condvar,
}

pub(crate) enum Outcome<E> {
    Ready(u64),
    Interrupted(E),
    TimedOut(u64),
}

impl Signals {
    /// `n` signal words, and one more past them that counts every signal applied (the
    /// arrival count: a waiter for "anything" waits on it).
    pub fn new(n: usize, sink: Option<Arc<dyn SignalSink>>) -> Self {
        Signals {
            words: (0..=n).map(|_| Word(AtomicU64::new(0))).collect(),
            sink,
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(0),
            cv: Condvar::new(),
        }
    }

    /// Signal words peers and callers may name (the arrival count is not one of them).
    pub fn len(&self) -> usize {
        self.words.len() - 1
    }

    /// Index of the arrival count.
    pub fn arrivals(&self) -> usize {
        self.words.len() - 1
    }

    pub fn load(&self, i: usize) -> u64 {
        match &self.sink {
            Some(sink) if i < self.len() => sink.load(i),
            // Acquire: partner of the SeqCst updates in `apply`.
            _ => self.words[i].0.load(Ordering::Acquire),
        }
    }

    /// Applies a signal (SeqCst, so it is ordered after the writes applied before it) and
    /// counts it in the arrival count (after it, so whoever sees the count sees the signal).
    pub fn apply(&self, i: usize, set: bool, v: u64) {
        if let Some(sink) = &self.sink {
            sink.apply(i, set, v);
        } else if set {
            self.words[i].0.store(v, Ordering::SeqCst);
        } else {
            self.words[i].0.fetch_add(v, Ordering::SeqCst);
        }
        self.words[self.arrivals()].0.fetch_add(1, Ordering::SeqCst);
        self.wake();
    }

    /// Wakes every sleeper (after a value or an interruption flag changed).
    pub fn wake(&self) {
        if let Some(sink) = &self.sink {
            sink.wake();
        }
        // SeqCst: pairs with the sleeper's SeqCst `waiters` increment before it re-checks.
        if self.waiters.load(Ordering::SeqCst) != 0 {
            let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            self.cv.notify_all();
        }
    }

    pub fn wait_until<E>(
        &self,
        i: usize,
        pred: impl Fn(u64) -> bool,
        deadline: Instant,
        spin: Duration,
        interrupted: impl Fn() -> Option<E>,
    ) -> Outcome<E> {
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            let v = self.load(i);
            if pred(v) {
                return Outcome::Ready(v);
            }
            n += 1;
            if n % 64 == 0 {
                if let Some(e) = interrupted() {
                    return Outcome::Interrupted(e);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Outcome::TimedOut(v);
                }
                if now - start >= spin {
                    break;
                }
            }
            std::hint::spin_loop();
        }
        loop {
            self.waiters.fetch_add(1, Ordering::SeqCst);
            let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            // SeqCst: after the SeqCst `waiters` increment above (partner: the SeqCst update
            // and `waiters` load in `apply`/`wake`), so either side sees the other.
            let v = match &self.sink {
                Some(sink) if i < self.len() => sink.load(i),
                _ => self.words[i].0.load(Ordering::SeqCst),
            };
            let out = if pred(v) {
                Some(Outcome::Ready(v))
            } else if let Some(e) = interrupted() {
                Some(Outcome::Interrupted(e))
            } else if Instant::now() >= deadline {
                Some(Outcome::TimedOut(v))
            } else {
                let slice = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(20));
                let _ = self.cv.wait_timeout(g, slice);
                None
            };
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if let Some(o) = out {
                return o;
            }
        }
    }
}
