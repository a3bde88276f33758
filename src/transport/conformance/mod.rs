//! The conformance suite: checks written once against [`Transport`], run for any backend.
//!
//! A backend crate instantiates it with [`crate::transport_conformance!`], giving a factory
//! `fn(world: usize) -> Vec<Box<dyn Transport>>` that builds `world` connected ranks in this
//! process (each rank then runs on its own thread). Every check runs under a watchdog: a hang
//! aborts all ranks and fails the test instead of blocking the run.
//!
//! ```ignore
//! fn my_backend(world: usize) -> Vec<Box<dyn xccl::transport::Transport>> { todo!() }
//! xccl::transport_conformance!(my_backend);
//! ```

mod paths;

pub use paths::{doorbell_wakes_a_parked_waiter, paths_carry_data, paths_follow_path_kinds};

use super::{Cmp, SignalOp, Transport};
use crate::error::Error;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds `world` connected ranks of one backend in this process.
pub type Factory = fn(usize) -> Vec<Box<dyn Transport>>;

/// The per-wait deadline used by the checks.
const WAIT: Duration = Duration::from_secs(60);
/// How long one check may take in all before the watchdog fails it.
pub(crate) const WATCHDOG: Duration = Duration::from_secs(240);

pub(crate) fn deadline() -> Instant {
    Instant::now() + WAIT
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

/// Runs `body` on every rank, each on its own thread, under a watchdog. A rank that panics or
/// a run that outlives `limit` aborts every rank and fails with a message naming the rank.
pub fn run_ranks<F>(ranks: Vec<Box<dyn Transport>>, limit: Duration, body: F)
where
    F: Fn(&dyn Transport) + Send + Sync + 'static,
{
    let ranks: Vec<Arc<dyn Transport>> = ranks.into_iter().map(Arc::from).collect();
    let body = Arc::new(body);
    let (tx, rx) = mpsc::channel();
    for t in &ranks {
        let (t, body, tx) = (t.clone(), body.clone(), tx.clone());
        std::thread::Builder::new()
            .name(format!("rank-{}", t.rank()))
            .spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    body(&*t);
                    // The orderly end, on every backend: ranks finish at different times.
                    match t.close(deadline()) {
                        Ok(()) | Err(crate::Error::Aborted) => {}
                        Err(e) => panic!("close: {e}"),
                    }
                }));
                let _ = tx.send((t.rank(), r.map_err(|p| panic_message(&*p))));
            })
            .expect("spawning a rank thread");
    }
    let end = Instant::now() + limit;
    for _ in 0..ranks.len() {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok((_, Ok(()))) => {}
            Ok((rank, Err(msg))) => {
                ranks.iter().for_each(|t| t.abort());
                panic!("rank {rank} failed: {msg}");
            }
            Err(_) => {
                ranks.iter().for_each(|t| t.abort());
                panic!("ranks still running after {limit:?}: hang");
            }
        }
    }
}

/// A barrier over signal word `index`: every rank adds 1 to every rank's word, then waits
/// for `epoch * world` (epochs count from 1 on each use of the same word).
pub fn signal_barrier(t: &dyn Transport, index: usize, epoch: u64) {
    let n = t.world_size();
    for p in 0..n {
        t.signal(p, index, SignalOp::Add, 1).unwrap();
    }
    t.wait(index, Cmp::Ge, epoch * n as u64, deadline())
        .unwrap();
}

pub(crate) fn pattern(a: usize, b: usize, round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| ((a * 31 + b * 17 + round * 13 + k) as u8) ^ 0xA5)
        .collect()
}

