//! The MoE layer example as a user runs it: `xccl-run -n N -- moe_layer ...` in both modes,
//! over shared memory and tcp; every rank's layer output must match the same layer computed in
//! one process (the example checks and fails otherwise). Each run is under a watchdog and
//! followed by a leak check.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{assert_no_leaks, LAUNCHER_VARS, MARK, SERIAL};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The example binary `cargo test` builds beside this test's own binary.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile.join("examples").join("moe_layer")
}

#[test]
fn moe_layer_example_matches_one_process() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let bin = example();
    // `cargo test` with no target filter builds the examples; a filtered run may find none, or
    // an old one (then the mode lines below are missing).
    let hint = "cargo build --example moe_layer, or run cargo test without a target filter";
    assert!(bin.exists(), "{} not built ({hint})", bin.display());
    for (i, (ranks, backend, experts, mode)) in [
        ("2", "shm", "8", "normal"),
        ("2", "shm", "8", "low-latency"),
        ("3", "shm", "6", "normal"),
        ("3", "shm", "6", "low-latency"),
        ("2", "tcp", "8", "normal"),
        ("2", "tcp", "8", "low-latency"),
    ]
    .into_iter()
    .enumerate()
    {
        let mark = format!("{}-example-{i}", std::process::id());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xccl-run"));
        cmd.args(["-n", ranks, "--backend", backend, "--"])
            .arg(&bin)
            .args(["24", "32", experts, "2", mode]);
        for v in LAUNCHER_VARS {
            cmd.env_remove(v);
        }
        let child = cmd
            .env(MARK, &mark)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("xccl-run");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => out.expect("output"),
            Err(_) => {
                // SAFETY: kill(2) on the launcher this test started (it stops its ranks).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("moe_layer on {ranks} ranks over {backend} ({mode}) hung");
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{ranks} ranks, {backend}, {mode}: {:?}",
            out.status
        );
        let ranks: usize = ranks.parse().unwrap();
        for r in 0..ranks {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("[{r}] rank {r}/{ranks}: {mode} mode")))
                .unwrap_or_else(|| {
                    panic!("rank {r} printed no {mode} result (stale example? {hint})")
                });
            assert!(line.contains("max relative error"), "{line}");
        }
        assert_no_leaks(&mark);
    }
}
