//! `xccl-perf moe`, `dispatch`, `combine`: MoE dispatch + combine in either mode, timed
//! separately the way the Open MPI reference in `shared/bench` (moe_mpi) does: per
//! repetition, a barrier, then each phase timed on every rank and counted at the slowest
//! rank; medians over repetitions. One table row per (token count, mode, dispatch) of the
//! sweep, side by side, each with its phases' times and GB/s (bytes = token rows sent to
//! other ranks), the floor of its bytes measured in the same run (`moe_floor.rs`), and every
//! output checked (workload, experts and check in `moe_work.rs`; the table in
//! `moe_table.rs`). With `--expert copy` the experts are timed too and a layer (dispatch →
//! expert → combine, no barrier between) is timed as one.

use crate::memcpy_baseline::Memcpy;
use crate::moe_floor;
use crate::moe_table::{self, Measured, Variant};
use crate::moe_work::{count_wrong, run_experts, Expert, Workload};
use crate::options::MoeArgs;
use crate::report;
use crate::session;
use std::time::{Duration, Instant};
use xccl::coll::{Coll, ReduceOp};
use xccl::copy::copy_slice;
use xccl::moe::{Dispatched, Dispatcher, Dtype, Mode};
use xccl::{Communicator, Error, Result};

/// Which phase the table reports (both always run: combine checks what dispatch delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dispatch,
    Combine,
    Both,
}

/// Per repetition, the slowest rank's time of each part (µs).
#[derive(Default)]
struct Times {
    disp: Vec<f64>,
    expert: Vec<f64>,
    comb: Vec<f64>,
    layer: Vec<f64>,
}

/// How one configuration runs.
struct Run<'w> {
    work: &'w Workload,
    expert: Expert,
    zero_copy: bool,
    in_window: bool,
}

/// The repetitions. Each writes the input rows anew (untimed) where the dispatch takes them,
/// as a layer's producer does, then: a barrier, dispatch, the experts, and combine. With
/// identity experts, a barrier before combine too and the experts untimed; with copy experts
/// no barrier between the parts and the whole layer timed as well. Returns the times and the
/// last output.
fn time_reps(
    moe: &mut Dispatcher<'_>,
    comm: &Communicator,
    coll: &Coll<'_>,
    run: &Run<'_>,
    (warm, reps): (usize, usize),
) -> Result<(Times, Vec<u8>)> {
    let work = run.work;
    let mut times = Times::default();
    let mut reduced: Vec<u8> = Vec::new();
    let mut sums: Vec<f32> = Vec::new();
    let mut x = work.x.clone();
    let mut out = vec![0u8; work.x.len()];
    let tokens = work.idx.len() / work.cfg.topk;
    let timed_expert = run.expert == Expert::Copy;
    for rep in 0..warm + reps {
        // An alias-safe copy: a heap-to-heap `memcpy` 16 bytes off a page apart runs ~20×
        // slower here and disturbs the timed dispatch after it.
        match moe {
            Dispatcher::Normal(b) if run.zero_copy => copy_slice(b.input(tokens)?, &work.x),
            _ => copy_slice(&mut x, &work.x),
        }
        comm.barrier()?;
        let s0 = Instant::now();
        let mut view = match moe {
            Dispatcher::Normal(b) if run.zero_copy => {
                Dispatched::Normal(b.dispatch_in_place(&work.idx, &work.w)?)
            }
            _ => moe.dispatch(&x, &work.idx, &work.w)?,
        };
        let s1 = Instant::now();
        run_experts(
            &mut view,
            run.expert,
            run.in_window,
            (&mut reduced, &mut sums),
        )?;
        let _ = view;
        if !timed_expert {
            comm.barrier()?;
        }
        let s2 = Instant::now();
        match moe {
            _ if run.in_window => moe.combine_in_place(&mut out)?,
            Dispatcher::LowLatency(b) => b.combine(&reduced, &mut out)?,
            Dispatcher::Normal(b) => b.combine(&reduced, &mut out)?,
        }
        let s3 = Instant::now();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let mut slow = [us(s1 - s0), us(s2 - s1), us(s3 - s2), us(s3 - s0)];
        coll.allreduce(&mut slow, ReduceOp::Max)?;
        if rep >= warm {
            times.disp.push(slow[0]);
            times.expert.push(slow[1]);
            times.comb.push(slow[2]);
            times.layer.push(slow[3]);
        }
    }
    if !timed_expert {
        times.expert.clear();
        times.layer.clear();
    }
    Ok((times, out))
}