/// Puts then signals, many rounds, every rank to every rank (itself included) with varying
/// sizes at odd offsets: a signal is never seen before the data it follows.
pub fn put_signal_ordering(world: usize, f: Factory) {
    const SLOT: usize = 4099;
    let rounds = if world >= 8 { 60 } else { 200 };
    run_ranks(f(world), WATCHDOG, move |t| {
        let (me, n) = (t.rank(), t.world_size());
        let win = t.register(n * 2 * SLOT).unwrap();
        let len_of = |src: usize, dst: usize, r: usize| 1 + (r * 7919 + src * 131 + dst) % SLOT;
        let mut got = vec![0u8; SLOT];
        for r in 0..rounds {
            for p in 0..n {
                if r >= 2 {
                    t.wait(n + p, Cmp::Ge, (r - 1) as u64, deadline()).unwrap();
                }
                let data = pattern(me, p, r, len_of(me, p, r));
                t.put_signal(
                    p,
                    &win,
                    (me * 2 + r % 2) * SLOT,
                    &data,
                    me,
                    SignalOp::Add,
                    1,
                )
                .unwrap();
            }
            for s in 0..n {
                t.wait(s, Cmp::Ge, (r + 1) as u64, deadline()).unwrap();
                let len = len_of(s, me, r);
                t.read_local(&win, (s * 2 + r % 2) * SLOT, &mut got[..len])
                    .unwrap();
                assert!(
                    got[..len] == pattern(s, me, r, len)[..],
                    "round {r}: data from {s} seen before its signal or corrupted"
                );
                t.signal(s, n + me, SignalOp::Add, 1).unwrap();
            }
        }
    });
}

/// A vectored put lands its parts end to end (empty parts included, pieces larger than a
/// frame too), every rank to every rank, observed after the signal that follows; a range
/// past the window is refused before anything is written.
pub fn put_vectored_lands_contiguously(world: usize, f: Factory) {
    const SLOT: usize = (1 << 20) + 8192;
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let win = t.register(n * SLOT).unwrap();
        let lens = [7usize, 0, 3000, (1 << 20) + 5, 1, 0, 1086];
        let total: usize = lens.iter().sum();
        for p in 0..n {
            let data = pattern(me, p, 0, total);
            let mut parts = Vec::new();
            let mut at = 0;
            for &l in &lens {
                parts.push(&data[at..at + l]);
                at += l;
            }
            t.put_vectored(p, &win, me * SLOT + 1, &parts).unwrap();
            t.signal(p, me, SignalOp::Add, 1).unwrap();
            let r = t.put_vectored(p, &win, n * SLOT - 10, &[&[0u8; 8][..], &[0u8; 3][..]]);
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        }
        let mut got = vec![0u8; total + 2];
        for s in 0..n {
            t.wait(s, Cmp::Ge, 1, deadline()).unwrap();
            t.read_local(&win, s * SLOT, &mut got).unwrap();
            assert_eq!(got[0], 0, "byte before the range from {s}");
            assert!(
                got[1..=total] == pattern(s, me, 0, total)[..],
                "parts from {s}"
            );
            assert_eq!(got[total + 1], 0, "byte after the range from {s}");
        }
        let tail = t.read_local(&win, n * SLOT - 10, &mut got[..10]);
        tail.unwrap();
        assert!(
            got[..10].iter().all(|&b| b == 0),
            "refused put wrote something"
        );
    });
}

/// `get` reads what each peer wrote into its own window.
pub fn get_reads_peer_memory(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let win = t.register(10_007).unwrap();
        t.write_local(&win, 0, &pattern(me, 0, 0, 10_007)).unwrap();
        signal_barrier(t, 0, 1);
        let mut out = vec![0u8; 10_007];
        for p in 0..n {
            t.get(p, &win, 0, &mut out).unwrap();
            assert_eq!(out, pattern(p, 0, 0, 10_007), "get from rank {p}");
            let mut part = [0u8; 3];
            t.get(p, &win, 10_004, &mut part).unwrap();
            assert_eq!(&part[..], &pattern(p, 0, 0, 10_007)[10_004..]);
            // A mapped path reads the same bytes in place.
            let path = t.path(p, &win).unwrap();
            if path.is_mapped() {
                // SAFETY: written before the barrier above; nobody writes it before the one
                // below.
                let seen = unsafe { path.rows(10_000, 7) }.unwrap();
                assert_eq!(seen, &pattern(p, 0, 0, 10_007)[10_000..]);
            }
        }
        signal_barrier(t, 0, 2);
    });
}

