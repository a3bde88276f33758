//! `xccl-perf moe`, `dispatch`, `combine`: MoE dispatch + combine in either mode, timed
//! separately the way the Open MPI reference in `shared/bench` (moe_mpi) does: per
//! repetition, a barrier, then each phase timed on every rank and counted at the slowest
//! rank; medians over repetitions. One table row per token count of the sweep, with each
//! phase's time and GB/s (bytes = token rows sent to other ranks), every output checked
//! (workload and check in `moe_work.rs`).

use crate::memcpy_baseline::Memcpy;
use crate::moe_work::{count_wrong, run_experts, Workload};
use crate::options::MoeArgs;
use crate::report::{self, MoeFields, Row, Stats};
use crate::session;
use std::time::Instant;
use xccl::coll::{Coll, ReduceOp};
use xccl::moe::{Dispatcher, Dtype, Mode};
use xccl::{Communicator, Error, Result};

/// Which phase the table reports (both always run: combine checks what dispatch delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dispatch,
    Combine,
    Both,
}

/// The repetitions: per repetition a barrier, then dispatch and combine each timed and
/// counted at the slowest rank. Returns both phases' times and the last output.
fn time_reps(
    moe: &mut Dispatcher<'_>,
    comm: &Communicator,
    coll: &Coll<'_>,
    work: &Workload,
    (warm, reps): (usize, usize),
    in_window: bool,
) -> Result<(Vec<f64>, Vec<f64>, Vec<u8>)> {
    let mut disp_times = Vec::with_capacity(reps);
    let mut comb_times = Vec::with_capacity(reps);
    let mut reduced: Vec<u8> = Vec::new();
    let mut out = vec![0u8; work.x.len()];
    for rep in 0..warm + reps {
        comm.barrier()?;
        let s = Instant::now();
        let mut view = moe.dispatch(&work.x, &work.idx, &work.w)?;
        let d = s.elapsed().as_secs_f64() * 1e6;
        run_experts(&mut view, in_window, &mut reduced)?;
        comm.barrier()?;
        let s = Instant::now();
        match moe {
            _ if in_window => moe.combine_in_place(&mut out)?,
            Dispatcher::LowLatency(b) => b.combine(&reduced, &mut out)?,
            Dispatcher::Normal(b) => b.combine(&reduced, &mut out)?,
        }
        let cb = s.elapsed().as_secs_f64() * 1e6;
        let mut slow = [d, cb];
        coll.allreduce(&mut slow, ReduceOp::Max)?;
        if rep >= warm {
            disp_times.push(slow[0]);
            comb_times.push(slow[1]);
        }
    }
    Ok((disp_times, comb_times, out))
}

/// What one configuration measured.
struct Measured {
    disp: Stats,
    comb: Stats,
    /// The phase (or both, summed per repetition) the row's time is of.
    reported: Stats,
    /// Rows and bytes all ranks sent to other ranks; bytes this rank sent.
    rows: u64,
    bytes: usize,
    my_bytes: usize,
    /// The slowest rank's memcpy of the bytes it sends (`--baseline`).
    base_us: Option<f64>,
    wrong: Option<u64>,
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
}

/// Column titles of the MoE table.
fn columns(baseline: bool) -> String {
    let mut s = format!(
        "#{:>8} {:>10} {:>12} {:>12} {:>10} {:>12} {:>10} {:>10} {:>10} {:>7}",
        "tokens",
        "rows_out",
        "bytes",
        "dispatch(us)",
        "disp(GB/s)",
        "combine(us)",
        "comb(GB/s)",
        "time(us)",
        "p99(us)",
        "#wrong"
    );
    if baseline {
        s += &format!(" {:>10} {:>8} {:>8}", "base(us)", "x_disp", "x_comb");
    }
    s
}

/// One table line.
fn line(tokens: usize, m: &Measured) -> String {
    let p99 = m
        .reported
        .p99
        .map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let mut s = format!(
        " {tokens:>8} {:>10} {:>12} {:>12.1} {:>10.2} {:>12.1} {:>10.2} {:>10.1} {p99:>10} {:>7}",
        m.rows,
        m.bytes,
        m.disp.p50,
        m.gbps(m.disp.p50),
        m.comb.p50,
        m.gbps(m.comb.p50),
        m.reported.p50,
        report::wrong_text(m.wrong)
    );
    if let Some(base) = m.base_us {
        s += &format!(
            " {base:>10.1} {:>8.2} {:>8.2}",
            m.of_base(m.disp.p50),
            m.of_base(m.comb.p50)
        );
    }
    s
}

