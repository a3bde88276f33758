//! Running the tools as a user does, for the tools' tests: a clean environment (no launcher
//! variables from the test's own), output captured, under a watchdog.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The harness binary.
pub const PERF: &str = env!("CARGO_BIN_EXE_xccl-perf");
/// The launcher binary.
pub const RUN: &str = env!("CARGO_BIN_EXE_xccl-run");

/// A small MoE shape that runs in moments: hidden 64, top-2 of 8 experts.
pub const SMALL_MOE: [&str; 6] = ["--hidden", "64", "--topk", "2", "--experts", "8"];

/// `program args` with `env` added, its output captured; killed (and the test failed) if it
/// runs past `limit`.
pub fn run_within(program: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for v in crate::common::LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    cmd.env_remove("XCCL_BACKEND").env_remove("XCCL_DEBUG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{program} {args:?} hung");
        }
    }
}

/// [`run_within`] two minutes.
pub fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_within(program, args, env, Duration::from_secs(120))
}

/// The harness with `args` and `env`.
pub fn perf(args: &[&str], env: &[(&str, &str)]) -> Output {
    run(PERF, args, env)
}

/// Standard output and error of `out` as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the harness with `args` and `--json` into a temporary file named after `name`;
/// asserts success; returns stdout and the JSON rows.
pub fn perf_json(name: &str, args: &[&str]) -> (String, Vec<serde_json::Value>) {
    let path = std::env::temp_dir().join(format!("xccl-perf-{name}-{}.json", std::process::id()));
    let mut all = args.to_vec();
    all.extend(["--json", path.to_str().unwrap()]);
    let out = perf(&all, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{name} {args:?}: {stdout}{stderr}");
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    (stdout, rows.as_array().unwrap().clone())
}
