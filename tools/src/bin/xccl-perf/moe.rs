//! `xccl-perf moe`: normal-mode dispatch + combine, timed separately, the way the Open MPI
//! reference in `shared/bench` (moe_mpi) does: per repetition, a barrier, then each phase
//! timed on every rank and counted at the slowest rank; medians over repetitions. Routing is
//! uniform (top-k distinct experts per token, seeded), experts are identities: each expert
//! rank returns, per received row, the sum of its chosen experts' weights times the row.
//! The output is checked: `out[t] ≈ (Σ_j w_j) · x[t]` within the dtype's rounding. Bytes =
//! token rows sent to other ranks (each (token, destination rank) once).

use crate::memcpy_baseline::Memcpy;
use crate::options::{MoeArgs, Routing};
use crate::report::{self, MoeFields, Row};
use crate::session;
use std::time::Instant;
use xccl::coll::{Coll, ReduceOp};
use xccl::moe::{Dispatched, Dispatcher, Dtype, Mode, MoeConfig};
use xccl::{Communicator, Error, Result};

/// splitmix64: the routing and data of a seed, identical on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Top-k distinct experts for each of `tokens` tokens, drawn without replacement from the
/// routing's distribution over experts.
fn route(routing: Routing, rng: &mut Rng, tokens: usize, k: usize, experts: usize) -> Vec<i64> {
    let weight: Vec<f64> = (0..experts)
        .map(|e| match routing {
            Routing::Uniform => 1.0,
            Routing::Zipf(s) => 1.0 / ((e + 1) as f64).powf(s),
        })
        .collect();
    let total: f64 = weight.iter().sum();
    let mut idx = Vec::with_capacity(tokens * k);
    let mut chosen = vec![false; experts];
    for _ in 0..tokens {
        chosen.fill(false);
        let mut left = total;
        for _ in 0..k {
            // A point in the mass of the experts not chosen yet; the last one standing takes
            // any rounding excess.
            let mut u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * left;
            let mut pick = None;
            for e in (0..experts).filter(|&e| !chosen[e]) {
                pick = Some(e);
                if u < weight[e] {
                    break;
                }
                u -= weight[e];
            }
            let e = pick.expect("top-k is at most the number of experts");
            chosen[e] = true;
            left -= weight[e];
            idx.push(e as i64);
        }
    }
    idx
}

/// Which phase the table reports (both always run: combine checks what dispatch delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dispatch,
    Combine,
    Both,
}

/// One rank's inputs: seeded rows, routing and weights.
struct Workload {
    cfg: MoeConfig,
    x: Vec<u8>,
    idx: Vec<i64>,
    w: Vec<f32>,
}

impl Workload {
    fn new(a: &MoeArgs, dtype: Dtype, me: usize) -> Self {
        let mut cfg = MoeConfig::new(a.experts, a.hidden, a.topk, a.tokens.max(1), dtype);
        cfg.int8_dispatch = a.dtype == "int8";
        let (t_count, h, k) = (a.tokens, a.hidden, a.topk);
        let mut rng = Rng(a.seed ^ (me as u64).wrapping_mul(0x1234_5678_9abc));
        let mut x = vec![0u8; t_count * cfg.row_bytes()];
        for i in 0..t_count * h {
            dtype.store(&mut x, i, rng.unit() * 2.0 - 1.0);
        }
        let idx = route(a.routing, &mut rng, t_count, k, a.experts);
        let w: Vec<f32> = (0..t_count * k).map(|_| 0.1 + 0.9 * rng.unit()).collect();
        Workload { cfg, x, idx, w }
    }

    /// Rows this rank sends to other ranks: once per (token, destination rank) in normal
    /// mode, once per (token, expert) in low-latency mode.
    fn rows_out(&self, placement: &[usize], me: usize, ll: bool) -> u64 {
        let k = self.cfg.topk;
        self.idx
            .chunks(k)
            .map(|choice| {
                let mut ranks: Vec<usize> = choice.iter().map(|&e| placement[e as usize]).collect();
                if !ll {
                    ranks.sort_unstable();
                    ranks.dedup();
                }
                ranks.iter().filter(|&&r| r != me).count() as u64
            })
            .sum()
    }
}