/// After `flush`, earlier puts are complete at the peer.
pub fn flush_completes_puts(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        let win = t.register(1 << 20).unwrap();
        for round in 0..20 {
            let data = pattern(me, next, round, 1 << 20);
            t.put(next, &win, 0, &data).unwrap();
            t.flush(next).unwrap();
            t.signal(next, 1, SignalOp::Add, 1).unwrap();
            t.wait(1, Cmp::Ge, round as u64 + 1, deadline()).unwrap();
            let mut got = vec![0u8; 1 << 20];
            t.read_local(&win, 0, &mut got).unwrap();
            assert!(got == pattern(prev, me, round, 1 << 20), "round {round}");
            signal_barrier(t, 2, round as u64 + 1);
        }
        assert!(matches!(t.flush(n), Err(Error::InvalidArgument(_))));
    });
}

/// Signals are 64-bit counters: concurrent adds all count, set stores, every comparison works.
pub fn signals_are_counters(world: usize, f: Factory) {
    const ADDS: u64 = 500;
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        for _ in 0..ADDS {
            t.signal(0, 5, SignalOp::Add, me as u64 + 1).unwrap();
        }
        let total = ADDS * (n * (n + 1) / 2) as u64;
        if me == 0 {
            let v = t.wait(5, Cmp::Ge, total, deadline()).unwrap();
            assert_eq!(v, total);
            assert_eq!(t.signal_value(5).unwrap(), total);
        }
        // Set: each rank stores a distinctive value into its successor's word.
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        t.signal(next, 7, SignalOp::Set, 1_000 + me as u64).unwrap();
        let want = 1_000 + prev as u64;
        assert_eq!(t.wait(7, Cmp::Eq, want, deadline()).unwrap(), want);
        assert_eq!(t.wait(7, Cmp::Ge, want, deadline()).unwrap(), want);
        assert_eq!(t.wait(7, Cmp::Gt, want - 1, deadline()).unwrap(), want);
        assert_eq!(t.wait(7, Cmp::Le, want, deadline()).unwrap(), want);
        assert_eq!(t.wait(7, Cmp::Lt, want + 1, deadline()).unwrap(), want);
        assert_eq!(t.wait(7, Cmp::Ne, 0, deadline()).unwrap(), want);
        // Large values and wrapping adds stay 64-bit.
        t.signal(me, 8, SignalOp::Set, u64::MAX - 1).unwrap();
        t.signal(me, 8, SignalOp::Add, 3).unwrap();
        assert_eq!(t.signal_value(8).unwrap(), 1);
        signal_barrier(t, 9, 1);
        // Backends that count applied signals: a signal applied here moves the count past
        // what was read before it; the others say they keep none.
        match t.arrivals() {
            Some(seen) => {
                t.signal(me, 10, SignalOp::Add, 1).unwrap();
                assert!(t.wait_arrivals(seen, deadline()).unwrap() > seen);
                assert!(t.arrivals().unwrap() > seen);
                let later = t.arrivals().unwrap();
                let quiet = Instant::now() + Duration::from_millis(20);
                assert!(matches!(
                    t.wait_arrivals(later + 1_000_000, quiet),
                    Err(crate::Error::Timeout { .. })
                ));
            }
            None => assert!(matches!(
                t.wait_arrivals(0, deadline()),
                Err(crate::Error::InvalidUsage(_))
            )),
        }
        signal_barrier(t, 9, 2);
    });
}

/// A wait that cannot succeed ends with `Timeout` at its deadline, not before, not much after.
pub fn deadline_gives_timeout(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let start = Instant::now();
        let r = t.wait(3, Cmp::Ge, 1, start + Duration::from_millis(50));
        let took = start.elapsed();
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert!(
            took >= Duration::from_millis(50),
            "returned early after {took:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "returned late after {took:?}"
        );
        // A deadline already past still returns the value if the condition holds.
        assert_eq!(t.wait(3, Cmp::Ge, 0, start).unwrap(), 0);
    });
}

