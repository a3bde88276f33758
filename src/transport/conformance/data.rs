//! Data checks: puts land in order before their signals, vectored puts land contiguously,
//! gets read peers' memory, flush completes puts.

use super::*;

/// Puts then signals, many rounds, every rank to every rank (itself included) with varying
/// sizes at odd offsets, each message in two puts with a signal each, the first held for the
/// second (`put_signal_then`): a signal is never seen before the data it follows, and a held
/// one arrives.
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
                let (first, second) = data.split_at(data.len() / 2);
                let at = (me * 2 + r % 2) * SLOT;
                t.put_signal_then(p, &win, at, first, me, SignalOp::Add, 1)
                    .unwrap();
                t.put_signal(p, &win, at + first.len(), second, me, SignalOp::Add, 1)
                    .unwrap();
            }
            for s in 0..n {
                t.wait(s, Cmp::Ge, 2 * (r + 1) as u64, deadline()).unwrap();
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

/// Every rank puts into one target's window in turn, each into its own slot and each followed
/// by an add to the same signal word (puts and signals fused or not, by turns): on a backend
/// whose peers arrive by different paths (shared memory from the target's host, the network
/// from others) every piece of data is in place once the word counts every writer.
pub fn converging_puts_share_one_word(world: usize, f: Factory) {
    const SLOT: usize = 3001;
    let rounds = if world >= 8 { 24 } else { 60 };
    run_ranks(f(world), WATCHDOG, move |t| {
        let (me, n) = (t.rank(), t.world_size());
        let win = t.register(n * SLOT).unwrap();
        let len_of = |src: usize, r: usize| 1 + (r * 613 + src * 97) % SLOT;
        let mut got = vec![0u8; SLOT];
        let mut targeted = 0u64;
        for r in 0..rounds {
            let target = r % n;
            let data = pattern(me, target, r, len_of(me, r));
            if (me + r) % 2 == 0 {
                t.put_signal(target, &win, me * SLOT, &data, 0, SignalOp::Add, 1)
                    .unwrap();
            } else {
                t.put(target, &win, me * SLOT, &data).unwrap();
                t.signal(target, 0, SignalOp::Add, 1).unwrap();
            }
            if me == target {
                targeted += 1;
                t.wait(0, Cmp::Ge, targeted * n as u64, deadline()).unwrap();
                for s in 0..n {
                    let len = len_of(s, r);
                    t.read_local(&win, s * SLOT, &mut got[..len]).unwrap();
                    assert!(
                        got[..len] == pattern(s, me, r, len)[..],
                        "round {r}: the data from rank {s} is not in place once counted"
                    );
                }
                for p in 0..n {
                    t.signal(p, 1, SignalOp::Add, 1).unwrap();
                }
            }
            // The slots are free again once the target has read them.
            t.wait(1, Cmp::Ge, (r + 1) as u64, deadline()).unwrap();
        }
    });
}
