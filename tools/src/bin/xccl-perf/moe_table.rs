//! The MoE table and JSON rows: one line per (token count, mode, dispatch), the phases'
//! times and bandwidths, the floor and the time as a multiple of it, and with timed experts
//! the expert's and the layer's times.

use crate::moe::{dtype_of, phase_name, Phase};
use crate::options::{Eplb, MoeArgs};
use crate::report::{self, MoeFields, Row, Stats};

/// A mode and dispatch of the sweep.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub low_latency: bool,
    pub zero_copy: bool,
}

impl Variant {
    /// From `--mode` and `--dispatch` names.
    pub fn new(mode: &str, dispatch: &str) -> Self {
        Variant {
            low_latency: mode == "low-latency",
            zero_copy: dispatch == "zero-copy",
        }
    }

    pub fn mode(&self) -> &'static str {
        match self.low_latency {
            true => "low-latency",
            false => "normal",
        }
    }

    pub fn dispatch(&self) -> &'static str {
        match self.zero_copy {
            true => "zero-copy",
            false => "copy",
        }
    }
}

impl Measured {
    /// The dispatch column: the kind, and `+2lvl` when normal mode routed across hosts in
    /// two levels.
    pub fn dispatch(&self) -> &'static str {
        match (self.two_level, self.variant.zero_copy) {
            (false, _) => self.variant.dispatch(),
            (true, false) => "copy+2lvl",
            (true, true) => "zc+2lvl",
        }
    }
}

/// What one configuration measured.
pub struct Measured {
    pub tokens: usize,
    pub variant: Variant,
    /// Normal mode routed across hosts in two levels.
    pub two_level: bool,
    /// The EPLB map's replica slots and policy (`None`: the plain placement).
    pub eplb: Option<Eplb>,
    /// Median over repetitions of the busiest rank's (token, expert) rows over the mean.
    pub imbalance: f64,
    pub disp: Stats,
    pub comb: Stats,
    /// With timed experts: the experts' time, and the layer's (dispatch → combine).
    pub expert: Option<Stats>,
    pub layer: Option<Stats>,
    /// The phase (or both, summed per repetition) the row's time is of.
    pub reported: Stats,
    /// Rows and bytes all ranks sent to other ranks; bytes this rank sent.
    pub rows: u64,
    pub bytes: usize,
    pub my_bytes: usize,
    /// With ranks on several hosts: rows that crossed hosts, dispatch and combine (last
    /// repetition, all ranks).
    pub rows_cross_host: Option<u64>,
    /// The floor of the row's bytes (see `moe_floor`).
    pub floor_us: f64,
    /// The slowest rank's memcpy of the bytes it sends (`--baseline`).
    pub base_us: Option<f64>,
    pub wrong: Option<u64>,
}

impl Measured {
    /// GB/s of the bytes all ranks sent to others, moved in `us` µs.
    fn gbps(&self, us: f64) -> f64 {
        report::gbps(self.bytes, us)
    }

    /// `us` as a multiple of the baseline (0 without one).
    fn of_base(&self, us: f64) -> f64 {
        match self.base_us {
            Some(base) if self.my_bytes > 0 && base > 0.0 => us / base,
            _ => 0.0,
        }
    }

    /// The row's time as a multiple of its floor (0 without one).
    fn of_floor(&self) -> f64 {
        match self.floor_us > 0.0 {
            true => self.reported.p50 / self.floor_us,
            false => 0.0,
        }
    }
}