/// `abort` from another thread on rank 0 wakes every waiter on every rank with `Aborted`
/// within 100 ms; later waits and puts fail the same way at once.
pub fn abort_wakes_every_waiter(world: usize, f: Factory) {
    let aborted_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    run_ranks(f(world), WATCHDOG, move |t| {
        let me = t.rank();
        let win = t.register(64).unwrap();
        std::thread::scope(|s| {
            if me == 0 {
                let at = aborted_at.clone();
                s.spawn(move || {
                    // Gives the waiters time to reach the parked phase; the assertions hold
                    // whatever the timing.
                    std::thread::sleep(Duration::from_millis(300));
                    *at.lock().unwrap() = Some(Instant::now());
                    t.abort();
                });
            }
            let started = Instant::now();
            let r = t.wait(11, Cmp::Ge, 1, started + Duration::from_secs(30));
            let woke = Instant::now();
            assert!(matches!(r, Err(Error::Aborted)), "rank {me}: {r:?}");
            let at = aborted_at
                .lock()
                .unwrap()
                .expect("abort recorded before it is called");
            let lag = woke.saturating_duration_since(at.max(started));
            assert!(
                lag <= Duration::from_millis(100),
                "rank {me} woke {lag:?} after abort"
            );
        });
        let r = t.wait(12, Cmp::Ge, 0, deadline());
        assert!(matches!(r, Err(Error::Aborted)) || r.is_ok(), "{r:?}");
        assert!(matches!(
            t.wait(12, Cmp::Ge, 1, deadline()),
            Err(Error::Aborted)
        ));
        assert!(matches!(t.put(0, &win, 0, &[1]), Err(Error::Aborted)));
    });
}

/// Out-of-range peers, offsets, lengths and signal indices are `InvalidArgument`, checked with
/// overflow-safe arithmetic; a deregistered window is `InvalidUsage`.
pub fn bad_arguments_are_rejected(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let n = t.world_size();
        let ns = t.caps().num_signals;
        let win = t.register(100).unwrap();
        let inval =
            |r: crate::Result<()>| assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let mut buf = [0u8; 2];
        inval(t.put(0, &win, 99, &[0; 2]));
        inval(t.put(0, &win, usize::MAX, &[0]));
        inval(t.put(0, &win, 101, &[]));
        inval(t.put(n, &win, 0, &[0]));
        inval(t.put(usize::MAX, &win, 0, &[0]));
        inval(t.get(0, &win, 99, &mut buf));
        inval(t.get(0, &win, usize::MAX - 1, &mut buf));
        inval(t.read_local(&win, 100, &mut buf[..1]));
        inval(t.write_local(&win, usize::MAX, &buf));
        inval(t.signal(0, ns, SignalOp::Add, 1));
        inval(t.signal(n, 0, SignalOp::Add, 1));
        inval(t.wait(ns, Cmp::Ge, 0, deadline()).map(|_| ()));
        inval(t.signal_value(usize::MAX).map(|_| ()));
        // SAFETY: the call fails its range check before any slice is made.
        inval(unsafe { t.local_slice(&win, 1, 100) }.map(|_| ()));
        t.put(0, &win, 100, &[]).unwrap();
        let other = t.register(8).unwrap();
        t.deregister(other).unwrap();
        let r = t.put(0, &other, 0, &[1]);
        assert!(matches!(r, Err(Error::InvalidUsage(_))), "{r:?}");
        assert!(matches!(t.deregister(other), Err(Error::InvalidUsage(_))));
    });
}