/// Identity experts (untimed): each row comes back as it went (low-latency mode, the
/// combine weights it) or times the sum of this rank's chosen experts' weights (normal
/// mode), written into the window (`in_window`) or into `reduced`.
fn run_experts(view: &mut Dispatched<'_>, in_window: bool, reduced: &mut Vec<u8>) -> Result<()> {
    reduced.clear();
    match view {
        Dispatched::LowLatency(view) => {
            let rb = view.config().row_bytes();
            for l in 0..view.local_experts().len() {
                let rows = view.expert_rows(l)?;
                if in_window {
                    let o = view.expert_output(l)?;
                    for row in rows {
                        o[row.index * rb..(row.index + 1) * rb].copy_from_slice(row.data);
                    }
                } else {
                    rows.iter()
                        .for_each(|row| reduced.extend_from_slice(row.data));
                }
            }
        }
        Dispatched::Normal(view) => {
            let (dtype, rb) = (view.config().dtype, view.config().row_bytes());
            let rows = view.rows()?;
            let dst: &mut [u8] = if in_window {
                view.expert_output()?
            } else {
                reduced.resize(rows.len() * rb, 0);
                reduced
            };
            let mut tmp = vec![0f32; rb / dtype.size()];
            for (row, o) in rows.iter().zip(dst.chunks_mut(rb)) {
                let ws: f32 = row.experts.iter().map(|&(_, wt)| wt).sum();
                tmp.fill(0.0);
                dtype.accumulate(&mut tmp, row.data);
                tmp.iter_mut().for_each(|v| *v *= ws);
                dtype.store_row(o, &tmp);
            }
        }
    }
    Ok(())
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

/// Elements of `out` off `(Σ_j w_j) · x[t]` by more than the dtype's rounding (twice:
/// expert row, output) and, with INT8 dispatch, up to max|x| / 254 per element and expert
/// (see `xccl::moe::quant`).
fn count_wrong(work: &Workload, out: &[u8]) -> u64 {
    let (cfg, k, h) = (&work.cfg, work.cfg.topk, work.cfg.hidden);
    let dtype = cfg.dtype;
    let tol = match dtype {
        Dtype::F32 => 1e-5,
        Dtype::Bf16 => 2.0f32.powi(-6),
        Dtype::F16 => 2.0f32.powi(-9),
    };
    let mut wrong = 0;
    for (t, row) in work.x.chunks(cfg.row_bytes()).enumerate() {
        let ws: f32 = work.w[t * k..(t + 1) * k].iter().sum();
        let int8_err = match cfg.int8_dispatch {
            true => {
                ws * (0..h)
                    .map(|i| dtype.load(row, i).abs())
                    .fold(0f32, f32::max)
                    / 254.0
            }
            false => 0.0,
        };
        for i in 0..h {
            let want = ws * dtype.load(row, i);
            let got = dtype.load(&out[t * cfg.row_bytes()..], i);
            if (got - want).abs() > tol * 4.0 * want.abs().max(1e-3) + int8_err {
                wrong += 1;
            }
        }
    }
    wrong
}

/// What the run measured, for the report.
struct Measured {
    disp: Vec<f64>,
    comb: Vec<f64>,
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
        if us > 0.0 {
            self.bytes as f64 / (us * 1e3)
        } else {
            0.0
        }
    }
}

/// Prints each phase's figures and the totals (rank 0); returns the phases' medians.
fn print_phases(phase: Phase, me: usize, m: &mut Measured) -> (f64, f64) {
    let (dp50, dp99, dmin, dmax) = report::stats(&mut m.disp);
    let (cp50, cp99, cmin, cmax) = report::stats(&mut m.comb);
    let gbps = |us: f64| m.gbps(us);
    if me == 0 {
        if phase != Phase::Combine {
            println!(
                "dispatch: p50 {dp50:.1} us  p99 {dp99:.1}  min {dmin:.1}  max {dmax:.1}  {:.2} GB/s",
                gbps(dp50)
            );
        }
        if phase != Phase::Dispatch {
            println!(
                "combine:  p50 {cp50:.1} us  p99 {cp99:.1}  min {cmin:.1}  max {cmax:.1}  {:.2} GB/s",
                gbps(cp50)
            );
        }
        println!(
            "# rows to other ranks {} ({} bytes), #wrong {}",
            m.rows,
            m.bytes,
            report::wrong_text(m.wrong)
        );
        if let Some(base) = m.base_us {
            let x = |us: f64| {
                if m.my_bytes > 0 && base > 0.0 {
                    us / base
                } else {
                    0.0
                }
            };
            println!(
                "# baseline: memcpy of the bytes one rank sends (slowest rank) {base:.1} us; \
                 dispatch {:.2}x, combine {:.2}x of it",
                x(dp50),
                x(cp50)
            );
        }
    }
    (dp50, cp50)
}

/// Prints the phases' lines (rank 0) and returns the table's row.
fn report_run(
    a: &MoeArgs,
    phase: Phase,
    n: usize,
    me: usize,
    cfg: &MoeConfig,
    m: &mut Measured,
) -> Row {
    let c = &a.common;
    let mut reported: Vec<f64> = match phase {
        Phase::Dispatch => m.disp.clone(),
        Phase::Combine => m.comb.clone(),
        Phase::Both => m.disp.iter().zip(&m.comb).map(|(d, c)| d + c).collect(),
    };
    let (dp50, cp50) = print_phases(phase, me, m);
    let (bytes, gbps) = (m.bytes, |us: f64| m.gbps(us));
    let (p50, p99, min, max) = report::stats(&mut reported);
    Row {
        op: match phase {
            Phase::Dispatch => "dispatch",
            Phase::Combine => "combine",
            Phase::Both => "moe",
        },
        backend: c.backend.clone(),
        ranks: n,
        bytes,
        count: a.tokens,
        dtype: match cfg.dtype {
            _ if cfg.int8_dispatch => "int8",
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        },
        p50_us: p50,
        p99_us: p99,
        min_us: min,
        max_us: max,
        algbw: gbps(p50),
        busbw: gbps(p50),
        wrong: m.wrong,
        baseline_us: m.base_us,
        baseline_gbps: m.base_us.map(|us| report::gbps(m.my_bytes, us)),
        stream_gbps: None,
        moe: Some(MoeFields {
            tokens: a.tokens,
            hidden: a.hidden,
            topk: a.topk,
            experts: a.experts,
            mode: if a.mode == "low-latency" {
                "low-latency"
            } else {
                "normal"
            },
            routing: a.routing.to_string(),
            dispatch_us_p50: dp50,
            combine_us_p50: cp50,
        }),
    }
}

