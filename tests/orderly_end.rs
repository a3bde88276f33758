//! The end of a job, across real processes on the shared-memory and TCP backends: ranks that
//! finish at different times all complete (what a slow rank still sends to one that closed
//! early is applied), and a rank that leaves without closing is `PeerFailed` on the others.

#[macro_use]
mod common;

use common::{assert_no_leaks, rank_comm, Job, SERIAL};
use std::time::{Duration, Instant};
use xccl::transport::{Cmp, SignalOp};
use xccl::Error;

/// Bytes the late rank puts into every other rank's window as its last call.
const LATE_BYTES: usize = 1 << 20;

scenarios! {
    "late_last_put" => late_last_put,
    "leave_without_close" => leave_without_close,
}

fn late_pattern(from: usize, to: usize) -> Vec<u8> {
    (0..LATE_BYTES)
        .map(|k| (k as u8) ^ (from as u8 * 37) ^ (to as u8 * 11))
        .collect()
}

/// The last rank sleeps 2 s, then puts 1 MiB and a signal into every other rank, which has
/// closed long before and never waits for it; then it closes. Every rank must complete, and
/// the early ranks must have applied the late data by the time their `close` returns.
fn late_last_put() {
    let comm = rank_comm(Duration::from_secs(30));
    let (me, n) = (comm.rank(), comm.world_size());
    let t = comm.transport();
    let win = comm.register(LATE_BYTES).unwrap();
    comm.barrier().unwrap();
    let late = n - 1;
    if me == late {
        std::thread::sleep(Duration::from_secs(2)); // the slow rank of the scenario
        for peer in (0..n).filter(|&p| p != me) {
            t.put_signal(peer, &win, 0, &late_pattern(me, peer), 0, SignalOp::Add, 1)
                .expect("a put to a rank that closed early is legal until it has left");
        }
    }
    let start = Instant::now();
    comm.close().expect("close");
    if me != late {
        assert_eq!(t.signal_value(0).unwrap(), 1, "the late signal was applied");
        let mut got = vec![0u8; LATE_BYTES];
        t.read_local(&win, 0, &mut got).unwrap();
        assert!(got == late_pattern(late, me), "the late data was applied");
    }
    // Operations after close are the caller's mistake.
    match t.signal((me + 1) % n, 1, SignalOp::Add, 1) {
        Err(Error::InvalidUsage(_)) => {}
        other => panic!("signal after close: {other:?}"),
    }
    println!("CLOSED after {} ms", start.elapsed().as_millis());
}

/// Rank 1 exits without closing while rank 0 waits for a signal from it: rank 0 must get
/// `PeerFailed` naming rank 1.
fn leave_without_close() {
    let comm = rank_comm(Duration::from_secs(30));
    let _win = comm.register(4096).unwrap();
    comm.barrier().unwrap();
    if comm.rank() == 1 {
        println!("LEAVING");
        std::process::exit(0); // no close, no drop: the rank vanishes
    }
    let start = Instant::now();
    match comm
        .transport()
        .wait(0, Cmp::Ge, 1, Instant::now() + Duration::from_secs(30))
    {
        Err(Error::PeerFailed { rank: 1 }) => {}
        other => panic!("expected PeerFailed {{ rank: 1 }}, got {other:?}"),
    }
    println!("PEERFAILED 1 after {} ms", start.elapsed().as_millis());
    match comm.close() {
        Err(Error::PeerFailed { rank: 1 }) => {}
        other => panic!("close after a peer left: {other:?}"),
    }
}

fn run(backend: &str, ranks: usize, scenario: &str) -> Job {
    Job::start(ranks, scenario, &[("XCCL_BACKEND", backend.to_string())])
}

fn ranks_finishing_at_different_times_all_complete(backend: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let n = 3;
    let mut job = run(backend, n, "late_last_put");
    let st = job.wait_all(Duration::from_secs(120));
    for (r, s) in st.iter().enumerate() {
        assert!(s.success(), "{backend} rank {r}: {s:?}");
    }
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

fn leaving_without_close_is_peer_failed(backend: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = run(backend, 2, "leave_without_close");
    job.expect_from(&[1], "LEAVING", Duration::from_secs(60));
    let left_at = Instant::now();
    // Within the TCP peer timeout (3 s by default); a vanished process is seen at once.
    job.expect_from(&[0], "PEERFAILED 1", Duration::from_secs(3));
    eprintln!(
        "{backend}: PeerFailed seen {:?} after the rank left",
        left_at.elapsed()
    );
    let st = job.wait_all(Duration::from_secs(30));
    assert!(st.iter().all(|s| s.success()), "{backend}: {st:?}");
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

#[test]
fn shm_ranks_finishing_at_different_times_all_complete() {
    ranks_finishing_at_different_times_all_complete("shm");
}

#[test]
fn tcp_ranks_finishing_at_different_times_all_complete() {
    ranks_finishing_at_different_times_all_complete("tcp");
}

#[test]
fn shm_rank_leaving_without_close_is_peer_failed() {
    leaving_without_close_is_peer_failed("shm");
}

#[test]
fn tcp_rank_leaving_without_close_is_peer_failed() {
    leaving_without_close_is_peer_failed("tcp");
}