/// Windows of 0, 1 and odd sizes carry data to their first and last byte.
pub fn window_sizes(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let next = (me + 1) % n;
        for (k, len) in [0usize, 1, 3, 4095, 4097, 65_537].into_iter().enumerate() {
            let win = t.register(len).unwrap();
            assert_eq!(win.len(), len);
            if len == 0 {
                t.put(next, &win, 0, &[]).unwrap();
                assert!(matches!(
                    t.put(next, &win, 0, &[1]),
                    Err(Error::InvalidArgument(_))
                ));
                t.signal(next, 4, SignalOp::Add, 1).unwrap();
            } else {
                let mut zero = vec![1u8; len];
                t.read_local(&win, 0, &mut zero).unwrap();
                assert!(
                    zero.iter().all(|&b| b == 0),
                    "fresh window of {len} bytes is not zeroed"
                );
                // Nobody writes into a window before every rank has looked at it.
                signal_barrier(t, 15, k as u64);
                t.put(next, &win, len - 1, &[me as u8 + 1]).unwrap();
                t.put(next, &win, 0, &[me as u8 + 101]).unwrap();
                t.signal(next, 4, SignalOp::Add, 1).unwrap();
            }
            t.wait(4, Cmp::Ge, k as u64 + 1, deadline()).unwrap();
            if len > 0 {
                let prev = (me + n - 1) % n;
                let mut b = [0u8; 1];
                t.read_local(&win, 0, &mut b).unwrap();
                if len > 1 {
                    assert_eq!(b[0], prev as u8 + 101);
                    t.read_local(&win, len - 1, &mut b).unwrap();
                }
                // With one byte, the later put (offset 0) wins.
                let want = if len > 1 {
                    prev as u8 + 1
                } else {
                    prev as u8 + 101
                };
                assert_eq!(b[0], want, "window of {len} bytes");
            }
        }
    });
}

/// A window of 256 MiB + 4099 bytes works end to end (addressing past 2^28, last byte included).
pub fn large_window(world: usize, f: Factory) {
    const LEN: usize = (256 << 20) + 4099;
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        let win = t.register(LEN).unwrap();
        let tail = pattern(me, next, 0, 4096);
        t.put(next, &win, LEN - 4096, &tail).unwrap();
        t.put(next, &win, (1 << 28) - 8, &[me as u8; 8]).unwrap();
        t.put_signal(next, &win, 0, &[7], 6, SignalOp::Add, 1)
            .unwrap();
        t.wait(6, Cmp::Ge, 1, deadline()).unwrap();
        // SAFETY: the predecessor's puts completed before its signal, which we waited for, and
        // nobody writes this window afterwards.
        let got = unsafe { t.local_slice(&win, LEN - 4096, 4096) }.unwrap();
        assert!(got == &pattern(prev, me, 0, 4096)[..]);
        let mut mid = [0u8; 8];
        t.read_local(&win, (1 << 28) - 8, &mut mid).unwrap();
        assert_eq!(mid, [prev as u8; 8]);
        signal_barrier(t, 10, 1);
    });
}

/// Many windows live at once, each addressed independently.
pub fn many_windows(world: usize, f: Factory) {
    const COUNT: usize = 48;
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        let wins: Vec<_> = (0..COUNT).map(|k| t.register(64 + k).unwrap()).collect();
        for (k, w) in wins.iter().enumerate() {
            t.put(next, w, k, &[(me * COUNT + k) as u8]).unwrap();
        }
        t.signal(next, 13, SignalOp::Add, 1).unwrap();
        t.wait(13, Cmp::Ge, 1, deadline()).unwrap();
        for (k, w) in wins.iter().enumerate() {
            let mut b = [0u8; 1];
            t.read_local(w, k, &mut b).unwrap();
            assert_eq!(b[0], (prev * COUNT + k) as u8, "window {k}");
        }
        signal_barrier(t, 14, 1);
    });
}

/// Ranks that register different sizes all get `ConfigMismatch`, and the next matching
/// registration still works.
pub fn register_mismatch(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let me = t.rank();
        let r = t.register(if me == 0 { 100 } else { 200 });
        if t.world_size() > 1 {
            assert!(
                matches!(r, Err(Error::ConfigMismatch(_))),
                "rank {me}: {r:?}"
            );
        } else {
            assert_eq!(r.unwrap().len(), 100);
        }
        let w = t.register(300).unwrap();
        assert_eq!(w.len(), 300);
    });
}

