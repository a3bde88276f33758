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
use std::time::{Duration, Instant};
use xccl::coll::{Coll, ReduceOp};
use xccl::moe::{Dtype, LowLatencyBuffer, MoeBuffer, MoeConfig};
use xccl::{Backend, Communicator, Error, Result};

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

pub fn run(a: &MoeArgs, phase: Phase) -> Result<()> {
    let c = &a.common;
    let dtype = match a.dtype.as_str() {
        "f32" => Dtype::F32,
        "f16" => Dtype::F16,
        _ => Dtype::Bf16,
    };
    let comm = Communicator::builder()
        .backend(c.backend.parse::<Backend>()?)
        .timeout(Duration::from_secs_f64(c.timeout))
        .build()?;
    let (me, n) = (comm.rank(), comm.world_size());
    if a.topk == 0 || a.topk > a.experts {
        return Err(Error::InvalidArgument(format!(
            "--topk {} with --experts {}",
            a.topk, a.experts
        )));
    }
    let mut cfg = MoeConfig::new(a.experts, a.hidden, a.topk, a.tokens.max(1), dtype);
    cfg.int8_dispatch = a.dtype == "int8";
    let ll = a.mode == "low-latency";
    let mut buf = if ll {
        None
    } else {
        Some(MoeBuffer::new(&comm, cfg.clone())?)
    };
    let mut llbuf = if ll {
        Some(LowLatencyBuffer::new(&comm, cfg.clone())?)
    } else {
        None
    };
    let coll = Coll::new(&comm)?;
    let (t_count, h, k) = (a.tokens, a.hidden, a.topk);
    let mut rng = Rng(a.seed ^ (me as u64).wrapping_mul(0x1234_5678_9abc));
    let mut x = vec![0u8; t_count * cfg.row_bytes()];
    for i in 0..t_count * h {
        dtype.store(&mut x, i, rng.unit() * 2.0 - 1.0);
    }
    let idx = route(a.routing, &mut rng, t_count, k, a.experts);
    let w: Vec<f32> = (0..t_count * k).map(|_| 0.1 + 0.9 * rng.unit()).collect();
    let placement = cfg.placement_for(n)?;
    // Rows this rank sends to other ranks (for GB/s), summed over ranks.
    let mut cross = [(0..t_count)
        .map(|t| {
            let mut ranks: Vec<usize> = idx[t * k..(t + 1) * k]
                .iter()
                .map(|&e| placement[e as usize])
                .collect();
            if !ll {
                // Normal mode sends a token once per destination rank.
                ranks.sort_unstable();
                ranks.dedup();
            }
            ranks.iter().filter(|&&r| r != me).count() as u64
        })
        .sum::<u64>()];
    let my_bytes = cross[0] as usize * cfg.row_bytes();
    coll.allreduce(&mut cross, ReduceOp::Sum)?;
    let bytes = cross[0] as usize * cfg.row_bytes();
    if me == 0 {
        println!("{}", report::header("moe", &c.backend, n));
        println!(
            "# tokens {t_count} hidden {h} topk {k} experts {} ranks {n} mode {} dtype {} routing {}",
            a.experts, a.mode, a.dtype, a.routing
        );
    }
    let mut disp_times = Vec::with_capacity(a.reps);
    let mut comb_times = Vec::with_capacity(a.reps);
    let mut reduced: Vec<u8> = Vec::new();
    let mut out = vec![0u8; x.len()];
    let mut tmp = vec![0f32; h];
    let in_window = c.api == "window";
    let warm = c.warmup.unwrap_or(2);
    for rep in 0..warm + a.reps {
        comm.barrier()?;
        let s = Instant::now();
        let d;
        reduced.clear();
        if let Some(llb) = llbuf.as_mut() {
            let mut view = llb.dispatch(&x, &idx, &w)?;
            d = s.elapsed().as_secs_f64() * 1e6;
            // Identity experts (untimed): each (token, expert) row comes back as it went,
            // written into the window (`--api window`) or into a buffer of the caller's.
            let rb = cfg.row_bytes();
            for l in 0..view.local_experts().len() {
                let rows = view.expert_rows(l)?;
                if in_window {
                    let o = view.expert_output(l)?;
                    for row in rows {
                        o[row.index * rb..(row.index + 1) * rb].copy_from_slice(row.data);
                    }
                } else {
                    for row in rows {
                        reduced.extend_from_slice(row.data);
                    }
                }
            }
        } else {
            let mut view = buf.as_mut().expect("normal mode").dispatch(&x, &idx, &w)?;
            d = s.elapsed().as_secs_f64() * 1e6;
            // Identity experts (untimed): Σ over this rank's chosen experts of w · x, written
            // into the window (`--api window`) or into a buffer of the caller's.
            let rows = view.rows()?;
            let rb = cfg.row_bytes();
            let dst: &mut [u8] = if in_window {
                view.expert_output()?
            } else {
                reduced.resize(rows.len() * rb, 0);
                &mut reduced
            };
            for (row, o) in rows.iter().zip(dst.chunks_mut(rb)) {
                let ws: f32 = row.experts.iter().map(|&(_, wt)| wt).sum();
                tmp.fill(0.0);
                dtype.accumulate(&mut tmp, row.data);
                tmp.iter_mut().for_each(|v| *v *= ws);
                dtype.store_row(o, &tmp);
            }
        }
        comm.barrier()?;
        let s = Instant::now();
        match (llbuf.as_mut(), buf.as_mut()) {
            (Some(llb), _) if in_window => llb.combine_in_place(&mut out)?,
            (Some(llb), _) => llb.combine(&reduced, &mut out)?,
            (None, Some(b)) if in_window => b.combine_in_place(&mut out)?,
            (None, Some(b)) => b.combine(&reduced, &mut out)?,
            (None, None) => unreachable!("one buffer exists"),
        }
        let cb = s.elapsed().as_secs_f64() * 1e6;
        let mut slow = [d, cb];
        coll.allreduce(&mut slow, ReduceOp::Max)?;
        if rep >= warm {
            disp_times.push(slow[0]);
            comb_times.push(slow[1]);
        }
    }
    // Check: out[t] = (Σ_j w_j) x[t] within rounding of the dtype (twice: expert row, output).
    let tol = match dtype {
        Dtype::F32 => 1e-5,
        Dtype::Bf16 => 2.0f32.powi(-6),
        Dtype::F16 => 2.0f32.powi(-9),
    };
    if c.inject_error && t_count > 0 {
        let v = dtype.load(&out, 0);
        dtype.store(&mut out, 0, v + 1.0 + 2.0 * v.abs());
    }
    let mut wrong = [0u64];
    // `--no-check`: no element is looked at (and none counted wrong).
    let checked = if c.no_check { 0 } else { t_count };
    for t in 0..checked {
        let ws: f32 = w[t * k..(t + 1) * k].iter().sum();
        let row = &x[t * cfg.row_bytes()..(t + 1) * cfg.row_bytes()];
        // INT8 adds up to max|x| / 254 per element and expert (see xccl::moe::quant).
        let int8_err = if cfg.int8_dispatch {
            ws * (0..h)
                .map(|i| dtype.load(row, i).abs())
                .fold(0f32, f32::max)
                / 254.0
        } else {
            0.0
        };
        for i in 0..h {
            let want = ws * dtype.load(row, i);
            let got = dtype.load(&out[t * cfg.row_bytes()..], i);
            if (got - want).abs() > tol * 4.0 * want.abs().max(1e-3) + int8_err {
                wrong[0] += 1;
            }
        }
    }
    coll.allreduce(&mut wrong, ReduceOp::Sum)?;
    let checked = (!c.no_check).then_some(wrong[0]);
    // Per repetition, before the statistics sort each phase's times.
    let mut reported: Vec<f64> = match phase {
        Phase::Dispatch => disp_times.clone(),
        Phase::Combine => comb_times.clone(),
        Phase::Both => disp_times
            .iter()
            .zip(&comb_times)
            .map(|(d, c)| d + c)
            .collect(),
    };
    // `--baseline`: one in-process memcpy of the bytes a rank sends to the others, timed after
    // the repetitions (slowest rank).
    let mut base = [0f64];
    if c.baseline {
        base[0] = Memcpy::new(my_bytes).time_us(my_bytes, a.reps);
        coll.allreduce(&mut base, ReduceOp::Max)?;
    }
    let (dp50, dp99, dmin, dmax) = report::stats(&mut disp_times);
    let (cp50, cp99, cmin, cmax) = report::stats(&mut comb_times);
    let gbps = |us: f64| {
        if us > 0.0 {
            bytes as f64 / (us * 1e3)
        } else {
            0.0
        }
    };
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
            cross[0],
            bytes,
            report::wrong_text(checked)
        );
        if c.baseline {
            let x = |us: f64| {
                if my_bytes > 0 && base[0] > 0.0 {
                    us / base[0]
                } else {
                    0.0
                }
            };
            println!(
                "# baseline: memcpy of the bytes one rank sends (slowest rank) {:.1} us; \
                 dispatch {:.2}x, combine {:.2}x of it",
                base[0],
                x(dp50),
                x(cp50)
            );
        }
    }
    let (p50, p99, min, max) = report::stats(&mut reported);
    let row = Row {
        op: match phase {
            Phase::Dispatch => "dispatch",
            Phase::Combine => "combine",
            Phase::Both => "moe",
        },
        backend: c.backend.clone(),
        ranks: n,
        bytes,
        count: t_count,
        dtype: match dtype {
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
        wrong: checked,
        baseline_us: c.baseline.then_some(base[0]),
        baseline_gbps: c.baseline.then(|| report::gbps(my_bytes, base[0])),
        stream_gbps: None,
        moe: Some(MoeFields {
            tokens: t_count,
            hidden: h,
            topk: k,
            experts: a.experts,
            mode: if ll { "low-latency" } else { "normal" },
            routing: a.routing.to_string(),
            dispatch_us_p50: dp50,
            combine_us_p50: cp50,
        }),
    };
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
    if let Some(b) = buf {
        b.close()?;
    }
    if let Some(b) = llbuf {
        b.close()?;
    }
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
