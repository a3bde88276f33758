//! Host identity across processes: ranks named onto emulated hosts (`XCCL_HOST_ID`) learn
//! every rank's host; a launcher whose local ranks contradict the names fails every rank with
//! `ConfigMismatch`; the shared-memory backend refuses a job across hosts with a clear error;
//! the default backend of a job across hosts is the hybrid one, whose all-to-all crosses
//! both paths; two hosts in two network namespaces joined by a veth pair pass the checked
//! workload (send/recv, all-to-all-v, both MoE modes) and fail on both sides when the link
//! is cut; a rank killed on one host fails every survivor. Each job runs under a watchdog
//! and ends with a leak check.

#[macro_use]
mod common;

use common::{assert_no_leaks, Job, SERIAL};
use std::time::{Duration, Instant};
use xccl::transport::Cmp;
use xccl::{Communicator, Error};

scenarios! {
    "hosts" => hosts,
    "exchange" => exchange,
    "workload_then_cut" => workload_then_cut,
}

/// Runs the checked workload for a while, then waits for a signal no one sends until the
/// link between the hosts is cut, and reports the failure.
fn workload_then_cut() {
    let comm = common::rank_comm(Duration::from_secs(30));
    let (me, n) = (comm.rank(), comm.world_size());
    assert_eq!(comm.transport().caps().backend, "hybrid");
    let mut work = common::workload::Workload::new(&comm);
    // Two hosts of two ranks: MoE dispatch relays through a gateway per host.
    assert!(
        work.normal.two_level(),
        "two-level routing across the namespaces"
    );
    let mut bytes = 0;
    for it in 0..24 {
        bytes += work.step(it, me, n);
    }
    let quiet = comm.lease("never-signalled", 0, 1, "").unwrap();
    comm.barrier().unwrap();
    println!("READY {bytes}");
    let word = quiet.signals().start;
    match comm
        .transport()
        .wait(word, Cmp::Ge, 1, Instant::now() + Duration::from_secs(30))
    {
        Err(Error::PeerFailed { rank }) => println!("PEERFAILED {rank}"),
        other => panic!("expected PeerFailed, got {other:?}"),
    }
}

/// Builds a communicator with the default backend and checks an all-to-all of distinct
/// values with every rank; prints the backend and, per peer, whether it is mapped.
fn exchange() {
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("communicator");
    let coll = xccl::coll::Coll::new(&comm).expect("collectives");
    let (me, n) = (comm.rank(), comm.world_size());
    let block = 3000;
    let send: Vec<u32> = (0..n * block)
        .map(|i| (me * 1_000_000 + i) as u32)
        .collect();
    let mut recv = vec![u32::MAX; n * block];
    for _ in 0..3 {
        coll.alltoall(&send, &mut recv).expect("all-to-all");
        for s in 0..n {
            for k in 0..block {
                assert_eq!(recv[s * block + k], (s * 1_000_000 + me * block + k) as u32);
            }
        }
    }
    let t = comm.transport();
    let mapped: Vec<bool> = (0..n)
        .map(|p| t.path_kind(p).unwrap() == xccl::transport::PathKind::Mapped)
        .collect();
    println!("EXCHANGED {} {mapped:?}", t.caps().backend);
    drop(coll);
    comm.close().unwrap();
}

/// Builds a communicator from the environment and prints what it learnt of the hosts, or
/// the kind of error it got.
fn hosts() {
    match Communicator::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(comm) => {
            let info = comm.info();
            println!(
                "HOSTS {:?} LOCAL {} {}",
                comm.hosts().table(),
                info.local_rank,
                info.local_size
            );
            comm.close().unwrap();
        }
        Err(Error::ConfigMismatch(m)) => println!("MISMATCH {m}"),
        Err(Error::InvalidUsage(m)) => println!("USAGE {m}"),
        Err(e) => println!("OTHER {e}"),
    }
}

/// Runs `n` ranks of the `hosts` scenario with `env(rank)` added; each rank's report.
fn run(n: usize, env: &dyn Fn(usize) -> Vec<(String, String)>) -> Vec<String> {
    let mut job = Job::start_each(n, "hosts", env, Some(xccl::bootstrap::random_job_id()));
    let status = job.wait_all(Duration::from_secs(60));
    assert!(status.iter().all(|s| s.success()), "{status:?}");
    let mut last = vec![String::new(); n];
    let reports = ["HOSTS ", "MISMATCH ", "USAGE ", "OTHER "];
    while let Ok((r, line)) = job.lines.try_recv() {
        if reports.iter().any(|p| line.starts_with(p)) {
            last[r] = line;
        }
    }
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
    last
}

