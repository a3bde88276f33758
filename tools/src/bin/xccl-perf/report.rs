//! Output of `xccl-perf`: the header line, nccl-tests-style table rows, footer, statistics
//! and the JSON rows (with what ran where and when).

use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write;

/// One measured row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub op: &'static str,
    pub backend: String,
    pub ranks: usize,
    /// Bytes per rank per call (MoE: token rows all ranks sent to other ranks).
    pub bytes: usize,
    /// Elements of `dtype` per call (byte sweeps only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    pub dtype: &'static str,
    #[serde(rename = "time_us_p50")]
    pub p50_us: f64,
    /// `None` (null) when there were too few samples for a 99th percentile.
    #[serde(rename = "time_us_p99")]
    pub p99_us: Option<f64>,
    #[serde(rename = "time_us_min")]
    pub min_us: f64,
    #[serde(rename = "time_us_max")]
    pub max_us: f64,
    /// Timed samples behind the figures.
    pub samples: usize,
    #[serde(rename = "algbw_gbps")]
    pub algbw: f64,
    #[serde(rename = "busbw_gbps")]
    pub busbw: f64,
    /// Wrong elements found by the check; `None` under `-c 0`.
    pub wrong: Option<u64>,
    /// Baseline median time: one memcpy of the bytes (shm), or a plain TCP one-way trip (tcp).
    #[serde(rename = "baseline_us_p50", skip_serializing_if = "Option::is_none")]
    pub baseline_us: Option<f64>,
    /// Baseline bandwidth: memcpy (shm) or a plain TCP stream (tcp) of the same messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_gbps: Option<f64>,
    /// Streaming put bandwidth, for point-to-point ops.
    #[serde(rename = "put_bw_gbps", skip_serializing_if = "Option::is_none")]
    pub stream_gbps: Option<f64>,
    /// MoE shape and split timings, for dispatch/combine rows.
    #[serde(flatten)]
    pub moe: Option<MoeFields>,
}

/// Prints `line` on stdout. A closed stdout (its reader went away, as `| head` does) ends
/// the program quietly with the exit code of a SIGPIPE death, which the launcher takes as
/// the end of the job, not a failure.
pub fn out(line: impl std::fmt::Display) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{line}").and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(xccl::launch::OUTPUT_CLOSED);
        }
        panic!("writing to stdout: {e}");
    }
}

/// GB/s of `bytes` in `us` microseconds (0 for a zero time).
pub fn gbps(bytes: usize, us: f64) -> f64 {
    if us > 0.0 {
        bytes as f64 / (us * 1e3)
    } else {
        0.0
    }
}

impl Row {
    /// A byte-typed row: `bytes` per rank per call, time statistics in µs, bus bandwidth = algbw × `bus_factor`.
    pub fn bytes(
        op: &'static str,
        backend: &str,
        ranks: usize,
        bytes: usize,
        Stats {
            p50,
            p99,
            min,
            max,
            samples,
        }: Stats,
        bus_factor: f64,
        wrong: Option<u64>,
    ) -> Row {
        let algbw = gbps(bytes, p50);
        Row {
            op,
            backend: backend_name(backend),
            ranks,
            bytes,
            count: Some(bytes),
            dtype: "uint8",
            p50_us: p50,
            p99_us: p99,
            min_us: min,
            max_us: max,
            samples,
            algbw,
            busbw: algbw * bus_factor,
            wrong,
            ..Row::default()
        }
    }
}

impl Row {
    /// A point-to-point row (one rank pair): one-way `times` (µs, sorted here), the median
    /// time per streamed message `stream_us`, and the baseline `(time µs, GB/s)` if measured.
    #[allow(clippy::too_many_arguments)]
    pub fn p2p(
        op: &'static str,
        backend: &str,
        ranks: usize,
        size: usize,
        times: &[f64],
        stream_us: f64,
        baseline: Option<(f64, f64)>,
        wrong: Option<u64>,
    ) -> Row {
        Row {
            baseline_us: baseline.map(|b| b.0),
            baseline_gbps: baseline.map(|b| b.1),
            stream_gbps: Some(gbps(size, stream_us)),
            ..Row::bytes(op, backend, ranks, size, stats(times), 1.0, wrong)
        }
    }
}

