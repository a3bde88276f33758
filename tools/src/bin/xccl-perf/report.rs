//! Output of `xccl-perf`: the header line, nccl-tests-style table rows, footer and JSON.

use std::fmt::Write as _;
use std::io::Write;

/// One measured row.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub op: &'static str,
    pub backend: String,
    pub ranks: usize,
    /// Bytes per rank per call.
    pub bytes: usize,
    pub count: usize,
    pub dtype: &'static str,
    pub p50_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub algbw: f64,
    pub busbw: f64,
    /// Wrong elements found by the check; `None` under `--no-check`.
    pub wrong: Option<u64>,
    /// Baseline median time: one memcpy of the bytes (shm), or a plain TCP one-way trip (tcp).
    pub baseline_us: Option<f64>,
    /// Baseline bandwidth: memcpy (shm) or a plain TCP stream (tcp) of the same messages.
    pub baseline_gbps: Option<f64>,
    /// Streaming put bandwidth, for point-to-point ops.
    pub stream_gbps: Option<f64>,
    /// MoE shape and split timings, for dispatch/combine rows.
    pub moe: Option<MoeFields>,
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
    /// A byte-typed row: `bytes` per rank per call, time statistics `(p50, p99, min, max)` in
    /// µs, bus bandwidth = algbw × `bus_factor`.
    pub fn bytes(
        op: &'static str,
        backend: &str,
        ranks: usize,
        bytes: usize,
        (p50, p99, min, max): (f64, f64, f64, f64),
        bus_factor: f64,
        wrong: Option<u64>,
    ) -> Row {
        let algbw = gbps(bytes, p50);
        Row {
            op,
            backend: backend.to_string(),
            ranks,
            bytes,
            count: bytes,
            dtype: "uint8",
            p50_us: p50,
            p99_us: p99,
            min_us: min,
            max_us: max,
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
        times: &mut [f64],
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
#[derive(Debug, Clone, Default)]
pub struct MoeFields {
    pub tokens: usize,
    pub hidden: usize,
    pub topk: usize,
    pub experts: usize,
    pub mode: &'static str,
    /// `uniform` or `zipf:S`.
    pub routing: String,
    pub dispatch_us_p50: f64,
    pub combine_us_p50: f64,
}

/// Median, 99th percentile, min and max of `v` (sorted in place).
pub fn stats(v: &mut [f64]) -> (f64, f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.99), v[0], v[v.len() - 1])
}

/// The first line: what ran where.
pub fn header(op: &str, backend: &str, ranks: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    format!(
        "# xccl-perf {op} | xccl {} | backend {backend} | ranks {ranks} | host {} | {cpu} x {cores} cores",
        env!("CARGO_PKG_VERSION"),
        host.trim()
    )
}

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
        r.count,
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
        "N/A (--no-check)".to_string()
    } else {
        let wrong: u64 = checked.iter().sum();
        format!("{wrong} {}", if wrong == 0 { "OK" } else { "FAILED" })
    };
    format!("# Out of bounds values : {verdict}\n# Avg bus bandwidth    : {avg:.4}")
}

fn json_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '"' => "\\\"".chars().collect::<Vec<_>>(),
            '\\' => "\\\\".chars().collect(),
            c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

/// Writes the rows as a JSON array of objects.
pub fn write_json(path: &std::path::Path, rows: &[Row]) -> std::io::Result<()> {
    let mut out = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let num = |x: f64| {
            if x.is_finite() {
                format!("{x:.4}")
            } else {
                "null".into()
            }
        };
        let _ = write!(
            out,
            "  {{\"op\": \"{}\", \"backend\": \"{}\", \"ranks\": {}, \"bytes\": {}, \"count\": {}, \
             \"dtype\": \"{}\", \"time_us_p50\": {}, \"time_us_p99\": {}, \"time_us_min\": {}, \
             \"time_us_max\": {}, \"algbw_gbps\": {}, \"busbw_gbps\": {}, \"wrong\": {}",
            json_escape(r.op),
            json_escape(&r.backend),
            r.ranks,
            r.bytes,
            r.count,
            json_escape(r.dtype),
            num(r.p50_us),
            num(r.p99_us),
            num(r.min_us),
            num(r.max_us),
            num(r.algbw),
            num(r.busbw),
            r.wrong.map_or_else(|| "null".into(), |w| w.to_string())
        );
        if let Some(b) = r.baseline_us {
            let _ = write!(out, ", \"baseline_us_p50\": {}", num(b));
        }
        if let Some(b) = r.baseline_gbps {
            let _ = write!(out, ", \"baseline_gbps\": {}", num(b));
        }
        if let Some(bw) = r.stream_gbps {
            let _ = write!(out, ", \"put_bw_gbps\": {}", num(bw));
        }
        if let Some(m) = &r.moe {
            let _ = write!(
                out,
                ", \"tokens\": {}, \"hidden\": {}, \"topk\": {}, \"experts\": {}, \"mode\": \"{}\", \
                 \"routing\": \"{}\", \"dispatch_us_p50\": {}, \"combine_us_p50\": {}",
                m.tokens,
                m.hidden,
                m.topk,
                m.experts,
                m.mode,
                m.routing,
                num(m.dispatch_us_p50),
                num(m.combine_us_p50)
            );
        }
        out.push('}');
        out.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    out.push_str("]\n");
    std::fs::File::create(path)?.write_all(out.as_bytes())
}

/// Keeps `row`, printing its table line on rank 0.
pub fn emit(rank: usize, rows: &mut Vec<Row>, row: Row) {
    if rank == 0 {
        println!("{}", line(&row));
    }
    rows.push(row);
}

/// Prints the footer and writes the JSON on rank 0; fails on any wrong result.
pub fn finish(
    rank: usize,
    c: &crate::options::Common,
    rows: &[Row],
    wrong: u64,
) -> xccl::Result<()> {
    if rank == 0 {
        println!("{}", footer(rows));
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