pub fn run(a: &MoeArgs, phase: Phase) -> Result<()> {
    let c = &a.common;
    let dtype = match a.dtype.as_str() {
        "f32" => Dtype::F32,
        "f16" => Dtype::F16,
        _ => Dtype::Bf16,
    };
    let comm = session::connect(c, "moe", 1)?;
    let (me, n) = (comm.rank(), comm.world_size());
    if a.topk == 0 || a.topk > a.experts {
        return Err(Error::InvalidArgument(format!(
            "--topk {} with --experts {}",
            a.topk, a.experts
        )));
    }
    let work = Workload::new(a, dtype, me);
    let ll = a.mode == "low-latency";
    let mode = if ll { Mode::LowLatency } else { Mode::Normal };
    let mut moe = Dispatcher::new(&comm, work.cfg.clone(), mode)?;
    let coll = Coll::new(&comm)?;
    let placement = work.cfg.placement_for(n)?;
    let mut cross = [work.rows_out(&placement, me, ll)];
    let my_bytes = cross[0] as usize * work.cfg.row_bytes();
    coll.allreduce(&mut cross, ReduceOp::Sum)?;
    if me == 0 {
        println!("{}", report::header("moe", &c.backend, n));
        println!(
            "# tokens {} hidden {} topk {} experts {} ranks {n} mode {} dtype {} routing {}",
            a.tokens, a.hidden, a.topk, a.experts, a.mode, a.dtype, a.routing
        );
    }
    let reps = (c.warmup.unwrap_or(2), a.reps);
    let (disp, comb, mut out) = time_reps(&mut moe, &comm, &coll, &work, reps, c.api == "window")?;
    if c.inject_error && a.tokens > 0 {
        let v = dtype.load(&out, 0);
        dtype.store(&mut out, 0, v + 1.0 + 2.0 * v.abs());
    }
    // `--no-check`: no element is looked at (and none counted wrong).
    let mut wrong = [if c.no_check {
        0
    } else {
        count_wrong(&work, &out)
    }];
    coll.allreduce(&mut wrong, ReduceOp::Sum)?;
    // `--baseline`: one in-process memcpy of the bytes a rank sends to the others, timed after
    // the repetitions (slowest rank).
    let mut base = [0f64];
    if c.baseline {
        base[0] = Memcpy::new(my_bytes).time_us(my_bytes, a.reps);
        coll.allreduce(&mut base, ReduceOp::Max)?;
    }
    let mut measured = Measured {
        disp,
        comb,
        rows: cross[0],
        bytes: cross[0] as usize * work.cfg.row_bytes(),
        my_bytes,
        base_us: c.baseline.then_some(base[0]),
        wrong: (!c.no_check).then_some(wrong[0]),
    };
    let row = report_run(a, phase, n, me, &work.cfg, &mut measured);
    if me == 0 {
        if let Some(path) = &c.json {
            report::write_json(path, &[row])
                .map_err(|e| Error::system(format!("writing {}", path.display()), e))?;
        }
    }
    if wrong[0] > 0 {
        return Err(Error::ProtocolViolation(format!(
            "check failed: {} wrong elements",
            wrong[0]
        )));
    }
    moe.close()?;
    coll.close()?;
    comm.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(routing: Routing) -> Vec<usize> {
        let (tokens, k, experts) = (2000, 4, 16);
        let idx = route(routing, &mut Rng(7), tokens, k, experts);
        assert_eq!(idx.len(), tokens * k);
        let mut c = vec![0; experts];
        for row in idx.chunks(k) {
            for (j, &e) in row.iter().enumerate() {
                assert!(!row[..j].contains(&e), "expert {e} twice in {row:?}");
                c[e as usize] += 1;
            }
        }
        c
    }

    /// Uniform routing spreads tokens evenly; zipf favours low ids, more so for larger S, and
    /// a huge S always picks the first k experts.
    #[test]
    fn routing_follows_its_distribution() {
        let u = counts(Routing::Uniform);
        assert!(u.iter().all(|&c| (400..600).contains(&c)), "{u:?}");
        let z1 = counts(Routing::Zipf(1.0));
        let z2 = counts(Routing::Zipf(2.0));
        assert!(z1[0] > 3 * z1[15] && z1.windows(2).filter(|w| w[0] < w[1]).count() < 6);
        assert!(z2[15] < z1[15], "{z1:?} {z2:?}");
        let z = counts(Routing::Zipf(100.0));
        assert_eq!(&z[..4], &[2000; 4]);
        assert!(z[4..].iter().all(|&c| c == 0));
    }
}
