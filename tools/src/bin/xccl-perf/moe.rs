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
use crate::options::{Eplb, MoeArgs};
use crate::report;
use crate::session;
use std::time::{Duration, Instant};
use xccl::coll::{Coll, ReduceOp};
use xccl::copy::copy_slice;
use xccl::moe::{rebalance, Dispatched, Dispatcher, Dtype, MapShape, Mode, ReplicaPolicy};
use xccl::{Communicator, Error, Result};

/// Which phase the table reports (both always run: combine checks what dispatch delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dispatch,
    Combine,
    Both,
}

/// Per repetition, the slowest rank's time of each part (µs), and the busiest rank's
/// (token, expert) rows over the mean.
#[derive(Default)]
struct Times {
    disp: Vec<f64>,
    expert: Vec<f64>,
    comb: Vec<f64>,
    layer: Vec<f64>,
    imbalance: Vec<f64>,
    /// Rows all ranks received from other ranks, and from ranks on other hosts, in the last
    /// repetition.
    cross: u64,
    cross_host: u64,
}

/// How one configuration runs.
struct Run<'w> {
    work: &'w Workload,
    expert: Expert,
    zero_copy: bool,
    in_window: bool,
    /// Modelled expert time per (token, expert) row received (`--expert-us`).
    expert_us: f64,
    /// The experts and the layer are timed.
    timed: bool,
}

impl Run<'_> {
    /// A barrier before combine: with untimed experts (combine alone), and with modelled
    /// expert time (combine timed alone; the layer includes the barrier's wait for the
    /// busiest rank's experts). Copy experts run the layer straight through.
    fn barrier_before_combine(&self) -> bool {
        !self.timed || self.expert_us > 0.0
    }
}

/// Buffers one configuration's repetitions reuse.
struct Scratch {
    reduced: Vec<u8>,
    x: Vec<u8>,
    out: Vec<u8>,
}

impl Scratch {
    fn new(work: &Workload) -> Self {
        Scratch {
            reduced: Vec::new(),
            x: work.x.clone(),
            out: vec![0u8; work.x.len()],
        }
    }
}

