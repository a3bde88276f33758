//! A real expert-parallel MoE layer across processes: gate, top-k, dispatch, per-expert FFN,
//! combine — checked against the same layer computed in one process, with the share of time
//! spent in dispatch and combine.
//!
//! ```sh
//! cargo build --release --example moe_layer --bin xccl-run
//! target/release/xccl-run --np 2 -- target/release/examples/moe_layer [tokens] [hidden] [experts] [topk] [mode] [eplb]
//! ```
//!
//! `mode` is `normal` (default) or `low-latency`: in both one row travels per token and
//! expert rank, each expert multiplies its rows as one `[rows, hidden]` batch, and each rank's
//! experts reduce their outputs with the gate weights before combine brings them home.
//!
//! `eplb` (default 0) > 0 runs the layer twice: once on the plain placement, whose load (the
//! (token, expert) rows of every rank) builds a map with that many replica slots in all
//! (`xccl::moe::rebalance`); every rank sets the map and the expert weights of the slots that
//! change move over point-to-point messages (`xccl::moe::move_weights`); the second run uses
//! the moved weights. Each rank holds only its own slots' weights.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use xccl::coll::Coll;
use xccl::moe::{move_weights, rebalance, Dispatcher, Dtype, ExpertMap, MapShape, Mode, MoeConfig};
use xccl::p2p::{P2p, P2pConfig};
use xccl::Communicator;

/// Deterministic pseudo-random numbers in [-1, 1) from a seed.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// `x [rows × k] · w [k × n]`.
fn matmul(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let rows = x.len() / k;
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for (i, &xv) in x[r * k..(r + 1) * k].iter().enumerate() {
            for (o, &wv) in out[r * n..(r + 1) * n]
                .iter_mut()
                .zip(&w[i * n..(i + 1) * n])
            {
                *o += xv * wv;
            }
        }
    }
    out
}

struct Layer {
    hidden: usize,
    ffn: usize,
    experts: usize,
    topk: usize,
    gate: Vec<f32>,
    w1: Vec<Vec<f32>>,
    w2: Vec<Vec<f32>>,
}

impl Layer {
    fn new(hidden: usize, experts: usize, topk: usize) -> Self {
        let ffn = 2 * hidden;
        let scale = |v: Vec<f32>, s: f32| v.into_iter().map(|x| x * s).collect::<Vec<_>>();
        Layer {
            hidden,
            ffn,
            experts,
            topk,
            gate: values(1, hidden * experts),
            w1: (0..experts)
                .map(|e| {
                    scale(
                        values(100 + e as u64, hidden * ffn),
                        1.0 / (hidden as f32).sqrt(),
                    )
                })
                .collect(),
            w2: (0..experts)
                .map(|e| {
                    scale(
                        values(200 + e as u64, ffn * hidden),
                        1.0 / (ffn as f32).sqrt(),
                    )
                })
                .collect(),
        }
    }

    /// Top-k experts of each token and their softmax weights (renormalized over the top-k).
    fn route(&self, x: &[f32]) -> (Vec<i64>, Vec<f32>) {
        let logits = matmul(x, &self.gate, self.hidden, self.experts);
        let mut idx = Vec::new();
        let mut w = Vec::new();
        for row in logits.chunks(self.experts) {
            let mut order: Vec<usize> = (0..self.experts).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let top = &order[..self.topk];
            let m = row[top[0]];
            let ex: Vec<f32> = top.iter().map(|&e| (row[e] - m).exp()).collect();
            let sum: f32 = ex.iter().sum();
            idx.extend(top.iter().map(|&e| e as i64));
            w.extend(ex.iter().map(|v| v / sum));
        }
        (idx, w)
    }

    /// Expert `e`'s FFN on rows of `x` (one or a batch): relu(x W1) W2.
    fn expert(&self, e: usize, x: &[f32]) -> Vec<f32> {
        let h: Vec<f32> = matmul(x, &self.w1[e], self.hidden, self.ffn)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        matmul(&h, &self.w2[e], self.ffn, self.hidden)
    }
}

const USAGE: &str = "usage: moe_layer [tokens (256)] [hidden (256)] [experts (8)] [topk (2)] \
[normal|low-latency] [eplb replica slots (0)]\n\
A whole expert-parallel MoE layer on every rank, checked against one process.\n\
Start it under a launcher: xccl-run --np 2 -- moe_layer (or mpirun, srun, torchrun).";

/// The layer's shape and mode, from the command line.
struct Args {
    tokens: usize,
    hidden: usize,
    experts: usize,
    topk: usize,
    low_latency: bool,
    /// Replica slots in all for the second run (0: one run, no EPLB).
    eplb: usize,
}