/// The row type of `-d`.
pub fn dtype_of(a: &MoeArgs) -> (Dtype, &'static str) {
    match a.dtype.as_str() {
        "f32" => (Dtype::F32, "f32"),
        "f16" => (Dtype::F16, "f16"),
        "int8" => (Dtype::Bf16, "int8"),
        _ => (Dtype::Bf16, "bf16"),
    }
}

/// The experts of `--expert`.
fn expert_of(a: &MoeArgs) -> Expert {
    match a.expert.as_str() {
        "copy" => Expert::Copy,
        _ => Expert::Identity,
    }
}

/// Measures one configuration of the sweep: `tokens` tokens per rank in `variant`.
fn measure(
    a: &MoeArgs,
    phase: Phase,
    (comm, coll): (&Communicator, &Coll<'_>),
    tokens: usize,
    variant: Variant,
    latency: f64,
) -> Result<Measured> {
    let c = &a.job;
    let (me, n) = (comm.rank(), comm.world_size());
    let (dtype, _) = dtype_of(a);
    let mut work = Workload::new(a, tokens, dtype, me);
    work.cfg.zero_copy_dispatch = variant.zero_copy;
    let mode = match variant.low_latency {
        true => Mode::LowLatency,
        false => Mode::Normal,
    };
    let mut moe = Dispatcher::new(comm, work.cfg.clone(), mode)?;
    let placement = work.cfg.placement_for(n)?;
    let mut cross = [work.rows_out(&placement, me)];
    let my_bytes = cross[0] as usize * work.cfg.row_bytes();
    coll.allreduce(&mut cross, ReduceOp::Sum)?;
    let run = Run {
        work: &work,
        expert: expert_of(a),
        zero_copy: variant.zero_copy,
        in_window: c.api == "window",
    };
    let (times, mut out) = time_reps(&mut moe, comm, coll, &run, (a.warmup(), a.reps()))?;
    if c.inject_error && tokens > 0 {
        let v = dtype.load(&out, 0);
        dtype.store(&mut out, 0, v + 1.0 + 2.0 * v.abs());
    }
    // `-c 0`: no element is looked at (and none counted wrong).
    let mut wrong = [if c.no_check() {
        0
    } else {
        count_wrong(&work, &out, |t| work.gain(t, &placement, run.expert))
    }];
    coll.allreduce(&mut wrong, ReduceOp::Sum)?;
    moe.close()?;
    // After the repetitions (slowest rank): the floor, and with `--baseline` one in-process
    // memcpy of the bytes a rank sends to the others.
    let timeout = Duration::from_secs_f64(c.timeout);
    let floor = moe_floor::floor_us(comm, coll, my_bytes, latency, timeout)?;
    let mut base = [0f64];
    if c.baseline {
        base[0] = Memcpy::new(my_bytes).time_us(my_bytes, a.reps());
        coll.allreduce(&mut base, ReduceOp::Max)?;
    }
    let reported: Vec<f64> = match phase {
        Phase::Dispatch => times.disp.clone(),
        Phase::Combine => times.comb.clone(),
        Phase::Both => times
            .disp
            .iter()
            .zip(&times.comb)
            .map(|(d, c)| d + c)
            .collect(),
    };
    let timed = |v: &[f64]| (!v.is_empty()).then(|| report::stats(v));
    Ok(Measured {
        tokens,
        variant,
        disp: report::stats(&times.disp),
        comb: report::stats(&times.comb),
        expert: timed(&times.expert),
        layer: timed(&times.layer),
        reported: report::stats(&reported),
        rows: cross[0],
        bytes: cross[0] as usize * work.cfg.row_bytes(),
        my_bytes,
        floor_us: floor,
        base_us: c.baseline.then_some(base[0]),
        wrong: (!c.no_check()).then_some(wrong[0]),
    })
}

pub fn run(a: &MoeArgs, phase: Phase) -> Result<()> {
    let c = &a.job;
    let comm = session::connect(c)?;
    let (me, n) = (comm.rank(), comm.world_size());
    let coll = Coll::new(&comm)?;
    let timeout = Duration::from_secs_f64(c.timeout);
    let latency = moe_floor::signal_latency_us(&comm, &coll, timeout)?;
    if me == 0 {
        moe_table::header(a, phase, n, latency);
    }
    let mut rows = Vec::new();
    let mut wrong = 0;
    for &tokens in &a.tokens {
        for (mode, kind) in a.variants() {
            let variant = Variant::new(mode, kind);
            let m = measure(a, phase, (&comm, &coll), tokens, variant, latency)?;
            wrong += m.wrong.unwrap_or(0);
            if me == 0 {
                report::out(moe_table::line(&m));
            }
            rows.push(moe_table::row(a, phase, n, &m));
        }
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
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Dispatch => "dispatch",
        Phase::Combine => "combine",
        Phase::Both => "moe",
    }
}