/// Prints the table's header lines (rank 0).
pub fn header(a: &MoeArgs, phase: Phase, ranks: usize, latency: f64) {
    let c = &a.job;
    report::out(report::header(phase_name(phase), &c.backend, ranks));
    report::out(format_args!(
        "# hidden {} topk {} experts {} dtype {} routing {} api {} expert {}",
        a.hidden, a.topk, a.experts, a.dtype, a.routing, c.api, a.expert
    ));
    report::out(format_args!(
        "#  medians of {} repetitions, each phase at its slowest rank; GB/s: bytes of the \
         token rows sent to other ranks / phase time; time(us): {}; p99 from {} repetitions",
        a.reps(),
        match phase {
            Phase::Both => "dispatch + combine",
            Phase::Dispatch => "dispatch",
            Phase::Combine => "combine",
        },
        report::MIN_SAMPLES_FOR_P99
    ));
    report::out(format_args!(
        "#  floor(us): one transfer of the row bytes a rank sends (put + signal + the receiver \
         reading them, ranks 0-1) + one more signal ({latency:.2} us); x_floor = time / \
         floor{}",
        match (a.expert.as_str(), a.expert_us > 0.0) {
            (_, true) => format!(
                "; experts modelled as {} us asleep per (token, expert) row; layer(us): \
                 dispatch + expert + barrier + combine",
                a.expert_us
            ),
            ("copy", _) => "; layer(us): dispatch + expert + combine, no barrier between".into(),
            _ => String::new(),
        }
    ));
    if let Some(e) = a.eplb {
        report::out(format_args!(
            "#  eplb: {} replica slots in all, {} policy, the map from the warm-up steps' load \
             (xccl::moe::rebalance); rows without and with EPLB, repetitions interleaved; \
             imbal: busiest rank's (token, expert) rows / mean",
            e.extra,
            crate::options::policy_name(e.policy)
        ));
    }
    report::out(columns(a));
}

/// Column titles of the MoE table.
fn columns(a: &MoeArgs) -> String {
    let mut s = format!(
        "#{:>10} {:>9} {:>7} {:>9} {:>11} {:>12} {:>10} {:>12} {:>10} {:>10} {:>9} {:>9} {:>7} {:>7}",
        "mode",
        "dispatch",
        "tokens",
        "rows_out",
        "bytes",
        "dispatch(us)",
        "disp(GB/s)",
        "combine(us)",
        "comb(GB/s)",
        "time(us)",
        "p99(us)",
        "floor(us)",
        "x_floor",
        "#wrong"
    );
    if a.timed_experts() {
        s += &format!(
            " {:>10} {:>10} {:>10}",
            "expert(us)", "layer(us)", "lay_p99"
        );
    }
    if shows_balance(a) {
        s += &format!(" {:>6} {:>10}", "imbal", "eplb");
    }
    if a.job.baseline {
        s += &format!(" {:>10} {:>8} {:>8}", "base(us)", "x_disp", "x_comb");
    }
    if crosses_hosts() {
        s += &format!(" {:>10}", "rows_xhost");
    }
    s
}

/// Whether the ranks run on several (real or emulated) hosts: the table then counts the rows
/// that crossed hosts.
fn crosses_hosts() -> bool {
    report::job_hosts() > 1
}

