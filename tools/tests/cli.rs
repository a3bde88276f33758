//! The tools as a user of nccl-tests, mpirun and NCCL meets them: the backend the launcher
//! or environment chose, arguments checked once before anything starts, a cap on ranks,
//! nccl-tests' flags, MoE tables and sweeps, p99 only from enough samples, a quiet end on a
//! closed pipe, help that says what each tool does, JSON with metadata, pictures, log lines
//! with the rank, and NCCL's interface syntax.

#[path = "../../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{perf, perf_json, run, text, PERF, RUN, SMALL_MOE};

/// A quick ping-pong: 8 bytes only.
const TINY: &[&str] = &["pingpong", "-e", "8", "-n", "20"];

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("xccl-cli-{}-{name}", std::process::id()))
}

#[test]
fn the_backend_comes_from_the_launcher_or_the_environment() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = perf(TINY, &[("XCCL_BACKEND", "tcp")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("backend tcp"), "{stdout}");

    let mut args = vec!["--np", "2", "--backend", "tcp", "--", PERF];
    args.extend(TINY);
    let out = run(RUN, &args, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("[0] # xccl-perf pingpong") && stdout.contains("backend tcp"));

    let out = perf(TINY, &[("XCCL_BACKEND", "foo")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("XCCL_BACKEND") && stderr.contains("shm"),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_are_reported_once_before_anything_starts() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for (args, says) in [
        (&["pingpong", "-b", "1M", "-e", "1K"][..], "larger than -e"),
        (&["pingpong", "-f", "1"], "at least 2"),
        (
            &["pingpong", "--backend", "foo"],
            "use auto, shm (one host), tcp or hybrid",
        ),
        (
            &["pingpong", "--backend", "loopback"],
            "use auto, shm (one host), tcp or hybrid",
        ),
        (
            &["pingpong", "-d", "float", "-b", "6"],
            "whole number of float",
        ),
        (
            &["moe", "--experts", "7", "--topk", "4"],
            "use a multiple of 2",
        ),
        (&["moe", "--experts", "7"], "--topk 8 needs 1 to 7"),
        (&["moe", "-b", "1K"], "unexpected argument '-b'"),
        (&["moe", "--tokens", "1,x"], "invalid digit"),
        (&["pingpong", "--np", "1"], "at least 2 ranks (--np 2)"),
        (&["pingpong", "--np", "1000"], "--oversubscribe"),
    ] {
        let start = Instant::now();
        let out = perf(args, &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(stderr.matches("error:").count(), 1, "{args:?}: {stderr}");
        for noise in ["WARN", "[rank", "Loopback::create", "InvalidArgument("] {
            assert!(!stderr.contains(noise), "{args:?}: {noise} in {stderr}");
        }
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{args:?} took long"
        );
    }
    // Under a launcher every rank sees the same mistake; only rank 0 says so.
    let out = run(RUN, &["--np", "2", "--", PERF, "pingpong", "-f", "1"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    assert!(stderr.contains("[0] xccl-perf: error: -f 1"), "{stderr}");
    // A rank count other than the launcher's is a mistake too.
    let out = run(
        RUN,
        &["--np", "2", "--", PERF, "pingpong", "--np", "3"],
        &[],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--np 3, but the launcher"), "{stderr}");
    // The launcher's own cap.
    let out = run(RUN, &["--np", "1000", "--", "true"], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--oversubscribe"), "{stderr}");
}

#[test]
fn nccl_tests_flags_set_iterations_warmup_check_and_type() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let args = [
        "pingpong", "-b", "8", "-e", "32", "-n", "30", "-w", "3", "-d", "float", "-c", "1",
    ];
    let (stdout, rows) = perf_json("flags", &args);
    assert!(stdout.contains("float"), "{stdout}");
    assert_eq!(rows.len(), 3, "8, 16, 32 bytes");
    for r in &rows {
        assert_eq!(r["samples"], 30, "{r}");
        assert_eq!(r["dtype"], "float");
        assert_eq!(
            r["count"].as_u64().unwrap() * 4,
            r["bytes"].as_u64().unwrap()
        );
        assert!(r["time_us_p99"].is_null(), "30 samples give no p99: {r}");
        assert_eq!(r["wrong"], 0);
        // What ran where and when.
        assert_eq!(r["xccl_version"], env!("CARGO_PKG_VERSION"));
        assert!(r["host"].as_str().is_some_and(|h| !h.is_empty()), "{r}");
        assert!(
            r["cpu"].as_str().is_some() && r["cores"].as_u64() >= Some(1),
            "{r}"
        );
        assert!(
            r["command"]
                .as_str()
                .unwrap()
                .contains("pingpong -b 8 -e 32"),
            "{r}"
        );
        let time = r["time"].as_str().unwrap();
        assert!(
            time.len() == 20 && time.ends_with('Z') && time.starts_with("20"),
            "{r}"
        );
    }
    let (_, rows) = perf_json("p99", &["pingpong", "-e", "8", "-n", "100"]);
    assert!(
        rows[0]["time_us_p99"].as_f64().is_some_and(|v| v > 0.0),
        "{rows:?}"
    );
}

#[test]
fn moe_prints_a_table_row_per_token_count_and_mode() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let args: Vec<&str> = [
        "moe",
        "--tokens",
        "1,8,32",
        "--mode",
        "normal,low-latency",
        "-n",
        "5",
        "-w",
        "1",
    ]
    .iter()
    .chain(&SMALL_MOE)
    .copied()
    .collect();
    let (stdout, rows) = perf_json("moe-sweep", &args);
    assert_eq!(rows.len(), 6, "{stdout}");
    let data: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(data.len(), 6, "{stdout}");
    let heading = stdout
        .lines()
        .find(|l| l.contains("dispatch(us)"))
        .expect("columns");
    assert!(
        heading.contains("comb(GB/s)")
            && heading.contains("p99(us)")
            && heading.contains("floor(us)"),
        "{heading}"
    );
    let expected = [1, 8, 32]
        .iter()
        .flat_map(|&t| [("normal", t), ("low-latency", t)]);
    for ((line, r), (mode, tokens)) in data.iter().zip(&rows).zip(expected) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[..3], [mode, "copy", &tokens.to_string()], "{line}");
        assert_eq!(cols[10], "-", "p99 of 5 samples: {line}");
        let floor: f64 = cols[11].parse().unwrap();
        let of_floor: f64 = cols[12].parse().unwrap();
        assert!(floor > 0.0 && of_floor > 0.0, "{line}");
        assert_eq!((&r["tokens"], &r["mode"]), (&tokens.into(), &mode.into()));
        assert_eq!(
            (&r["dispatch"], &r["expert"]),
            (&"copy".into(), &"identity".into())
        );
        assert!(r["count"].is_null(), "{r}");
        assert!(r["time_us_p99"].is_null(), "{r}");
        assert!(r["layer_us_p50"].is_null(), "{r}");
        assert!(r["dispatch_gbps"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        // The table prints it to 0.1 µs.
        assert!(
            r["floor_us"]
                .as_f64()
                .is_some_and(|v| (v - floor).abs() <= 0.05),
            "{r}"
        );
        assert_eq!(r["samples"], 5);
    }
    assert!(stdout.contains("# Out of bounds values : 0 OK"), "{stdout}");
}

/// `--expert copy` times the experts and the layer, and runs the copying and the zero-copy
/// dispatch side by side, both checked.
#[test]
fn moe_copy_experts_time_the_layer_of_both_dispatches() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let args: Vec<&str> = [
        "moe", "--tokens", "16", "--expert", "copy", "-n", "5", "-w", "1",
    ]
    .iter()
    .chain(&SMALL_MOE)
    .copied()
    .collect();
    let (stdout, rows) = perf_json("moe-layer", &args);
    assert_eq!(rows.len(), 2, "{stdout}");
    for (r, kind) in rows.iter().zip(["copy", "zero-copy"]) {
        assert_eq!(
            (&r["dispatch"], &r["expert"]),
            (&kind.into(), &"copy".into())
        );
        let layer = r["layer_us_p50"].as_f64().expect("a layer time");
        let parts = r["dispatch_us_p50"].as_f64().unwrap() + r["combine_us_p50"].as_f64().unwrap();
        assert!(layer > 0.0 && r["expert_us_p50"].as_f64().is_some(), "{r}");
        assert!(layer >= 0.5 * parts, "the layer holds both phases: {r}");
        assert_eq!(r["wrong"], 0);
    }
    assert!(stdout.contains("layer(us)"), "{stdout}");
    // Zero-copy is a normal-mode dispatch, and not with INT8 rows.
    for bad in [
        &["--mode", "low-latency", "--dispatch", "zero-copy"][..],
        &["-d", "int8", "--expert", "copy"][..],
    ] {
        let out = perf(&[&["moe", "--tokens", "4"][..], bad].concat(), &[]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("zero-copy"),
            "{bad:?}"
        );
    }
}

/// `--eplb` with modelled expert time: a row without and one with EPLB, both checked, the
/// imbalance and the layer reported, the EPLB row's map named in the JSON, and the
/// comparison line printed; bad EPLB options are refused with a message.
#[test]
fn moe_eplb_runs_without_and_with_a_map() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let args: Vec<&str> = [
        "moe",
        "--tokens",
        "16",
        "--routing",
        "zipf:1.2",
        "--expert-us",
        "2",
        "--eplb",
        "4",
        "-n",
        "5",
        "-w",
        "2",
    ]
    .iter()
    .chain(&SMALL_MOE)
    .copied()
    .collect();
    let (stdout, rows) = perf_json("moe-eplb", &args);
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0]["eplb"].is_null(), "{}", rows[0]);
    assert_eq!(rows[1]["eplb"], "4,fewest", "{}", rows[1]);
    for r in &rows {
        assert_eq!(r["wrong"], 0, "{r}");
        assert!(r["imbalance"].as_f64().is_some_and(|v| v >= 1.0), "{r}");
        assert!(r["layer_us_p50"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        assert_eq!(r["expert_us_per_row"], 2.0, "{r}");
    }
    assert!(stdout.contains("#  eplb vs without: layer p50"), "{stdout}");
    for (bad, says) in [
        (
            &["--eplb", "4,nearest"][..],
            "expected rotate, local or fewest",
        ),
        (&["--eplb", "x"][..], "EXTRA a count"),
        (&["--eplb", "4", "--expert", "copy"][..], "identity experts"),
        (&["--expert-us=-1"][..], "--expert-us"),
    ] {
        let out = perf(&[&["moe", "--tokens", "4"][..], bad].concat(), &[]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{bad:?}: {err}");
    }
}

/// `xccl-run --hosts H` emulates H hosts: over tcp the job runs (each rank's host from
/// `XCCL_HOST_ID`, local ranks to match); shared memory refuses a job across hosts with a
/// clear error; a rank count the hosts do not divide is refused before anything starts.
#[test]
fn xccl_run_emulates_hosts() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ping = ["--", PERF, "pingpong", "-e", "8", "-n", "20"];
    let args = [
        &["--np", "4", "--hosts", "2", "--backend", "tcp"][..],
        &ping,
    ]
    .concat();
    let out = run(RUN, &args, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("Out of bounds values : 0 OK"), "{stdout}");
    let args = [
        &["--np", "4", "--hosts", "2", "--backend", "shm"][..],
        &ping,
    ]
    .concat();
    let out = run(RUN, &args, &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        format!("{stdout}{stderr}").contains("the shm backend needs every rank on one host"),
        "{stdout}{stderr}"
    );
    let out = run(RUN, &["--np", "3", "--hosts", "2", "--", "true"], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot be spread evenly over 2 hosts"),
        "{stderr}"
    );
}

/// `xccl-perf ... --hosts 2` launches its ranks as two emulated hosts: the header names the
/// hosts and MoE rows count what crossed them, both ways (flat: fewer than the rows crossing
/// ranks, each counted out and back); `--levels flat,two-level` measures both routings and
/// two-level sends fewer rows across.
#[test]
fn xccl_perf_emulates_hosts_and_counts_rows_across_them() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let args: Vec<&str> = [
        "moe",
        "--np",
        "4",
        "--hosts",
        "2",
        "--backend",
        "tcp",
        "--tokens",
        "32",
        "-n",
        "3",
    ]
    .iter()
    .chain(&SMALL_MOE)
    .copied()
    .collect();
    let (stdout, rows) = perf_json("moe-hosts", &args);
    assert!(stdout.contains("| ranks 4 | hosts 2 |"), "{stdout}");
    assert!(stdout.contains("rows_xhost"), "{stdout}");
    let r = &rows[0];
    let (crossed, out) = (
        r["rows_cross_host"].as_u64().unwrap(),
        r["rows_out"].as_u64().unwrap(),
    );
    // Flat: each row that leaves the host comes back once (dispatch and combine counted).
    assert!(crossed > 0 && crossed % 2 == 0 && crossed < 2 * out, "{r}");
    assert_eq!(r["wrong"], 0);
    // The hybrid backend, flat and two-level side by side: two-level sends fewer rows across.
    let mut args = args.clone();
    let at = args.iter().position(|&a| a == "tcp").unwrap();
    args[at] = "hybrid";
    args.extend(["--levels", "flat,two-level"]);
    let (stdout, rows) = perf_json("moe-hosts-levels", &args);
    assert!(stdout.contains("copy+2lvl vs copy"), "{stdout}");
    let crossed = |r: &serde_json::Value| r["rows_cross_host"].as_u64().unwrap();
    assert_eq!(
        (&rows[0]["dispatch"], &rows[1]["dispatch"]),
        (&"copy".into(), &"copy+2lvl".into())
    );
    assert!(crossed(&rows[1]) < crossed(&rows[0]), "{rows:?}");
    assert!(rows.iter().all(|r| r["wrong"] == 0), "{rows:?}");
}

/// Reads the first line `program` prints, closes the pipe, and returns its exit status and
/// what it wrote on stderr.
fn close_after_first_line(program: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for v in common::LAUNCHER_VARS {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("# xccl-perf"), "{first}");
    // The reader is dropped here: the pipe is closed, as `| head -1` does.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("{args:?} went on after its output was closed");
        }
        std::thread::sleep(Duration::from_millis(10)); // polling the child's exit
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn a_closed_pipe_ends_the_program_quietly() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mark = format!("pipe-{}", std::process::id());
    std::env::set_var(common::MARK, &mark);
    // The harness as its own launcher, a single rank writing itself, and under xccl-run.
    let long = ["pingpong", "-n", "3000"];
    let single = ["alltoall", "--np", "1", "-n", "3000"];
    let mut launched = vec!["--np", "2", "--", PERF];
    launched.extend(long);
    for (program, args) in [(PERF, &long[..]), (PERF, &single[..]), (RUN, &launched[..])] {
        let (code, err) = close_after_first_line(program, args);
        assert_eq!(code, Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} was not quiet: {err}");
    }
    std::env::remove_var(common::MARK);
    common::assert_no_leaks(&mark);
}