/// The MoE part of a row.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MoeFields {
    pub tokens: usize,
    pub hidden: usize,
    pub topk: usize,
    pub experts: usize,
    pub mode: &'static str,
    /// `copy` or `zero-copy` (rows read where their source wrote them).
    pub dispatch: &'static str,
    /// `identity` (untimed) or `copy` (timed, with the layer).
    pub expert: &'static str,
    /// `uniform` or `zipf:S`.
    pub routing: String,
    pub dispatch_us_p50: f64,
    pub combine_us_p50: f64,
    pub dispatch_gbps: f64,
    pub combine_gbps: f64,
    /// Token rows all ranks sent to other ranks per call.
    pub rows_out: u64,
    /// The floor of the row's bytes: one transfer of the bytes a rank sends (put, signal, read
    /// by the receiver) plus one more signal latency.
    pub floor_us: f64,
    /// With `--expert copy`: the experts' median time, and the layer's (dispatch → expert →
    /// combine, timed as one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_us_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_us_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_us_p99: Option<f64>,
    /// Modelled expert time per (token, expert) row (`--expert-us`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_us_per_row: Option<f64>,
    /// Median over steps of the busiest rank's (token, expert) rows over the mean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imbalance: Option<f64>,
    /// `EXTRA,POLICY` of the EPLB map the row ran with; absent: no EPLB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eplb: Option<String>,
    /// With ranks on several hosts: rows, and their bytes, that crossed hosts (one step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_cross_host: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_cross_host: Option<usize>,
}

/// Samples needed before a 99th percentile is reported (fewer: it would be the maximum).
pub const MIN_SAMPLES_FOR_P99: usize = 100;

/// Summary of timed samples (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub p50: f64,
    /// `None` with fewer than [`MIN_SAMPLES_FOR_P99`] samples.
    pub p99: Option<f64>,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

/// Median, 99th percentile, min and max of samples in µs, from a histogram with three
/// significant digits (0.1%) over nanoseconds.
pub fn stats(v: &[f64]) -> Stats {
    // 1 ns to a day, 0.1% resolution.
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 86_400_000_000_000, 3)
        .expect("valid bounds and precision");
    for &us in v.iter().filter(|x| x.is_finite()) {
        h.saturating_record((us * 1e3).round().max(1.0) as u64);
    }
    if h.is_empty() {
        return Stats::default();
    }
    let us = |ns: u64| ns as f64 / 1e3;
    Stats {
        p50: us(h.value_at_quantile(0.5)),
        p99: (v.len() >= MIN_SAMPLES_FOR_P99).then(|| us(h.value_at_quantile(0.99))),
        min: us(h.min()),
        max: us(h.max()),
        samples: v.len(),
    }
}

/// What ran where and when: the first line of a table, and fields of every JSON row.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    pub xccl_version: &'static str,
    pub host: String,
    pub cpu: String,
    pub cores: usize,
    /// The command line, arguments separated by spaces.
    pub command: String,
    /// When the run started, UTC (RFC 3339).
    pub time: String,
}

impl Meta {
    /// This run's (read once).
    pub fn get() -> &'static Meta {
        static META: std::sync::OnceLock<Meta> = std::sync::OnceLock::new();
        META.get_or_init(|| Meta {
            xccl_version: env!("CARGO_PKG_VERSION"),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("model name"))
                        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
                })
                .unwrap_or_else(|| "unknown cpu".into()),
            // CPUs online (a rank pinned to one CPU would see only its own).
            cores: std::fs::read_to_string("/proc/cpuinfo")
                .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
                .unwrap_or(0)
                .max(1),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        })
    }
}

/// The first line: what ran where.
pub fn header(op: &str, backend: &str, ranks: usize) -> String {
    let m = Meta::get();
    let backend = backend_name(backend);
    // A job on several hosts (real or emulated with `--hosts`) names them.
    let hosts = match job_hosts() {
        1 => String::new(),
        h => format!(" | hosts {h}"),
    };
    format!(
        "# xccl-perf {op} | xccl {} | backend {backend} | ranks {ranks}{hosts} | host {} | {} x {} cores",
        m.xccl_version, m.host, m.cpu, m.cores
    )
}

/// Hosts of the job as its communicator sees them (set once connected).
pub fn job_hosts() -> usize {
    JOB_HOSTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Records the job's host count for the header.
pub fn set_hosts(n: usize) {
    JOB_HOSTS.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// Records the backend the communicator chose (`auto` made concrete) for headers and rows.
pub fn set_backend(name: &str) {
    *JOB_BACKEND.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.to_string());
}

/// The backend the job runs on: the one recorded once connected, else `given` (the option).
pub fn backend_name(given: &str) -> String {
    JOB_BACKEND
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| given.to_string())
}