/// The JSON row of one configuration.
fn row(
    a: &MoeArgs,
    phase: Phase,
    n: usize,
    tokens: usize,
    cfg_dtype: &'static str,
    m: &Measured,
) -> Row {
    let r = &m.reported;
    let gbps = m.gbps(r.p50);
    Row {
        op: phase_name(phase),
        backend: a.job.backend.clone(),
        ranks: n,
        bytes: m.bytes,
        count: None,
        dtype: cfg_dtype,
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
            tokens,
            hidden: a.hidden,
            topk: a.topk,
            experts: a.experts,
            mode: if a.mode == "low-latency" {
                "low-latency"
            } else {
                "normal"
            },
            routing: a.routing.to_string(),
            dispatch_us_p50: m.disp.p50,
            combine_us_p50: m.comb.p50,
            dispatch_gbps: m.gbps(m.disp.p50),
            combine_gbps: m.gbps(m.comb.p50),
            rows_out: m.rows,
        }),
    }
}

/// The row type of `-d`.
fn dtype_of(a: &MoeArgs) -> (Dtype, &'static str) {
    match a.dtype.as_str() {
        "f32" => (Dtype::F32, "f32"),
        "f16" => (Dtype::F16, "f16"),
        "int8" => (Dtype::Bf16, "int8"),
        _ => (Dtype::Bf16, "bf16"),
    }
}

/// Measures one configuration of the sweep: `tokens` tokens per rank.
fn measure(
    a: &MoeArgs,
    phase: Phase,
    comm: &Communicator,
    coll: &Coll<'_>,
    tokens: usize,
) -> Result<Measured> {
    let c = &a.job;
    let (me, n) = (comm.rank(), comm.world_size());
    let (dtype, _) = dtype_of(a);
    let work = Workload::new(a, tokens, dtype, me);
    let ll = a.mode == "low-latency";
    let mode = if ll { Mode::LowLatency } else { Mode::Normal };
    let mut moe = Dispatcher::new(comm, work.cfg.clone(), mode)?;
    let placement = work.cfg.placement_for(n)?;
    let mut cross = [work.rows_out(&placement, me, ll)];
    let my_bytes = cross[0] as usize * work.cfg.row_bytes();
    coll.allreduce(&mut cross, ReduceOp::Sum)?;
    let reps = (a.warmup(), a.reps());
    let (disp, comb, mut out) = time_reps(&mut moe, comm, coll, &work, reps, c.api == "window")?;
    if c.inject_error && tokens > 0 {
        let v = dtype.load(&out, 0);
        dtype.store(&mut out, 0, v + 1.0 + 2.0 * v.abs());
    }
    // `-c 0`: no element is looked at (and none counted wrong).
    let mut wrong = [if c.no_check() {
        0
    } else {
        count_wrong(&work, &out)
    }];
    coll.allreduce(&mut wrong, ReduceOp::Sum)?;
    // `--baseline`: one in-process memcpy of the bytes a rank sends to the others, timed after
    // the repetitions (slowest rank).
    let mut base = [0f64];
    if c.baseline {
        base[0] = Memcpy::new(my_bytes).time_us(my_bytes, a.reps());
        coll.allreduce(&mut base, ReduceOp::Max)?;
    }
    moe.close()?;
    let reported: Vec<f64> = match phase {
        Phase::Dispatch => disp.clone(),
        Phase::Combine => comb.clone(),
        Phase::Both => disp.iter().zip(&comb).map(|(d, c)| d + c).collect(),
    };
    Ok(Measured {
        disp: report::stats(&disp),
        comb: report::stats(&comb),
        reported: report::stats(&reported),
        rows: cross[0],
        bytes: cross[0] as usize * work.cfg.row_bytes(),
        my_bytes,
        base_us: c.baseline.then_some(base[0]),
        wrong: (!c.no_check()).then_some(wrong[0]),
    })
}

pub fn run(a: &MoeArgs, phase: Phase) -> Result<()> {
    let c = &a.job;
    let comm = session::connect(c)?;
    let (me, n) = (comm.rank(), comm.world_size());
    let coll = Coll::new(&comm)?;
    let (_, dtype_name) = dtype_of(a);
    if me == 0 {
        report::out(report::header(phase_name(phase), &c.backend, n));
        report::out(format_args!(
            "# hidden {} topk {} experts {} mode {} dtype {} routing {} api {}",
            a.hidden, a.topk, a.experts, a.mode, a.dtype, a.routing, c.api
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
        report::out(columns(c.baseline));
    }
    let mut rows = Vec::new();
    let mut wrong = 0;
    for &tokens in &a.tokens {
        let m = measure(a, phase, &comm, &coll, tokens)?;
        wrong += m.wrong.unwrap_or(0);
        if me == 0 {
            report::out(line(tokens, &m));
        }
        rows.push(row(a, phase, n, tokens, dtype_name, &m));
    }
    // Every rank counted every rank's wrong elements (summed), so all fail alike.
    report::finish(me, c, &rows, 0)?;
    if wrong > 0 {
        return Err(Error::ProtocolViolation(format!(
            "check failed: {wrong} wrong elements"
        )));
    }
    coll.close()?;
    comm.close()
}

/// The subcommand's name.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Dispatch => "dispatch",
        Phase::Combine => "combine",
        Phase::Both => "moe",
    }
}