#[test]
fn each_tool_says_what_it_does() {
    let out = perf(&["--help"], &[]);
    let (help, _) = text(&out);
    assert!(out.status.success());
    assert!(help.contains("Measures xccl's primitives"), "{help}");
    assert!(help.contains("--np 2"), "{help}");
    let out = perf(&["moe", "--help"], &[]);
    let (help, _) = text(&out);
    assert!(help.contains("normal or low-latency mode") && help.contains("--tokens"));
    assert!(
        help.contains("-n, --iters") && help.contains("-w, --warmup_iters"),
        "{help}"
    );
    let out = run(RUN, &["--help"], &[]);
    let (help, _) = text(&out);
    assert!(
        help.contains("Starts N local ranks") && help.contains("--np"),
        "{help}"
    );
    let out = perf(&["pingpong", "--help"], &[]);
    let (sub, _) = text(&out);
    for h in [&help, &sub] {
        assert!(
            !h.contains("command-line tools"),
            "the package description: {h}"
        );
    }
}

#[test]
fn plot_draws_latency_bandwidth_and_moe_phases() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (pp, moe, svg) = (temp("pp.json"), temp("moe.json"), temp("plot.svg"));
    let moe_args: Vec<&str> = ["moe", "--tokens", "1,8", "--mode", "normal,low-latency"]
        .iter()
        .chain(&SMALL_MOE)
        .copied()
        .collect();
    for (args, path) in [
        (&["pingpong", "-e", "4K", "-n", "50"][..], &pp),
        (&moe_args[..], &moe),
    ] {
        let mut all = args.to_vec();
        all.extend(["--json", path.to_str().unwrap()]);
        assert!(perf(&all, &[]).status.success(), "{args:?}");
    }
    let out = perf(
        &[
            "plot",
            pp.to_str().unwrap(),
            moe.to_str().unwrap(),
            "-o",
            svg.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{:?}", text(&out));
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(
        picture.starts_with("<svg"),
        "{}",
        &picture[..100.min(picture.len())]
    );
    let stem = pp.file_stem().unwrap().to_str().unwrap();
    for label in [
        "latency",
        "bandwidth",
        "MoE phase time",
        stem,
        "normal dispatch",
        "low-latency combine",
    ] {
        assert!(picture.contains(label), "no {label:?} in the picture");
    }
    assert!(
        picture.matches("<polyline").count() >= 6,
        "two sweep lines and two phases of each mode"
    );
    // Clear errors: not a JSON file, not an SVG name.
    let out = perf(&["plot", svg.to_str().unwrap(), "-o", "x.svg"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("not a JSON array"),
        "{:?}",
        text(&out)
    );
    let out = perf(&["plot", pp.to_str().unwrap(), "-o", "x.png"], &[]);
    assert!(text(&out).1.contains("SVG"), "{:?}", text(&out));
    for f in [pp, moe, svg] {
        std::fs::remove_file(f).unwrap();
    }
}

#[test]
fn log_lines_carry_the_rank() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut args = vec!["--np", "2", "--", PERF];
    args.extend(TINY);
    let out = run(RUN, &args, &[("XCCL_DEBUG", "xccl=debug")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    for r in 0..2 {
        let line = format!("[{r}] [rank {r}] ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&line) && l.contains("xccl init")),
            "no debug line of rank {r}: {stderr}"
        );
    }
    // Quiet by default.
    let out = run(RUN, &args, &[]);
    assert!(out.status.success());
    assert!(text(&out).1.is_empty(), "{}", text(&out).1);
}

#[test]
fn socket_ifname_takes_prefixes_exclusions_and_ipv6() {
    let _g = common::SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let has_v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    let mut args = vec!["--np", "2", "--backend", "tcp", "--", PERF];
    args.extend(TINY);
    let mut cases = vec![
        ("l", None, "127.0.0.1"),   // a prefix of lo
        ("=lo", None, "127.0.0.1"), // an exact name
        (
            "^docker,eth,ens,enp,wl,br,veth,ib,virbr,tun,tap",
            None,
            "127.0.0.1",
        ),
        ("lo", Some("AF_INET"), "127.0.0.1"),
    ];
    if has_v6 {
        cases.push(("lo", Some("AF_INET6"), "[::1]"));
    } else if common::skips_forbidden() {
        panic!("no IPv6 loopback (::1) to test XCCL_SOCKET_FAMILY=AF_INET6 on");
    } else {
        eprintln!("skipping the IPv6 case: no ::1 on this host");
    }
    for (ifname, family, listens) in cases {
        let mut env = vec![("XCCL_SOCKET_IFNAME", ifname), ("XCCL_DEBUG", "xccl=debug")];
        if let Some(f) = family {
            env.push(("XCCL_SOCKET_FAMILY", f));
        }
        let out = run(RUN, &args, &env);
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "{ifname} {family:?}: {stdout}{stderr}"
        );
        let listening: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("TCP transport listening"))
            .collect();
        assert_eq!(listening.len(), 2, "{stderr}");
        assert!(
            listening
                .iter()
                .all(|l| l.contains(&format!("addr={listens}:"))),
            "{ifname} {family:?}: {listening:?}"
        );
    }
    let out = run(RUN, &args, &[("XCCL_SOCKET_IFNAME", "=no-such-if")]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("no interface address matches"), "{stderr}");
}
