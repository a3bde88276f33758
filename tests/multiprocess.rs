//! Multi-process tests over the shared-memory backend: real processes, a watchdog on each
//! job, and a leak check (no stray process, no segment left) at the end of each.

#[macro_use]
mod common;

use common::{assert_no_leaks, Job, SCENARIO, SERIAL};
use std::time::{Duration, Instant};
use xccl::transport::{Cmp, SignalOp};
use xccl::{Communicator, Error};

// Entry point of the rank processes (the test binary re-enters itself here).
scenarios! {
    "wait_forever" => wait_forever,
    "round_trips" => || round_trips(10_000),
    "mismatch" => mismatch,
    "fail_rank1" => fail_rank1,
    "ompi_ring" => ompi_ring,
}

/// Every rank announces READY, then waits for a signal nobody sends: it must end with
/// PeerFailed when a peer is killed.
fn wait_forever() {
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let _win = comm.register(1 << 20).unwrap();
    comm.barrier().unwrap();
    println!("READY");
    let r = comm
        .transport()
        .wait(0, Cmp::Ge, 1, Instant::now() + Duration::from_secs(60));
    match r {
        Err(Error::PeerFailed { rank }) => println!("PEERFAILED {rank}"),
        other => panic!("expected PeerFailed, got {other:?}"),
    }
}

/// Pairs (0,1), (2,3), ... do `n` put+signal round trips, checking the data each time.
fn round_trips(n: u64) {
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let t = comm.transport();
    let me = comm.rank();
    let partner = me ^ 1;
    let lease = comm.lease("round trips", 4096, 1, "").unwrap();
    let (win, sig) = (*lease.window(), lease.signals().start);
    comm.barrier().unwrap();
    for i in 1..=n {
        let word = (i * 1_000 + me as u64).to_le_bytes();
        let mine_first = me % 2 == 0;
        if mine_first {
            t.put_signal(partner, &win, 0, &word, sig, SignalOp::Add, 1)
                .unwrap();
        }
        t.wait(sig, Cmp::Ge, i, comm.deadline()).unwrap();
        let mut got = [0u8; 8];
        t.read_local(&win, 0, &mut got).unwrap();
        assert_eq!(
            u64::from_le_bytes(got),
            i * 1_000 + partner as u64,
            "round trip {i}"
        );
        if !mine_first {
            t.put_signal(partner, &win, 0, &word, sig, SignalOp::Add, 1)
                .unwrap();
        }
    }
    comm.barrier().unwrap();
    println!("DONE {n}");
}

/// Rank 0 asks for a different signal count: every rank must fail with ConfigMismatch.
fn mismatch() {
    let rank: usize = std::env::var("XCCL_RANK").unwrap().parse().unwrap();
    let r = Communicator::builder()
        .num_signals(if rank == 0 { 4096 } else { 8192 })
        .timeout(Duration::from_secs(30))
        .build();
    match r {
        Err(Error::ConfigMismatch(m)) => println!("MISMATCH {m}"),
        Err(e) => panic!("expected ConfigMismatch, got {e}"),
        Ok(_) => panic!("expected ConfigMismatch, got a communicator"),
    }
}

/// Rank 1 fails after setup; the others wait (they must be stopped by the launcher).
fn fail_rank1() {
    let comm = Communicator::from_env().unwrap();
    comm.barrier().unwrap();
    if comm.rank() == 1 {
        eprintln!("rank 1 fails on purpose");
        std::process::exit(3);
    }
    let _ = comm
        .transport()
        .wait(0, Cmp::Ge, 1, Instant::now() + Duration::from_secs(60));
    std::process::exit(0);
}

/// Started by mpirun: identity from OMPI_* alone, then a ring of put+signal and a barrier.
fn ompi_ring() {
    let info = xccl::bootstrap::detect(None).unwrap();
    assert_eq!(info.source, "openmpi");
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (me, n) = (comm.rank(), comm.world_size());
    let t = comm.transport();
    let win = comm.register(64).unwrap();
    t.put_signal(
        (me + 1) % n,
        &win,
        0,
        &(me as u64).to_le_bytes(),
        0,
        SignalOp::Add,
        1,
    )
    .unwrap();
    t.wait(0, Cmp::Ge, 1, comm.deadline()).unwrap();
    let mut got = [0u8; 8];
    t.read_local(&win, 0, &mut got).unwrap();
    assert_eq!(u64::from_le_bytes(got), ((me + n - 1) % n) as u64);
    comm.barrier().unwrap();
    println!("OMPI_OK rank {me} of {n}");
}