/// A p99 for the table: "-" with too few samples.
fn p99_text(p99: Option<f64>) -> String {
    p99.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

/// Whether the table shows the load imbalance and the EPLB column.
fn shows_balance(a: &MoeArgs) -> bool {
    a.expert_us > 0.0 || a.eplb.is_some()
}

/// The EPLB column: `EXTRA,POLICY`, or `-`.
fn eplb_text(e: Option<Eplb>) -> String {
    e.map_or_else(|| "-".to_string(), |e| e.to_string())
}

/// One table line.
pub fn line(a: &MoeArgs, m: &Measured) -> String {
    let mut s = format!(
        " {:>10} {:>9} {:>7} {:>9} {:>11} {:>12.1} {:>10.2} {:>12.1} {:>10.2} {:>10.1} {:>9} {:>9.1} {:>7.2} {:>7}",
        m.variant.mode(),
        m.dispatch(),
        m.tokens,
        m.rows,
        m.bytes,
        m.disp.p50,
        m.gbps(m.disp.p50),
        m.comb.p50,
        m.gbps(m.comb.p50),
        m.reported.p50,
        p99_text(m.reported.p99),
        m.floor_us,
        m.of_floor(),
        report::wrong_text(m.wrong)
    );
    if let (Some(e), Some(l)) = (m.expert, m.layer) {
        s += &format!(" {:>10.1} {:>10.1} {:>10}", e.p50, l.p50, p99_text(l.p99));
    }
    if shows_balance(a) {
        s += &format!(" {:>6.2} {:>10}", m.imbalance, eplb_text(m.eplb));
    }
    if let Some(base) = m.base_us {
        s += &format!(
            " {base:>10.1} {:>8.2} {:>8.2}",
            m.of_base(m.disp.p50),
            m.of_base(m.comb.p50)
        );
    }
    if let Some(x) = m.rows_cross_host {
        s += &format!(" {x:>10}");
    }
    s
}

/// The JSON row of one configuration.
pub fn row(a: &MoeArgs, phase: Phase, n: usize, m: &Measured) -> Row {
    let r = &m.reported;
    let gbps = m.gbps(r.p50);
    Row {
        op: phase_name(phase),
        backend: report::backend_name(&a.job.backend),
        ranks: n,
        bytes: m.bytes,
        count: None,
        dtype: dtype_of(a).1,
        p50_us: r.p50,
        p99_us: r.p99,
        min_us: r.min,
        max_us: r.max,
        samples: r.samples,
        algbw: gbps,
        busbw: gbps,
        wrong: m.wrong,
        baseline_us: m.base_us,
        baseline_gbps: m.base_us.map(|us| report::gbps(m.my_bytes, us)),
        stream_gbps: None,
        moe: Some(MoeFields {
            tokens: m.tokens,
            hidden: a.hidden,
            topk: a.topk,
            experts: a.experts,
            mode: m.variant.mode(),
            dispatch: m.dispatch(),
            expert: if a.expert == "copy" {
                "copy"
            } else {
                "identity"
            },
            routing: a.routing.to_string(),
            dispatch_us_p50: m.disp.p50,
            combine_us_p50: m.comb.p50,
            dispatch_gbps: m.gbps(m.disp.p50),
            combine_gbps: m.gbps(m.comb.p50),
            rows_out: m.rows,
            floor_us: m.floor_us,
            expert_us_p50: m.expert.map(|s| s.p50),
            layer_us_p50: m.layer.map(|s| s.p50),
            layer_us_p99: m.layer.and_then(|s| s.p99),
            expert_us_per_row: (a.expert_us > 0.0).then_some(a.expert_us),
            imbalance: shows_balance(a).then_some(m.imbalance),
            eplb: m.eplb.map(|e| e.to_string()),
            rows_cross_host: m.rows_cross_host,
            bytes_cross_host: m
                .rows_cross_host
                .map(|r| r as usize * a.hidden * dtype_size(a)),
        }),
    }
}

/// Bytes per element of the rows as they travel (INT8 dispatch counts its bf16 rows).
fn dtype_size(a: &MoeArgs) -> usize {
    dtype_of(a).0.size()
}

/// The comparison line under a pair of rows routed two ways across hosts (`--levels`):
/// dispatch + combine p50, and the rows that crossed hosts.
pub fn levels_ratio(first: &Measured, second: &Measured) -> String {
    let both = |m: &Measured| m.disp.p50 + m.comb.p50;
    let (a, b) = (both(first), both(second));
    let rows = match (first.rows_cross_host, second.rows_cross_host) {
        (Some(x), Some(y)) if y > 0 => format!(
            ", rows across hosts {x} -> {y} ({:.2}x fewer)",
            x as f64 / y as f64
        ),
        _ => String::new(),
    };
    format!(
        "#  {} vs {}: dispatch+combine p50 {a:.1} -> {b:.1} us ({:.2}x faster){rows}",
        second.dispatch(),
        first.dispatch(),
        if b > 0.0 { a / b } else { 0.0 },
    )
}

/// The comparison line under a pair of rows without and with EPLB: layer p50 (when timed),
/// dispatch + combine p50, and the imbalance.
pub fn eplb_ratio(without: &Measured, with: &Measured) -> String {
    let change = |a: f64, b: f64| match a > 0.0 {
        true => format!("{:+.1} %", (b / a - 1.0) * 100.0),
        false => "-".into(),
    };
    let both = |m: &Measured| m.disp.p50 + m.comb.p50;
    let layer = match (without.layer, with.layer) {
        (Some(a), Some(b)) => format!(
            "layer p50 {:.1} -> {:.1} us ({}), ",
            a.p50,
            b.p50,
            change(a.p50, b.p50)
        ),
        _ => String::new(),
    };
    format!(
        "#  eplb vs without: {layer}dispatch+combine p50 {:.1} -> {:.1} us ({}), imbalance \
         {:.2} -> {:.2}",
        both(without),
        both(with),
        change(both(without), both(with)),
        without.imbalance,
        with.imbalance
    )
}
