//! The harness as a user runs it: `xccl-perf` launches its own ranks, prints a checked table,
//! writes JSON, and fails clearly on a bad option or a missing peer.

#[path = "../../tests/common/mod.rs"]
mod common;

#[allow(dead_code)]
mod support;

use support::perf;

/// [`support::perf_json`], and stdout contains `marker`.
fn perf_json(name: &str, args: &[&str], marker: &str) -> (String, Vec<serde_json::Value>) {
    let (text, rows) = support::perf_json(name, args);
    assert!(text.contains(marker), "{name}: no {marker:?} in {text}");
    (text, rows)
}

#[test]
fn pingpong_prints_a_checked_table_and_json() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (text, rows) = perf_json(
        "pingpong",
        &[
            "pingpong",
            "--np",
            "2",
            "-b",
            "8",
            "-e",
            "64K",
            "--iters",
            "200",
            "--baseline",
        ],
        "# Out of bounds values : 0 OK",
    );
    assert!(text.starts_with("# xccl-perf pingpong"), "header line");
    assert!(text.contains("# Avg bus bandwidth"));
    assert_eq!(rows.len(), 14, "8 B .. 64 KiB in powers of two");
    for (k, r) in rows.iter().enumerate() {
        assert_eq!(r["op"], "pingpong");
        assert_eq!(r["backend"], "shm");
        assert_eq!(r["ranks"], 2);
        assert_eq!(r["bytes"], 8u64 << k);
        assert_eq!(r["wrong"], 0);
        for f in [
            "time_us_p50",
            "time_us_p99",
            "time_us_min",
            "time_us_max",
            "algbw_gbps",
            "busbw_gbps",
        ] {
            assert!(r[f].as_f64().is_some_and(|v| v > 0.0), "{f} in {r}");
        }
        assert!(r["time_us_min"].as_f64() <= r["time_us_p50"].as_f64());
        assert!(r["time_us_p50"].as_f64() <= r["time_us_max"].as_f64());
    }
}

/// The MoE subcommands run briefly with small shapes, check their results and write the MoE
/// fields into the JSON.
#[test]
fn moe_subcommands_run_checked() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for (op, ranks, routing, mode, dtype) in [
        ("moe", "2", "uniform", "normal", "bf16"),
        ("dispatch", "4", "zipf:1.5", "normal", "int8"),
        ("combine", "2", "zipf:0.8", "normal", "f16"),
        ("moe", "2", "uniform", "low-latency", "int8"),
    ] {
        let args = [
            op,
            "--mode",
            mode,
            "-d",
            dtype,
            "--routing",
            routing,
            "--np",
            ranks,
            "--tokens",
            "32",
            "-n",
            "3",
        ]
        .iter()
        .chain(&support::SMALL_MOE)
        .copied()
        .collect::<Vec<_>>();
        let (_, rows) = perf_json(op, &args, "# Out of bounds values : 0 OK");
        let r = &rows[0];
        assert_eq!(r["op"], op);
        assert_eq!(
            (
                r["tokens"].as_u64(),
                r["hidden"].as_u64(),
                r["topk"].as_u64(),
                r["experts"].as_u64()
            ),
            (Some(32), Some(64), Some(2), Some(8))
        );
        assert_eq!((&r["mode"], &r["dtype"]), (&mode.into(), &dtype.into()));
        assert_eq!(r["routing"], routing);
        assert_eq!(r["wrong"], 0);
        assert!(r["dispatch_us_p50"].as_f64().is_some_and(|v| v > 0.0));
        assert!(r["combine_us_p50"].as_f64().is_some_and(|v| v > 0.0));
    }
}