#[test]
fn sigkill_of_one_rank_fails_the_others_within_5s() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(4, "wait_forever", &[]);
    job.expect_from(&[0, 1, 2, 3], "READY", Duration::from_secs(60));
    let killed_at = Instant::now();
    job.kill(2);
    job.expect_from(&[0, 1, 3], "PEERFAILED 2", Duration::from_secs(5));
    let took = killed_at.elapsed();
    let st = job.wait_all(Duration::from_secs(30));
    for r in [0, 1, 3] {
        assert!(st[r].success(), "rank {r}: {:?}", st[r]);
    }
    assert!(took <= Duration::from_secs(5), "PeerFailed took {took:?}");
    eprintln!("survivors saw PeerFailed within {took:?} of SIGKILL");
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

#[test]
fn sigkill_of_every_rank_leaves_no_segment() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(4, "wait_forever", &[]);
    job.expect_from(&[0, 1, 2, 3], "READY", Duration::from_secs(60));
    // The ranks really hold segments (so the check below means something).
    for c in &job.children {
        assert!(
            common::xccl_memfds(c.id()) > 0,
            "rank pid {} holds no xccl segment",
            c.id()
        );
    }
    let mark = job.mark.clone();
    job.kill_all();
    assert_no_leaks(&mark);
}

#[test]
fn eight_ranks_on_two_cores_do_10k_round_trips_each() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(8, "round_trips", &[]);
    let start = Instant::now();
    let st = job.wait_all(Duration::from_secs(300));
    for (r, s) in st.iter().enumerate() {
        assert!(s.success(), "rank {r}: {s:?}");
    }
    eprintln!("8 ranks x 10,000 round trips took {:?}", start.elapsed());
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

#[test]
fn config_mismatch_fails_every_rank() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(3, "mismatch", &[]);
    job.expect_from(&[0, 1, 2], "MISMATCH", Duration::from_secs(60));
    let st = job.wait_all(Duration::from_secs(30));
    assert!(st.iter().all(|s| s.success()), "{st:?}");
}

#[test]
fn launcher_stops_the_other_ranks_when_one_fails() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mark = format!("launcher-{}", xccl::bootstrap::random_job_id());
    let mut spec = xccl::launch::LaunchSpec::new(
        3,
        std::env::current_exe().unwrap(),
        common::worker_args().into_iter().map(Into::into).collect(),
    );
    spec.env = vec![
        (SCENARIO.into(), "fail_rank1".into()),
        (common::MARK.into(), mark.clone().into()),
    ];
    // The launcher's own limit stands in for a watchdog: past it every rank is stopped.
    spec.timeout = Some(Duration::from_secs(45));
    let outcome = xccl::launch::launch(&spec).expect("launch");
    assert!(!outcome.timed_out, "the launcher did not stop the ranks");
    assert_eq!(outcome.first_failure, Some(1), "{:?}", outcome.statuses);
    assert_eq!(
        outcome.exit_code(),
        3,
        "the launch should end with the failing rank's code"
    );
    assert_no_leaks(&mark);
}

#[test]
fn mpirun_ranks_find_each_other_from_ompi_variables() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mpirun = ["mpirun.openmpi", "mpirun"].into_iter().find(|m| {
        std::process::Command::new(m)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(mpirun) = mpirun else {
        assert!(
            !common::skips_forbidden(),
            "mpirun is missing and XCCL_REQUIRE_ALL=1"
        );
        eprintln!("SKIPPED: Open MPI's mpirun is not installed (apt-get install openmpi-bin)");
        return;
    };
    let mark = format!("mpirun-{}", xccl::bootstrap::random_job_id());
    let mut cmd = std::process::Command::new(mpirun);
    cmd.args([
        "-np",
        "4",
        "--oversubscribe",
        "--allow-run-as-root",
        "--mca",
        "btl",
        "self,vader",
    ])
    .args(["--mca", "oob_tcp_if_include", "lo"])
    .arg(std::env::current_exe().unwrap())
    .args(common::worker_args());
    for v in common::LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd.env(SCENARIO, "ompi_ring").env(common::MARK, &mark);
    cmd.stdout(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the mpirun we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("mpirun job hung");
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "mpirun failed: {:?}", out.status);
    for r in 0..4 {
        assert!(
            text.contains(&format!("OMPI_OK rank {r} of 4")),
            "rank {r} missing"
        );
    }
    assert_no_leaks(&mark);
}