/// Parses `[tokens] [hidden] [experts] [topk] [mode]`; every value given must be valid.
fn parse_args(args: &[String]) -> Result<Args, String> {
    if args.len() > 6 {
        return Err(format!("{} arguments; at most 6", args.len()));
    }
    let number = |i: usize, name: &str, default: usize| match args.get(i) {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name} {v:?} is not a positive number")),
        },
    };
    Ok(Args {
        tokens: number(0, "tokens", 256)?,
        hidden: number(1, "hidden", 256)?,
        experts: number(2, "experts", 8)?,
        topk: number(3, "topk", 2)?,
        low_latency: match args.get(4).map(String::as_str) {
            None | Some("normal") => false,
            Some("low-latency") => true,
            Some(other) => return Err(format!("mode {other:?}: normal or low-latency")),
        },
        eplb: match args.get(5) {
            None => 0,
            Some(v) => v
                .parse()
                .map_err(|_| format!("eplb {v:?} is not a count of replica slots"))?,
        },
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("moe_layer: error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe_layer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Each rank's weights of the experts in its slots: per slot, `W1` then `W2`, as bytes.
struct SlotWeights {
    slots: Vec<Option<Vec<u8>>>,
}

impl SlotWeights {
    /// The weights of the slots `map` gives rank `me`, from the layer (their owner).
    fn owned(layer: &Layer, map: &ExpertMap, me: usize) -> Self {
        let mut slots = vec![None; map.slot_count()];
        let spr = map.slots_per_rank();
        for (s, slot) in slots.iter_mut().enumerate().skip(me * spr).take(spr) {
            *slot = map.logical(s).map(|e| layer.weights(e));
        }
        SlotWeights { slots }
    }

    /// The weights rank `me` holds for logical expert `e` under `map`.
    fn of(&self, map: &ExpertMap, me: usize, e: usize) -> Option<&[u8]> {
        let s = *map
            .replicas(e)
            .iter()
            .find(|&&s| map.rank_of_slot(s as usize) == me)?;
        self.slots[s as usize].as_deref()
    }
}

impl Layer {
    /// Expert `e`'s `W1` and `W2` as one block of bytes (what moves between ranks).
    fn weights(&self, e: usize) -> Vec<u8> {
        (self.w1[e].iter().chain(&self.w2[e]))
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// The FFN of `x` with weights given as bytes (`W1` then `W2`).
    fn expert_with(&self, weights: &[u8], x: &[f32]) -> Vec<f32> {
        let w: Vec<f32> = weights
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let (w1, w2) = w.split_at(self.hidden * self.ffn);
        let h: Vec<f32> = matmul(x, w1, self.hidden, self.ffn)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        matmul(&h, w2, self.ffn, self.hidden)
    }
}

/// One layer on every rank with the weights each holds; returns the output and the time of
/// the layer, of dispatch and of combine.
fn layer_step(
    moe: &mut Dispatcher<'_>,
    layer: &Layer,
    held: &SlotWeights,
    (x, me): (&[f32], usize),
) -> xccl::Result<(Vec<f32>, [Duration; 3])> {
    let map = moe.map().clone();
    let start = Instant::now();
    let (idx, w) = layer.route(x);
    let mut out = vec![0f32; x.len()];
    let t0 = Instant::now();
    let mut view = moe.dispatch_typed(x, &idx, &w)?;
    let t_dispatch = t0.elapsed();
    // Each local expert runs once on its batch of rows; the view weights the outputs as the
    // mode's combine expects and leaves them in the window, where (on shared memory) each
    // token's home reads them in place.
    view.run_experts(|e, rows, output| {
        let batch: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                r.chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            })
            .collect();
        let weights = held.of(&map, me, e).ok_or_else(|| {
            xccl::Error::InvalidUsage(format!("rows for expert {e}, whose weights are not here"))
        })?;
        let y = layer.expert_with(weights, &batch);
        output.copy_from_slice(bytemuck::cast_slice(&y));
        Ok(())
    })?;
    let t1 = Instant::now();
    moe.combine_in_place_typed(&mut out)?;
    let t_combine = t1.elapsed();
    Ok((out, [start.elapsed(), t_dispatch, t_combine]))
}

/// The largest error of `out` (this rank's tokens) against the layer in one process,
/// relative to each value (at least 1).
fn error_vs_one_process(layer: &Layer, x: &[f32], out: &[f32]) -> f32 {
    let (hidden, topk) = (layer.hidden, layer.topk);
    let (idx, w) = layer.route(x);
    let mut worst = 0f32;
    for (t, got) in out.chunks(hidden).enumerate() {
        let xt = &x[t * hidden..(t + 1) * hidden];
        let mut want = vec![0f32; hidden];
        for j in 0..topk {
            let e = idx[t * topk + j] as usize;
            for (a, b) in want.iter_mut().zip(layer.expert(e, xt)) {
                *a += w[t * topk + j] * b;
            }
        }
        for (g, r) in got.iter().zip(&want) {
            worst = worst.max((g - r).abs() / r.abs().max(1.0));
        }
    }
    worst
}

fn run(args: &Args) -> xccl::Result<()> {
    let (tokens, hidden, experts, topk) = (args.tokens, args.hidden, args.experts, args.topk);
    let low_latency = args.low_latency;
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let (me, n) = (comm.rank(), comm.world_size());
    let layer = Layer::new(hidden, experts, topk);
    let x = values(1000 + me as u64, tokens * hidden);
    let cfg = MoeConfig::new(experts, hidden, topk, tokens, Dtype::F32);
    let mode = if low_latency {
        Mode::LowLatency
    } else {
        Mode::Normal
    };
    let mut moe = Dispatcher::new(&comm, cfg, mode)?;
    let mut held = SlotWeights::owned(&layer, moe.map(), me);
    let runs = if args.eplb > 0 { 2 } else { 1 };
    for run in 0..runs {
        comm.barrier()?;
        let (out, [total, t_dispatch, t_combine]) = layer_step(&mut moe, &layer, &held, (&x, me))?;
        let worst = error_vs_one_process(&layer, &x, &out);
        let map = moe.map();
        let local = map.experts_on(me).count();
        println!(
            "rank {me}/{n}: {} mode, {tokens} tokens, hidden {hidden}, {local} of {experts} \
             experts{}, top-{topk}: layer {:.2} ms, dispatch {:.1}%, combine {:.1}%, max \
             relative error vs one process {worst:.2e}",
            if low_latency { "low-latency" } else { "normal" },
            match run {
                0 => String::new(),
                _ => format!(
                    " (eplb map v{}, {} replicas added)",
                    map.version(),
                    map.extra_replicas()
                ),
            },
            total.as_secs_f64() * 1e3,
            100.0 * t_dispatch.as_secs_f64() / total.as_secs_f64(),
            100.0 * t_combine.as_secs_f64() / total.as_secs_f64(),
        );
        comm.barrier()?;
        if worst > 1e-4 {
            return Err(xccl::Error::ProtocolViolation(format!(
                "layer output differs from one process by {worst}"
            )));
        }
        if run + 1 < runs {
            held = rebalanced(&comm, &mut moe, &layer, &held, args.eplb)?;
        }
    }
    Ok(())
}

/// EPLB between two runs: the job-wide load of the run so far makes a map with `extra`
/// replica slots in all, set on every rank; the weights of changed slots move over p2p.
fn rebalanced(
    comm: &Communicator,
    moe: &mut Dispatcher<'_>,
    layer: &Layer,
    held: &SlotWeights,
    extra: usize,
) -> xccl::Result<SlotWeights> {
    let (me, n) = (comm.rank(), comm.world_size());
    let coll = Coll::new(comm)?;
    let load = moe.take_stats().job_expert_rows(&coll)?;
    coll.close()?;
    let load: Vec<f64> = load.iter().map(|&v| v as f64).collect();
    let old = moe.map().clone();
    let shape = MapShape {
        ranks: n,
        slots_per_rank: layer.experts.div_ceil(n) + extra.div_ceil(n),
        ranks_per_host: None,
    };
    let new = rebalance(&load, &shape, Some(&old))?;
    moe.set_map(new.clone())?;
    let p2p = P2p::new(comm, P2pConfig::default())?;
    let bytes = 4 * 2 * layer.hidden * layer.ffn;
    let mut moved = SlotWeights {
        slots: vec![None; new.slot_count()],
    };
    // Unchanged slots keep their weights; changed ones are installed by the move.
    let spr = new.slots_per_rank();
    for s in (me * spr..(me + 1) * spr).filter(|&s| !new.changed_slots(&old).contains(&s)) {
        if let Some(e) = new.logical(s) {
            moved.slots[s] = held.of(&old, me, e).map(<[u8]>::to_vec);
        }
    }
    let of = |e: usize| held.of(&old, me, e).unwrap_or(&[]);
    move_weights(&p2p, &old, &new, bytes, of, |s, w| {
        moved.slots[s] = Some(w.to_vec())
    })?;
    p2p.close()?;
    Ok(moved)
}
