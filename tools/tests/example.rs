//! The MoE layer example as a user runs it: `xccl-run --np N -- moe_layer ...` in both modes,
//! over shared memory and tcp; every rank's layer output must match the same layer computed in
//! one process (the example checks and fails otherwise). Each run is under a watchdog and
//! followed by a leak check.

#[path = "../../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
mod support;

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
    // The last field: EPLB replica slots (a second run on the rebalanced map, weights moved).
    for (i, (ranks, backend, experts, mode, eplb)) in [
        ("2", "shm", "8", "normal", "0"),
        ("2", "shm", "8", "low-latency", "0"),
        ("3", "shm", "6", "normal", "3"),
        ("3", "shm", "6", "low-latency", "0"),
        ("2", "tcp", "8", "normal", "0"),
        ("2", "tcp", "8", "low-latency", "2"),
    ]
    .into_iter()
    .enumerate()
    {
        let mark = format!("{}-example-{i}", std::process::id());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xccl-run"));
        cmd.args(["--np", ranks, "--backend", backend, "--"])
            .arg(&bin)
            .args(["24", "32", experts, "2", mode, eplb]);
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
            if eplb != "0" {
                let second = format!("[{r}] rank {r}/{ranks}: {mode} mode");
                let rebalanced = (text.lines())
                    .filter(|l| l.starts_with(&second) && l.contains("(eplb map v1"))
                    .count();
                assert_eq!(rebalanced, 1, "rank {r}: one run on the EPLB map\n{text}");
            }
        }
        assert_no_leaks(&mark);
    }
}

/// The example checks its command line: `--help` prints the usage and runs nothing; a value
/// that does not parse is an error that says which, not a run with defaults.
#[test]
fn moe_layer_example_checks_its_arguments() {
    let bin = example();
    assert!(bin.exists(), "{} not built", bin.display());
    let bin = bin.to_str().unwrap();
    let out = support::run(bin, &["--help"], &[]);
    let (stdout, stderr) = support::text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("usage: moe_layer") && stdout.contains("xccl-run --np 2"));
    for (args, says) in [
        (&["abc"][..], "tokens \"abc\" is not a positive number"),
        (&["8", "16", "4", "2", "fast"], "mode \"fast\""),
        (&["8", "0"], "hidden \"0\""),
        (&["8", "16", "4", "2", "normal", "x"], "eplb \"x\""),
    ] {
        let out = support::run(bin, args, &[]);
        let (_, stderr) = support::text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(says) && stderr.contains("usage:"),
            "{stderr}"
        );
        assert!(!stderr.contains("InvalidArgument("), "{stderr}");
    }
}

/// The README's commands, followed in order on a fresh clone, run only what an earlier
/// command built: every `target/release/...` program a line runs is built by a `cargo`
/// command on that line or before it, and the harness's and launcher's arguments in the
/// README parse.
#[test]
fn readme_commands_run_what_they_build() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut commands: Vec<&str> = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh => commands.push(l),
            _ => {}
        }
    }
    // Commands quoted in the text, in backticks, that build or run something.
    for quoted in readme.split('`').skip(1).step_by(2) {
        if quoted.starts_with("cargo ") || quoted.starts_with("target/release/") {
            commands.push(quoted);
        }
    }
    assert!(commands[0].starts_with("cargo run --release --bin xccl-perf -- pingpong"));
    assert!(commands[1].starts_with("cargo test"), "{commands:?}");
    let mut built: Vec<String> = Vec::new();
    for cmd in &commands {
        for part in cmd.split("&&").map(str::trim) {
            let words: Vec<&str> = part.split_whitespace().collect();
            if words.first() == Some(&"cargo") {
                for (flag, dir) in [("--bin", ""), ("--example", "examples/")] {
                    for w in words.windows(2).filter(|w| w[0] == flag) {
                        built.push(format!("target/release/{dir}{}", w[1]));
                    }
                }
            }
            for w in words.iter().filter(|w| w.starts_with("target/release/")) {
                assert!(
                    built.iter().any(|b| b == w),
                    "{part:?} runs {w}, which no command before it builds"
                );
            }
        }
    }
    assert!(built.iter().any(|b| b.ends_with("xccl-run")), "{built:?}");
    // The first command's harness arguments parse (checked with --help appended: no run).
    let first = commands[0];
    let args: Vec<&str> = first
        .split(" -- ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    let mut with_help = args.clone();
    with_help.push("--help");
    let out = support::perf(&with_help, &[]);
    assert!(out.status.success(), "{first}: {:?}", support::text(&out));
}