/// A window deregistered while another thread of the same rank still copies into it (writes,
/// reads, puts to itself): the copies in flight finish on live memory, later ones fail with
/// `InvalidUsage`, and nothing crashes.
pub fn deregister_races_with_access(world: usize, f: Factory) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const LEN: usize = 4 << 20;
    run_ranks(f(world), WATCHDOG, |t| {
        let me = t.rank();
        for round in 0..3 {
            let win = t.register(LEN).unwrap();
            let copies = AtomicUsize::new(0);
            std::thread::scope(|s| {
                let copier = s.spawn(|| {
                    let data = vec![round as u8; LEN];
                    let mut back = vec![0u8; LEN];
                    for i in 0.. {
                        let r = match i % 3 {
                            0 => t.write_local(&win, 0, &data),
                            1 => t.read_local(&win, 0, &mut back),
                            _ => t.put(me, &win, 0, &data),
                        };
                        match r {
                            Ok(()) => copies.fetch_add(1, Ordering::SeqCst),
                            Err(Error::InvalidUsage(_)) => return i,
                            Err(e) => panic!("copy {i} after deregistration: {e}"),
                        };
                    }
                    unreachable!()
                });
                // Deregister while copies run (at least a few have completed by then).
                while copies.load(Ordering::SeqCst) < 2 + round {
                    std::hint::spin_loop();
                }
                t.deregister(win).unwrap();
                assert!(copier.join().unwrap() >= 2);
            });
        }
        // The handle is refused from now on, on every path.
        let w = t.register(64).unwrap();
        t.deregister(w).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(
            t.read_local(&w, 0, &mut b),
            Err(Error::InvalidUsage(_))
        ));
        assert!(matches!(t.put(me, &w, 0, &b), Err(Error::InvalidUsage(_))));
        assert!(matches!(t.deregister(w), Err(Error::InvalidUsage(_))));
    });
}

/// `close` is collective: one rank closing alone times out at its deadline (saying how long it
/// waited), and completes once every rank closes.
pub fn close_waits_for_every_rank(world: usize, f: Factory) {
    let others_wait = Arc::new(std::sync::Barrier::new(world));
    run_ranks(f(world), WATCHDOG, move |t| {
        if t.rank() == 0 {
            let limit = Duration::from_millis(200);
            let r = t.close(Instant::now() + limit);
            match (world, r) {
                (1, Ok(())) => {}
                (_, Err(Error::Timeout { waited, .. })) => {
                    assert!(waited >= limit, "waited {waited:?}");
                    assert!(waited < limit + Duration::from_secs(5), "waited {waited:?}");
                }
                (_, other) => panic!("rank 0 closing alone: {other:?}"),
            }
            // Closed on this rank, whatever the outcome.
            assert!(matches!(
                t.signal(0, 0, SignalOp::Add, 1),
                Err(Error::InvalidUsage(_))
            ));
        }
        // The others close only after rank 0's close has timed out (run_ranks closes them).
        others_wait.wait();
    });
}