fn var(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[test]
fn ranks_learn_every_ranks_host() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Six ranks on three emulated hosts, named out of rank order: hosts numbered by first rank.
    let name = |r: usize| ["x", "y", "z"][(r / 2 + 1) % 3].to_string();
    let out = run(6, &|r| {
        vec![
            var("XCCL_HOST_ID", name(r)),
            var("XCCL_BACKEND", "tcp"),
            var("XCCL_LOCAL_RANK", r % 2),
            var("XCCL_LOCAL_SIZE", 2),
        ]
    });
    for (r, line) in out.iter().enumerate() {
        assert_eq!(
            line,
            &format!("HOSTS [0, 0, 1, 1, 2, 2] LOCAL {} 2", r % 2),
            "rank {r}"
        );
    }
}

#[test]
fn a_launcher_that_contradicts_the_host_names_fails_every_rank() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // The launcher says one host of four; the names say two hosts of two.
    let out = run(4, &|r| {
        vec![
            var("XCCL_HOST_ID", format!("h{}", r / 2)),
            var("XCCL_BACKEND", "tcp"),
            var("XCCL_LOCAL_RANK", r),
            var("XCCL_LOCAL_SIZE", 4),
        ]
    });
    for (r, line) in out.iter().enumerate() {
        assert!(
            line.starts_with("MISMATCH the launcher (xccl) puts rank 0 at local rank 0 of 4"),
            "rank {r}: {line}"
        );
    }
}

#[test]
fn shared_memory_refuses_a_job_across_hosts() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = run(2, &|r| {
        vec![
            var("XCCL_HOST_ID", format!("h{r}")),
            var("XCCL_BACKEND", "shm"),
        ]
    });
    for (r, line) in out.iter().enumerate() {
        assert!(
            line.starts_with("USAGE the shm backend needs every rank on one host"),
            "rank {r}: {line}"
        );
    }
}

#[test]
fn a_job_across_hosts_runs_on_the_hybrid_backend_by_default() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start_each(
        4,
        "exchange",
        &|r| vec![var("XCCL_HOST_ID", format!("h{}", r / 2))],
        Some(xccl::bootstrap::random_job_id()),
    );
    let status = job.wait_all(Duration::from_secs(60));
    let mut reports = vec![String::new(); 4];
    while let Ok((r, line)) = job.lines.try_recv() {
        if line.starts_with("EXCHANGED ") {
            reports[r] = line;
        }
    }
    assert!(status.iter().all(|s| s.success()), "{status:?} {reports:?}");
    for (r, line) in reports.iter().enumerate() {
        let mapped: Vec<bool> = (0..4).map(|p| p / 2 == r / 2).collect();
        assert_eq!(line, &format!("EXCHANGED hybrid {mapped:?}"), "rank {r}");
    }
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

#[test]
fn hosts_in_two_network_namespaces_work_then_fail_when_cut() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let id = std::process::id() % 100_000 + 7;
    let Some(pair) = common::netns::veth_pair_or_skip(id) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("xccl-hosts-netns-store-{id}"));
    let mark = format!("netns-{}", xccl::bootstrap::random_job_id());
    let secret = xccl::bootstrap::random_job_id();
    // Ranks 0 and 1 on one host (namespace), 2 and 3 on the other.
    let sides = [
        &pair.sides[0],
        &pair.sides[0],
        &pair.sides[1],
        &pair.sides[1],
    ];
    let namespaces: Vec<&str> = sides.iter().map(|s| s.ns.as_str()).collect();
    let mut job =
        common::netns::NsJob::start(&namespaces, "workload_then_cut", &mark, &dir, &|r| {
            vec![
                var("XCCL_HOST_ID", &sides[r].ns),
                var("XCCL_JOB_SECRET", &secret),
                var("XCCL_SOCKET_IFNAME", format!("={}", sides[r].dev)),
                var("XCCL_TCP_HEARTBEAT_MS", 200),
                var("XCCL_TCP_PEER_TIMEOUT_MS", 1500),
            ]
        });
    job.wait_for("READY", Duration::from_secs(120));
    let cut = Instant::now();
    assert!(pair.cut(0));
    let (seen, lines) = job.wait_for("PEERFAILED", Duration::from_secs(10));
    let took = seen - cut;
    eprintln!("every rank saw PeerFailed {took:?} after the link was cut (timeout 1.5 s)");
    for (r, line) in lines.iter().enumerate() {
        let failed: usize = line["PEERFAILED ".len()..].parse().unwrap();
        assert_ne!(
            failed / 2,
            r / 2,
            "rank {r} blames rank {failed} of its own host"
        );
    }
    assert!(took <= Duration::from_millis(1500 + 2000), "took {took:?}");
    assert!(job.all_succeed());
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_leaks(&mark);
}
