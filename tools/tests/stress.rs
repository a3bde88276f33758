//! Stress under load: every harness operation on both multi-process backends with 2, 3 and 4
//! ranks, `XCCL_STRESS_REPS` times each (10 by default), while busy loops occupy every core.
//! Every run must finish and pass its own result check; a live but starved rank must never be
//! declared dead. Ends with a leak check.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{assert_no_leaks, BusyLoops, LAUNCHER_VARS, MARK, SERIAL};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TABLE_OK: &str = "# Out of bounds values : 0 OK";
const MOE_OK: &str = "# Out of bounds values : 0 OK";
const SMALL: &[&str] = &["-b", "8", "-e", "64K", "-f", "32", "-n", "20", "-w", "2"];
const MOE: &[&str] = &[
    "--tokens",
    "32",
    "--hidden",
    "128",
    "--topk",
    "4",
    "--experts",
    "12",
    "--iters",
    "3",
];

/// Every harness operation: its arguments and the line that says its results were checked.
fn ops() -> Vec<(Vec<&'static str>, &'static str)> {
    let table = |name: &'static str| {
        let args = std::iter::once(name).chain(SMALL.iter().copied());
        (args.collect(), TABLE_OK)
    };
    let moe = |name: &'static str, extra: &[&'static str]| {
        let args = std::iter::once(name).chain(MOE.iter().copied());
        (args.chain(extra.iter().copied()).collect(), MOE_OK)
    };
    vec![
        table("pingpong"),
        table("sendrecv"),
        table("alltoall"),
        table("alltoallv"),
        moe("dispatch", &[]),
        moe("combine", &[]),
        moe("moe", &[]),
        moe("moe", &["--mode", "low-latency"]),
    ]
}

/// Runs one harness command; `Err` with what went wrong.
fn run(
    args: &[&str],
    backend: &str,
    ranks: usize,
    mark: &str,
    checked: &str,
) -> Result<(), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xccl-perf"));
    cmd.args(args).args([
        "--np",
        &ranks.to_string(),
        "--backend",
        backend,
        "--timeout",
        "60",
    ]);
    for v in LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd.env(MARK, mark)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.map_err(|e| format!("wait: {e}"))?,
        Err(_) => {
            // SAFETY: kill(2) on the harness process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return Err("hung for 120 s".into());
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && stdout.contains(checked) {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        Err(format!("{:?}: {}", out.status, tail.join(" | ")))
    }
}

fn stress(backend: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let reps: usize = std::env::var("XCCL_STRESS_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mark = format!("{}-stress-{backend}", std::process::id());
    let start = Instant::now();
    let mut runs = 0;
    let mut failures = Vec::new();
    {
        let _load = BusyLoops::on_every_core();
        for ranks in [2, 3, 4] {
            for (args, checked) in ops() {
                for rep in 0..reps {
                    runs += 1;
                    if let Err(why) = run(&args, backend, ranks, &mark, checked) {
                        failures.push(format!("{} -n {ranks} #{rep}: {why}", args.join(" ")));
                    }
                }
            }
        }
    }
    eprintln!(
        "{backend}: {runs} runs under busy loops on every core, {} failed, {:.0} s",
        failures.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{backend}: {} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_no_leaks(&mark);
}

#[test]
fn every_harness_operation_on_shm_under_busy_loops() {
    stress("shm");
}

#[test]
fn every_harness_operation_on_tcp_under_busy_loops() {
    stress("tcp");
}