/// Repetition `rep` (its routing: `Workload::draw`). It writes the input rows anew
/// (untimed) where the dispatch takes them, as a layer's producer does, then: a barrier,
/// dispatch, the experts (with `--expert-us`, then asleep until X µs per (token, expert) row
/// have passed since dispatch returned), a barrier if `Run::barrier_before_combine`, and
/// combine. Adds the times to `times` (none during warm-up); the output is left in
/// `scratch.out`.
fn one_rep(
    moe: &mut Dispatcher<'_>,
    (comm, coll): (&Communicator, &Coll<'_>),
    run: &Run<'_>,
    rep: usize,
    scratch: &mut Scratch,
    times: Option<&mut Times>,
) -> Result<()> {
    let work = run.work;
    let draw = work.draw(rep);
    let tokens = draw.idx.len() / work.cfg.topk;
    // An alias-safe copy: a heap-to-heap `memcpy` 16 bytes off a page apart runs ~20×
    // slower here and disturbs the timed dispatch after it.
    match moe {
        Dispatcher::Normal(b) if run.zero_copy => copy_slice(b.input(tokens)?, &work.x),
        _ => copy_slice(&mut scratch.x, &work.x),
    }
    comm.barrier()?;
    let s0 = Instant::now();
    let mut view = match moe {
        Dispatcher::Normal(b) if run.zero_copy => {
            Dispatched::Normal(b.dispatch_in_place(&draw.idx, &draw.w)?)
        }
        _ => moe.dispatch(&scratch.x, &draw.idx, &draw.w)?,
    };
    let s1 = Instant::now();
    let me = comm.rank();
    let from = |keep: &dyn Fn(usize) -> bool| -> u64 {
        (view.sources().iter().enumerate())
            .filter(|&(src, _)| keep(src))
            .map(|(_, &c)| c as u64)
            .sum()
    };
    let hosts = comm.hosts();
    let from_others = from(&|src| src != me);
    let from_other_hosts = from(&|src| !hosts.same_host(src, me));
    let pairs = run_experts(&mut view, run.expert, run.in_window, &mut scratch.reduced)?;
    let _ = view;
    if run.expert_us > 0.0 {
        let until = s1 + Duration::from_secs_f64(pairs as f64 * run.expert_us * 1e-6);
        if let Some(left) = until.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
    }
    if run.barrier_before_combine() {
        comm.barrier()?;
    }
    let s2 = Instant::now();

    match moe {
        _ if run.in_window => moe.combine_in_place(&mut scratch.out)?,
        Dispatcher::LowLatency(b) => b.combine(&scratch.reduced, &mut scratch.out)?,
        Dispatcher::Normal(b) => b.combine(&scratch.reduced, &mut scratch.out)?,
    }
    let s3 = Instant::now();
    // Rows that crossed hosts, both ways: what this rank sent (normal mode: it knows, relays
    // and partial sums included), or one row each way per row received from another host.
    let crossed_hosts = match moe {
        Dispatcher::Normal(b) => {
            let (d, c) = b.rows_across_hosts();
            (d + c) as u64
        }
        Dispatcher::LowLatency(_) => 2 * from_other_hosts,
    };
    let Some(times) = times else {
        return Ok(());
    };
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut slow = [
        us(s1 - s0),
        us(s2 - s1),
        us(s3 - s2),
        us(s3 - s0),
        pairs as f64,
    ];
    coll.allreduce(&mut slow, ReduceOp::Max)?;
    let mut all = [pairs as u64, from_others, crossed_hosts];
    coll.allreduce(&mut all, ReduceOp::Sum)?;
    (times.cross, times.cross_host) = (all[1], all[2]);
    times.disp.push(slow[0]);
    times.expert.push(slow[1]);
    times.comb.push(slow[2]);
    times.layer.push(slow[3]);
    let mean = all[0] as f64 / comm.world_size() as f64;
    times
        .imbalance
        .push(if mean > 0.0 { slow[4] / mean } else { 1.0 });
    Ok(())
}

/// One buffer of a configuration with its scratch and times.
struct Arm<'c, 'w> {
    moe: Dispatcher<'c>,
    run: Run<'w>,
    scratch: Scratch,
    times: Times,
    eplb: Option<Eplb>,
}

impl Arm<'_, '_> {
    /// The warm-up repetitions.
    fn warm_up(&mut self, cc: (&Communicator, &Coll<'_>), warm: usize) -> Result<()> {
        for rep in 0..warm {
            one_rep(&mut self.moe, cc, &self.run, rep, &mut self.scratch, None)?;
        }
        Ok(())
    }

    /// Timed repetition `rep`.
    fn timed(&mut self, cc: (&Communicator, &Coll<'_>), rep: usize) -> Result<()> {
        let times = Some(&mut self.times);
        one_rep(&mut self.moe, cc, &self.run, rep, &mut self.scratch, times)
    }
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

/// The EPLB map for the load the arm's warm-up steps dispatched (summed over ranks):
/// `EXTRA` replica slots in all over the ranks.
fn eplb_config(
    arm: &mut Arm<'_, '_>,
    coll: &Coll<'_>,
    eplb: Eplb,
    n: usize,
) -> Result<xccl::moe::MoeConfig> {
    let load = arm.moe.take_stats().job_expert_rows(coll)?;
    let load: Vec<f64> = load.iter().map(|&v| v as f64).collect();
    let mut cfg = arm.moe.config().clone();
    let shape = MapShape {
        ranks: n,
        slots_per_rank: cfg.experts.div_ceil(n) + eplb.extra.div_ceil(n),
        ranks_per_host: (eplb.policy == ReplicaPolicy::LocalFirst).then_some(n),
    };
    cfg.map = Some(rebalance(&load, &shape, None)?);
    cfg.ranks_per_host = shape.ranks_per_host;
    cfg.replica_policy = eplb.policy;

    Ok(cfg)
}

/// Measures one configuration of the sweep: `tokens` tokens per rank in `variant`; with
/// `--eplb`, without and with EPLB (the map from the warm-up steps without), repetitions
/// interleaved. One `Measured` per arm.
fn measure(
    a: &MoeArgs,
    phase: Phase,
    (comm, coll): (&Communicator, &Coll<'_>),
    tokens: usize,
    variant: Variant,
    latency: f64,
) -> Result<Vec<Measured>> {
    let c = &a.job;
    let (me, n) = (comm.rank(), comm.world_size());
    let (dtype, _) = dtype_of(a);
    let mut work = Workload::new(a, tokens, dtype, me);
    work.cfg.zero_copy_dispatch = variant.zero_copy;
    let mode = match variant.low_latency {
        true => Mode::LowLatency,
        false => Mode::Normal,
    };
    let placement = work.cfg.placement_for(n)?;
    let my_bytes = work.rows_out(&placement, me) as usize * work.cfg.row_bytes();
    let run = || Run {
        work: &work,
        expert: expert_of(a),
        zero_copy: variant.zero_copy,
        in_window: c.api == "window",
        expert_us: a.expert_us,
        timed: a.timed_experts(),
    };
    let cc = (comm, coll);
    let (warm, reps) = (a.warmup(), a.reps());
    // One arm per routing across hosts (`--levels`; low-latency mode has one).
    let mut levels = a.two_levels();
    if variant.low_latency {
        levels.truncate(1);
    }
    let mut arms = Vec::with_capacity(levels.len());
    for &level in &levels {
        let mut cfg = work.cfg.clone();
        cfg.two_level = level;
        let mut arm = Arm {
            moe: Dispatcher::new(comm, cfg, mode)?,
            run: run(),
            scratch: Scratch::new(&work),
            times: Times::default(),
            eplb: None,
        };
        arm.warm_up(cc, warm)?;
        arms.push(arm);
    }
    if let Some(eplb) = a.eplb {
        let cfg = eplb_config(&mut arms[0], coll, eplb, n)?;
        let mut arm = Arm {
            moe: Dispatcher::new(comm, cfg, mode)?,
            run: run(),
            scratch: Scratch::new(&work),
            times: Times::default(),
            eplb: Some(eplb),
        };
        arm.warm_up(cc, warm)?;
        arms.push(arm);
    }
    for rep in warm..warm + reps {
        for arm in arms.iter_mut() {
            arm.timed(cc, rep)?;
        }
    }
    // After the repetitions (slowest rank): the floor, and with `--baseline` one in-process
    // memcpy of the bytes a rank sends to the others.
    let timeout = Duration::from_secs_f64(c.timeout);
    let floor = moe_floor::floor_us(comm, coll, my_bytes, latency, timeout)?;
    let mut base = [0f64];
    if c.baseline {
        base[0] = Memcpy::new(my_bytes).time_us(my_bytes, reps);
        coll.allreduce(&mut base, ReduceOp::Max)?;
    }
    let last = work.draw(warm + reps - 1);
    let mut measured = Vec::new();
    for mut arm in arms {
        if c.inject_error && tokens > 0 {
            let v = dtype.load(&arm.scratch.out, 0);
            dtype.store(&mut arm.scratch.out, 0, v + 1.0 + 2.0 * v.abs());
        }
        // `-c 0`: no element is looked at (and none counted wrong).
        let out = &arm.scratch.out;
        let expert = arm.run.expert;
        let mut wrong = [match c.no_check() {
            true => 0,
            false => count_wrong(&work, out, |t| work.gain(last, t, &placement, expert)),
        }];
        coll.allreduce(&mut wrong, ReduceOp::Sum)?;
        let two_level = matches!(&arm.moe, Dispatcher::Normal(b) if b.two_level());
        arm.moe.close()?;
        let times = &arm.times;
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
        let timed = |v: &[f64]| (a.timed_experts() && !v.is_empty()).then(|| report::stats(v));
        let cross = [times.cross];
        let cross_host = (comm.hosts().count() > 1).then_some(times.cross_host);
        measured.push(Measured {
            tokens,
            variant,
            two_level,
            eplb: arm.eplb,
            disp: report::stats(&times.disp),
            comb: report::stats(&times.comb),
            expert: timed(&times.expert),
            layer: timed(&times.layer),
            imbalance: report::stats(&times.imbalance).p50,
            reported: report::stats(&reported),
            rows: cross[0],
            bytes: cross[0] as usize * work.cfg.row_bytes(),
            rows_cross_host: cross_host,
            my_bytes,
            floor_us: floor,
            base_us: c.baseline.then_some(base[0]),
            wrong: (!c.no_check()).then_some(wrong[0]),
        });
    }
    Ok(measured)
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
            let arms = measure(a, phase, (&comm, &coll), tokens, variant, latency)?;
            for m in &arms {
                wrong += m.wrong.unwrap_or(0);
                if me == 0 {
                    report::out(moe_table::line(a, m));
                }
                rows.push(moe_table::row(a, phase, n, m));
            }
            match (&arms[..], me) {
                ([without, with], 0) if a.eplb.is_some() => {
                    report::out(moe_table::eplb_ratio(without, with))
                }
                ([first, second], 0) => report::out(moe_table::levels_ratio(first, second)),
                _ => {}
            }
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
