//! Signal checks: counters, comparisons and deadlines, abort waking every waiter, and
//! bad arguments refused.

use super::*;

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
