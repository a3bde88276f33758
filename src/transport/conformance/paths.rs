//! Conformance checks of the per-peer path API: path kinds group ranks like hosts, every path
//! kind carries cached, streaming and vectored puts and one-word publishes, mapped paths read
//! rows in place, and the doorbell wakes a parked waiter.

use super::{deadline, pattern, run_ranks, signal_barrier, Factory, WATCHDOG};
use crate::error::Error;
use crate::transport::{Cmp, Doorbell, PathKind, SignalOp, Stores, Transport};

/// Every rank's view of every rank's path kind, gathered on every rank (row = viewer).
fn kind_matrix(t: &dyn Transport) -> Vec<Vec<PathKind>> {
    let n = t.world_size();
    let win = t.register(n * n).unwrap();
    let row: Vec<u8> = (0..n)
        .map(|p| match t.path_kind(p).unwrap() {
            PathKind::Mapped => 1,
            PathKind::Network => 2,
        })
        .collect();
    for p in 0..n {
        t.put(p, &win, t.rank() * n, &row).unwrap();
    }
    signal_barrier(t, 0, 1);
    let mut all = vec![0u8; n * n];
    t.read_local(&win, 0, &mut all).unwrap();
    // Another word: a fast rank's second round on word 0 could stand in for a slow rank's
    // first, whose puts may still be on the way.
    signal_barrier(t, 2, 1);
    t.deregister(win).unwrap();
    all.chunks(n)
        .map(|r| {
            r.iter()
                .map(|&k| match k {
                    1 => PathKind::Mapped,
                    2 => PathKind::Network,
                    other => panic!("kind byte {other}: a put did not land"),
                })
                .collect()
        })
        .collect()
}

/// Path kinds between distinct ranks are symmetric and transitive (ranks that map each other
/// form groups, like processes on one host), `maps_every_peer` agrees with them, and a path
/// is built with the kind its peer has (a mapped path maps a window of the right size).
pub fn paths_follow_path_kinds(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let m = kind_matrix(t);
        let mapped = |a: usize, b: usize| m[a][b] == PathKind::Mapped;
        for a in 0..n {
            for b in (0..n).filter(|&b| b != a) {
                assert_eq!(mapped(a, b), mapped(b, a), "ranks {a} and {b} disagree");
                for c in (0..n).filter(|&c| c != a && c != b) {
                    if mapped(a, b) && mapped(b, c) {
                        assert!(mapped(a, c), "{a}~{b}~{c} but {a} does not map {c}");
                    }
                }
            }
        }
        let every = (0..n).filter(|&p| p != me).all(|p| mapped(me, p));
        assert_eq!(t.maps_every_peer().unwrap(), every);
        let win = t.register(4096).unwrap();
        for (p, &kind) in m[me].iter().enumerate() {
            let path = t.path(p, &win).unwrap();
            assert_eq!(path.peer(), p);
            assert_eq!(path.kind(), kind, "path to {p}");
            assert_eq!(t.map_peer(p, &win).unwrap().is_some(), path.is_mapped());
        }
        assert!(matches!(t.path(n, &win), Err(Error::InvalidArgument(_))));
        assert!(matches!(t.path_kind(n), Err(Error::InvalidArgument(_))));
        signal_barrier(t, 1, 1);
        t.deregister(win).unwrap();
    });
}

/// Over every path (itself included): a cached put, a streaming put, a vectored put and a
/// published word land where they were aimed, visible after the path's signal; a mapped path's
/// row view reads them in place, a network path refuses it; ranges are checked.
pub fn paths_carry_data(world: usize, f: Factory) {
    const SLOT: usize = 3 * 4096;
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let win = t.register(n * SLOT).unwrap();
        let paths = t.paths(&win).unwrap();
        for (p, path) in paths.iter().enumerate() {
            let at = me * SLOT;
            let data = pattern(me, p, 1, SLOT - 8);
            path.put(at, &data[..1000], Stores::Cached).unwrap();
            path.put(at + 1000, &data[1000..5000], Stores::Streaming)
                .unwrap();
            path.put_vectored(at + 5000, &[&data[5000..5003], &data[5003..]])
                .unwrap();
            path.publish(at + SLOT - 8, 0xF00D + me as u64).unwrap();
            path.signal(16 + me, SignalOp::Set, 1).unwrap();
            assert!(matches!(
                path.put(n * SLOT - 2, &[0; 3], Stores::Cached),
                Err(Error::InvalidArgument(_))
            ));
            assert!(path.publish(n * SLOT, 1).is_err());
        }
        let own = t.local_mem(&win).unwrap();
        for (src, path) in paths.iter().enumerate() {
            t.wait(16 + src, Cmp::Ge, 1, deadline()).unwrap();
            let mut got = vec![0u8; SLOT - 8];
            t.read_local(&win, src * SLOT, &mut got).unwrap();
            assert!(
                got == pattern(src, me, 1, SLOT - 8),
                "bytes from rank {src}"
            );
            let word = src * SLOT + SLOT - 8;
            assert_eq!(own.observe(word).unwrap(), 0xF00D + src as u64);
            let _ = path;
        }
        signal_barrier(t, 1, 1);
        for (p, path) in paths.iter().enumerate() {
            // SAFETY: written before the barrier above, not rewritten before the one below.
            let view = unsafe { path.rows(me * SLOT, 64) };
            match path.kind() {
                PathKind::Mapped => assert_eq!(view.unwrap(), &pattern(me, p, 1, 64)[..]),
                PathKind::Network => assert!(matches!(view, Err(Error::InvalidUsage(_)))),
            }
        }
        signal_barrier(t, 1, 2);
        drop(paths);
        t.deregister(win).unwrap();
    });
}

/// A waiter armed on its doorbell wakes when each peer signals and rings it, whatever the
/// path between them (mapped peers ring only an armed waiter, network ones may count on the
/// backend's arrival count).
pub fn doorbell_wakes_a_parked_waiter(world: usize, f: Factory) {
    run_ranks(f(world), WATCHDOG, |t| {
        let (me, n) = (t.rank(), t.world_size());
        let win = t.register(4096).unwrap();
        let bell = Doorbell::new(t, &win, 64, 30).unwrap();
        assert!(Doorbell::new(t, &win, 4093, 30).is_err(), "unaligned count");
        if me == 0 {
            let armed = bell.arm().unwrap();
            signal_barrier(t, 31, 1);
            loop {
                let seen = bell.seen().unwrap();
                if t.signal_value(32).unwrap() == n as u64 - 1 {
                    break;
                }
                bell.wait(seen, deadline()).unwrap();
            }
            drop(armed);
        } else {
            signal_barrier(t, 31, 1);
            t.signal(0, 32, SignalOp::Add, 1).unwrap();
            bell.ring(&t.path(0, &win).unwrap()).unwrap();
        }
        signal_barrier(t, 31, 2);
        t.deregister(win).unwrap();
    });
}