/// Splits `parents` (ranks of one backend, built in this process) into its even and its odd
/// ranks with [`Transport::split`], each rank on its own thread, and returns the even group's
/// transports by new rank: run the suite on them to check a backend's split. Every parent
/// rank stays alive, and keeps putting and signalling on the parent from a thread of its
/// own, until the returned transports (the odd group's too) are dropped.
pub fn evens_of(parents: Vec<Box<dyn Transport>>) -> Vec<Box<dyn Transport>> {
    use super::GroupSpec;
    let n = parents.len();
    // Fresh group ids: suites running side by side in one process never meet.
    let mut id = [0u8; 16];
    crate::bootstrap::fill_random(&mut id);
    let id = u64::from_le_bytes(id[..8].try_into().expect("8 bytes"));
    // One all-gather per group: each member's words by new rank.
    type Gather = (Mutex<Vec<Option<[u64; 2]>>>, std::sync::Condvar);
    let gathers: Arc<[Gather; 2]> = Arc::new([
        (Mutex::new(vec![None; n.div_ceil(2)]), Default::default()),
        (Mutex::new(vec![None; n / 2]), Default::default()),
    ]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = parents
        .into_iter()
        .enumerate()
        .map(|(r, parent)| {
            let gathers = gathers.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let colour = r % 2;
                let group = GroupSpec {
                    members: (0..n).filter(|m| m % 2 == colour).collect(),
                    rank: r / 2,
                    id: [id, colour as u64],
                };
                let (slots, cv) = &gathers[colour];
                let mut exchange = |words: [u64; 2]| {
                    let mut all = slots.lock().unwrap_or_else(|p| p.into_inner());
                    all[group.rank] = Some(words);
                    cv.notify_all();
                    let (all, _) = cv
                        .wait_timeout_while(all, WAIT, |all| all.iter().any(Option::is_none))
                        .unwrap_or_else(|p| p.into_inner());
                    all.iter()
                        .map(|w| w.ok_or(Error::InvalidUsage("a member never came".into())))
                        .collect()
                };
                let child = parent.split(&group, &mut exchange).expect("split");
                let parent: Arc<dyn Transport> = Arc::from(parent);
                let busy = std::thread::spawn({
                    let (parent, stop) = (parent.clone(), stop.clone());
                    move || keep_busy(&*parent, &stop)
                });
                (colour, group.rank, child, (parent, busy))
            })
        })
        .collect();
    let done: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("a splitting rank"))
        .collect();
    // The parents and their threads go when the last child does.
    let parents = Arc::new(Parents {
        stop,
        ranks: Mutex::new(done.iter().map(|(.., p)| p.0.clone()).collect()),
        threads: Mutex::new(Vec::new()),
    });
    let mut evens = Vec::new();
    for (colour, rank, child, (_, busy)) in done {
        parents
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(busy);
        let child: Box<dyn Transport> = Box::new(WithParent {
            child,
            _parents: parents.clone(),
        });
        if colour == 0 {
            evens.push((rank, child));
        }
    }
    evens.sort_by_key(|(rank, _)| *rank);
    evens.into_iter().map(|(_, t)| t).collect()
}