/// Every other subcommand runs briefly, checks its results and writes parseable JSON.
#[test]
fn sendrecv_and_alltoall_subcommands_run_checked() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for (op, ranks, expect_rows) in [
        ("sendrecv", "2", 8),
        ("alltoall", "3", 8),
        ("alltoallv", "4", 8),
    ] {
        let args = [op, "--np", ranks, "-b", "16", "-e", "2K", "--iters", "50"];
        let (_, rows) = perf_json(op, &args, "# Out of bounds values : 0 OK");
        assert_eq!(rows.len(), expect_rows, "{op}: 16 B .. 2 KiB");
        for r in &rows {
            assert_eq!(r["op"], op);
            assert_eq!(r["ranks"].as_u64().unwrap().to_string(), ranks);
            assert_eq!(r["wrong"], 0);
            assert!(r["time_us_p50"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        }
    }
}

/// A corrupted result (one received value flipped before the check) makes every subcommand
/// exit non-zero and say so; under `-c 0` each reports its rows as not checked.
#[test]
fn failed_check_fails_with_a_message() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let small = [
        "--np",
        "2",
        "-b",
        "8",
        "-e",
        "64",
        "--iters",
        "20",
        "--inject-error",
    ];
    let moe: Vec<&str> = ["--np", "2", "--tokens", "16", "-n", "2", "--inject-error"]
        .iter()
        .chain(&support::SMALL_MOE)
        .copied()
        .collect();
    for op in [
        "pingpong",
        "sendrecv",
        "alltoall",
        "alltoallv",
        "moe",
        "dispatch",
        "combine",
    ] {
        let rest: &[&str] = if ["moe", "dispatch", "combine"].contains(&op) {
            &moe
        } else {
            &small
        };
        let args: Vec<&str> = std::iter::once(op).chain(rest.iter().copied()).collect();
        let out = perf(&args, &[]);
        assert!(!out.status.success(), "{op} passed with a corrupted result");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("check failed"), "{op}: {err}");
        // With `-c 0` the same corruption goes unseen, and the output says nothing was
        // checked (N/A, JSON null) rather than "0 wrong".
        let mut unchecked = args.clone();
        unchecked.extend(["-c", "0"]);
        let (text, rows) = perf_json(&format!("{op}-unchecked"), &unchecked, "N/A");
        assert!(!text.contains(" OK"), "{op}: {text}");
        assert!(rows.iter().all(|r| r["wrong"].is_null()), "{op}: {rows:?}");
    }
}

/// `--baseline` adds a same-run reference to every row: an in-process memcpy of the same bytes
/// (shm), or plain TCP between the same pair (sendrecv over tcp).
#[test]
fn baselines_are_measured_beside_each_row() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for (op, backend) in [
        ("sendrecv", "shm"),
        ("sendrecv", "tcp"),
        ("alltoallv", "shm"),
        ("alltoall", "tcp"),
    ] {
        let args = [
            op,
            "--np",
            "2",
            "--backend",
            backend,
            "-b",
            "8",
            "-e",
            "64K",
            "-f",
            "64",
            "--iters",
            "50",
            "--baseline",
        ];
        let (text, rows) = perf_json(&format!("{op}-{backend}-base"), &args, "OK");
        assert!(
            text.contains("x_lat"),
            "{op} over {backend}: no ratio columns"
        );
        assert_eq!(rows.len(), 3, "{op} over {backend}");
        for r in &rows {
            let us = r["baseline_us_p50"].as_f64().unwrap_or(0.0);
            assert!(us > 0.0, "{r}");
            // JSON keeps 4 decimals: a slow baseline of a few bytes on a loaded machine
            // rounds to 0 GB/s, so only its presence is certain.
            let gbps = r["baseline_gbps"].as_f64().expect("baseline_gbps");
            assert!(gbps.is_finite() && gbps >= 0.0, "{r}");
        }
    }
}

#[test]
fn bad_option_fails_with_a_message() {
    let out = perf(&["pingpong", "--np", "2", "-b", "1M", "-e", "1K"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-b 1048576 is larger than -e 1024"), "{err}");
    let out = perf(&["pingpong", "-b", "12Q"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));
    let out = perf(&["moe", "--routing", "zipf:-1"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("zipf exponent"));
}

#[test]
fn missing_peer_fails_with_a_timeout_not_a_hang() {
    let dir = std::env::temp_dir().join(format!("xccl-perf-lonely-{}", std::process::id()));
    let store = format!("file://{}", dir.display());
    let out = perf(
        &["pingpong", "--timeout", "2", "-e", "64"],
        &[
            ("XCCL_RANK", "0"),
            ("XCCL_WORLD_SIZE", "2"),
            ("XCCL_STORE", &store),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out"), "{err}");
}
