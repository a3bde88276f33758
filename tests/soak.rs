//! The soak: one job per backend (3 ranks; the hybrid one 4 ranks on two emulated hosts)
//! that mixes send/recv, all-to-all-v and both MoE modes on one communicator
//! ([`common::workload`]), every result checked, and whose ranks end at different times.
//! It runs a few seconds by default; `XCCL_SOAK=SECONDS` makes it run that long per backend
//! (add busy loops on every core with `XCCL_SOAK_LOAD=1`). It reports operations, bytes
//! checked and failures.

#[macro_use]
mod common;

use common::workload::Workload;
use common::{assert_no_leaks, rank_comm, BusyLoops, Job, SERIAL};
use std::time::{Duration, Instant};
use xccl::coll::ReduceOp;

const SECONDS_VAR: &str = "XCCL_TEST_SOAK_SECONDS";

scenarios! {
    "soak" => soak,
}

struct Tally {
    ops: u64,
    bytes: u64,
}

fn soak() {
    let seconds: f64 = std::env::var(SECONDS_VAR).unwrap().parse().unwrap();
    let comm = rank_comm(Duration::from_secs(60));
    let (me, n) = (comm.rank(), comm.world_size());
    let mut work = Workload::new(&comm);
    let start = Instant::now();
    let mut tally = Tally { ops: 0, bytes: 0 };
    for it in 0u64.. {
        // Every rank goes on only while every rank's clock says so.
        let mut done = [(start.elapsed().as_secs_f64() >= seconds) as u64];
        work.coll.allreduce(&mut done, ReduceOp::Max).unwrap();
        if done[0] == 1 {
            break;
        }
        tally.bytes += work.step(it, me, n);
        tally.ops += 1;
    }
    // Ranks end at different times: the last one closes 400 ms after the first.
    std::thread::sleep(Duration::from_millis(200 * me as u64));
    drop(work);
    comm.close().unwrap();
    println!("SOAK ops {} bytes {}", tally.ops, tally.bytes);
}

/// Runs the soak on `n` ranks with `env(rank)` added, `label` naming the job.
fn soak_on(label: &str, n: usize, env: &dyn Fn(usize) -> Vec<(String, String)>) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let seconds: f64 = std::env::var("XCCL_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let _load = std::env::var("XCCL_SOAK_LOAD")
        .is_ok_and(|v| v == "1")
        .then(BusyLoops::on_every_core);
    let start = Instant::now();
    let mut job = Job::start_each(
        n,
        "soak",
        &|r| {
            let mut vars = env(r);
            vars.push((SECONDS_VAR.to_string(), seconds.to_string()));
            vars
        },
        Some(xccl::bootstrap::random_job_id()),
    );
    let st = job.wait_all(Duration::from_secs_f64(seconds + 120.0));
    let (mut ops, mut bytes, mut reports) = (0u64, 0u64, 0);
    while let Ok((_, line)) = job.lines.try_recv() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["SOAK", "ops", o, "bytes", b] = words[..] {
            ops += o.parse::<u64>().unwrap();
            bytes += b.parse::<u64>().unwrap();
            reports += 1;
        }
    }
    let failures = st.iter().filter(|s| !s.success()).count();
    eprintln!(
        "soak {label}: {:.0} s, {n} ranks, {ops} operations, {bytes} bytes checked, {failures} failures",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(failures, 0, "{label}: {st:?}");
    assert_eq!(reports, n, "{label}: every rank reports");
    assert!(ops > 0);
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

fn backend(name: &str) -> Vec<(String, String)> {
    vec![("XCCL_BACKEND".to_string(), name.to_string())]
}

#[test]
fn soak_shm() {
    soak_on("shm", 3, &|_| backend("shm"));
}

#[test]
fn soak_tcp() {
    soak_on("tcp", 3, &|_| backend("tcp"));
}

/// Two emulated hosts of two ranks, the default backend (hybrid across hosts).
#[test]
fn soak_hybrid() {
    soak_on("hybrid", 4, &|r| {
        vec![("XCCL_HOST_ID".to_string(), format!("soak-host{}", r / 2))]
    });
}