static JOB_BACKEND: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

static JOB_HOSTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

/// Column titles; `stream` adds the streaming bandwidth, `baseline` the memcpy columns.
pub fn columns(stream: bool, baseline: bool) -> String {
    let mut s = format!(
        "#{:>12} {:>12} {:>7} {:>10} {:>11} {:>11} {:>7}",
        "size", "count", "type", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
    );
    if stream {
        let _ = write!(s, " {:>13}", "put_bw(GB/s)");
    }
    if baseline {
        let _ = write!(
            s,
            " {:>10} {:>13} {:>8} {:>8}",
            "base(us)", "base(GB/s)", "x_lat", "x_bw"
        );
    }
    s.push_str("\n#  time(us): median per call (collectives: per-rank mean, slowest rank); p99/min/max in --json");
    s
}

/// One table line.
pub fn line(r: &Row) -> String {
    let mut s = format!(
        " {:>12} {:>12} {:>7} {:>10.2} {:>11.2} {:>11.2} {:>7}",
        r.bytes,
        r.count.unwrap_or(0),
        r.dtype,
        r.p50_us,
        r.algbw,
        r.busbw,
        wrong_text(r.wrong)
    );
    if let Some(bw) = r.stream_gbps {
        let _ = write!(s, " {bw:>13.2}");
    }
    if let (Some(bt), Some(bb)) = (r.baseline_us, r.baseline_gbps) {
        // x_lat: baseline time / our time (> 1: faster); x_bw: our bandwidth / the baseline's
        // (streaming when measured).
        let x_lat = if r.p50_us > 0.0 { bt / r.p50_us } else { 0.0 };
        let ours = r.stream_gbps.unwrap_or(r.algbw);
        let x_bw = if bb > 0.0 { ours / bb } else { 0.0 };
        let _ = write!(s, " {bt:>10.2} {bb:>13.2} {x_lat:>8.2} {x_bw:>8.2}");
    }
    s
}

/// The `#wrong` of a row as printed: the count, or `N/A` when nothing was checked.
pub fn wrong_text(wrong: Option<u64>) -> String {
    wrong.map_or_else(|| "N/A".into(), |w| w.to_string())
}

/// The nccl-tests footer.
pub fn footer(rows: &[Row]) -> String {
    let avg = if rows.is_empty() {
        0.0
    } else {
        rows.iter().map(|r| r.busbw).sum::<f64>() / rows.len() as f64
    };
    let checked = rows.iter().filter_map(|r| r.wrong).collect::<Vec<u64>>();
    let verdict = if checked.is_empty() && !rows.is_empty() {
        "N/A (-c 0)".to_string()
    } else {
        let wrong: u64 = checked.iter().sum();
        format!("{wrong} {}", if wrong == 0 { "OK" } else { "FAILED" })
    };
    format!("# Out of bounds values : {verdict}\n# Avg bus bandwidth    : {avg:.4}")
}

/// Writes the rows as a JSON array of objects, each with this run's [`Meta`].
pub fn write_json(path: &std::path::Path, rows: &[Row]) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct WithMeta<'a> {
        #[serde(flatten)]
        row: &'a Row,
        #[serde(flatten)]
        meta: &'a Meta,
    }
    let meta = Meta::get();
    let rows: Vec<WithMeta> = rows.iter().map(|row| WithMeta { row, meta }).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    serde_json::to_writer_pretty(&mut f, &rows)?;
    writeln!(f)?;
    f.flush()
}

/// Keeps `row`, printing its table line on rank 0.
pub fn emit(rank: usize, rows: &mut Vec<Row>, row: Row) {
    if rank == 0 {
        out(line(&row));
    }
    rows.push(row);
}

/// Prints the footer and writes the JSON on rank 0; fails on any wrong result.
pub fn finish(rank: usize, c: &crate::options::Job, rows: &[Row], wrong: u64) -> xccl::Result<()> {
    if rank == 0 {
        out(footer(rows));
        if let Some(path) = &c.json {
            write_json(path, rows)
                .map_err(|e| xccl::Error::system(format!("writing {}", path.display()), e))?;
        }
    }
    if wrong > 0 {
        return Err(xccl::Error::ProtocolViolation(format!(
            "check failed: {wrong} wrong bytes on rank {rank}"
        )));
    }
    Ok(())
}
