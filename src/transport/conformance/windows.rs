//! Window checks: sizes, large and many windows, mismatched registration, deregistration
//! racing with access, and the orderly close.

use super::*;

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