/// Traffic on a parent while its children are tested: every parent rank registers a window
/// (collectively) and then puts into its right neighbour and signals it, paced, until told
/// to stop or the parent fails.
fn keep_busy(parent: &dyn Transport, stop: &std::sync::atomic::AtomicBool) {
    let (me, n) = (parent.rank(), parent.world_size());
    let Ok(win) = parent.register(4096) else {
        return;
    };
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let to = (me + 1) % n;
        let ok = parent.put(to, &win, 0, &i.to_le_bytes()).is_ok()
            && parent.signal(to, 0, SignalOp::Add, 1).is_ok()
            && parent.signal_value(0).is_ok();
        if !ok {
            return;
        }
        i += 1;
        // Pacing of background traffic, not synchronisation.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The parents of a split and their busy threads, stopped and dropped with the last child.
struct Parents {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ranks: Mutex<Vec<Arc<dyn Transport>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Parents {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        self.ranks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A child transport that keeps its parents alive: every call goes to the child.
struct WithParent {
    child: Box<dyn Transport>,
    _parents: Arc<Parents>,
}

impl Transport for WithParent {
    fn rank(&self) -> usize {
        self.child.rank()
    }
    fn world_size(&self) -> usize {
        self.child.world_size()
    }
    fn caps(&self) -> super::Caps {
        self.child.caps()
    }
    fn register(&self, len: usize) -> crate::Result<super::Window> {
        self.child.register(len)
    }
    fn deregister(&self, win: super::Window) -> crate::Result<()> {
        self.child.deregister(win)
    }
    fn put(&self, peer: usize, win: &super::Window, off: usize, data: &[u8]) -> crate::Result<()> {
        self.child.put(peer, win, off, data)
    }
    fn put_vectored(
        &self,
        peer: usize,
        win: &super::Window,
        off: usize,
        parts: &[&[u8]],
    ) -> crate::Result<()> {
        self.child.put_vectored(peer, win, off, parts)
    }
    fn get(
        &self,
        peer: usize,
        win: &super::Window,
        off: usize,
        out: &mut [u8],
    ) -> crate::Result<()> {
        self.child.get(peer, win, off, out)
    }
    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> crate::Result<()> {
        self.child.signal(peer, index, op, value)
    }
    fn put_signal(
        &self,
        peer: usize,
        win: &super::Window,
        off: usize,
        data: &[u8],
        index: usize,
        op: SignalOp,
        value: u64,
    ) -> crate::Result<()> {
        self.child
            .put_signal(peer, win, off, data, index, op, value)
    }
    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> crate::Result<u64> {
        self.child.wait(index, cmp, value, deadline)
    }
    fn signal_value(&self, index: usize) -> crate::Result<u64> {
        self.child.signal_value(index)
    }
    fn flush(&self, peer: usize) -> crate::Result<()> {
        self.child.flush(peer)
    }
    fn abort(&self) {
        self.child.abort()
    }
    fn close(&self, deadline: Instant) -> crate::Result<()> {
        self.child.close(deadline)
    }
    fn local_mem(&self, win: &super::Window) -> crate::Result<super::MappedMem> {
        self.child.local_mem(win)
    }
    fn path_kind(&self, peer: usize) -> crate::Result<super::PathKind> {
        self.child.path_kind(peer)
    }
    fn map_peer(
        &self,
        peer: usize,
        win: &super::Window,
    ) -> crate::Result<Option<super::MappedMem>> {
        self.child.map_peer(peer, win)
    }
    fn arrivals(&self) -> Option<u64> {
        self.child.arrivals()
    }
    fn wait_arrivals(&self, seen: u64, deadline: Instant) -> crate::Result<u64> {
        self.child.wait_arrivals(seen, deadline)
    }
}

/// Instantiates the whole suite for a backend factory (a function in the calling module),
/// once per world size 1, 2, 3 and 8, as `#[test]`s grouped in one module per check; or,
/// with `transport_conformance!(factory; worlds 1, 2)`, one `#[test]` per check running the
/// given world sizes in turn.
#[macro_export]
macro_rules! transport_conformance {
    ($factory:ident; worlds $($world:literal),+) => {
        $crate::transport_conformance!(@each $factory; [$($world),+];
            put_signal_ordering, put_vectored_lands_contiguously, get_reads_peer_memory,
            flush_completes_puts,
            signals_are_counters, deadline_gives_timeout, abort_wakes_every_waiter,
            bad_arguments_are_rejected, window_sizes, large_window, many_windows,
            register_mismatch, deregister_races_with_access, close_waits_for_every_rank,
            paths_follow_path_kinds, paths_carry_data, doorbell_wakes_a_parked_waiter);
    };
    (@each $factory:ident; $worlds:tt; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                for world in $worlds {
                    $crate::transport::conformance::$check(world, $factory)
                }
            }
        )*
    };
    ($factory:ident) => {
        $crate::transport_conformance!(@checks $factory;
            put_signal_ordering, put_vectored_lands_contiguously, get_reads_peer_memory,
            flush_completes_puts,
            signals_are_counters, deadline_gives_timeout, abort_wakes_every_waiter,
            bad_arguments_are_rejected, window_sizes, large_window, many_windows,
            register_mismatch, deregister_races_with_access, close_waits_for_every_rank,
            paths_follow_path_kinds, paths_carry_data, doorbell_wakes_a_parked_waiter);
    };
    (@checks $factory:ident; $($check:ident),* $(,)?) => {
        $(
            mod $check {
                use super::*;
                #[test]
                fn world_1() { $crate::transport::conformance::$check(1, $factory) }
                #[test]
                fn world_2() { $crate::transport::conformance::$check(2, $factory) }
                #[test]
                fn world_3() { $crate::transport::conformance::$check(3, $factory) }
                #[test]
                fn world_8() { $crate::transport::conformance::$check(8, $factory) }
            }
        )*
    };
}
