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

mod data;
mod paths;
mod signals;
mod split;
mod windows;

pub use data::{
    converging_puts_share_one_word, flush_completes_puts, get_reads_peer_memory,
    put_signal_ordering, put_vectored_lands_contiguously,
};
pub use paths::{doorbell_wakes_a_parked_waiter, paths_carry_data, paths_follow_path_kinds};
pub use signals::{
    abort_wakes_every_waiter, bad_arguments_are_rejected, deadline_gives_timeout,
    signals_are_counters,
};
pub use split::evens_of;
pub use windows::{
    close_waits_for_every_rank, deregister_races_with_access, large_window, many_windows,
    register_mismatch, window_sizes,
};

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

/// Instantiates the whole suite for a backend factory (a function in the calling module),
/// once per world size 1, 2, 3 and 8, as `#[test]`s grouped in one module per check; or,
/// with `transport_conformance!(factory; worlds 1, 2)`, one `#[test]` per check running the
/// given world sizes in turn.
#[macro_export]
macro_rules! transport_conformance {
    ($factory:ident; worlds $($world:literal),+) => {
        $crate::transport_conformance!(@each $factory; [$($world),+];
            put_signal_ordering, put_vectored_lands_contiguously, get_reads_peer_memory,
            flush_completes_puts, converging_puts_share_one_word,
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
            flush_completes_puts, converging_puts_share_one_word,
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
