//! Expert load balancing over loopback, shared memory and tcp: random maps with replicas
//! (1–8 ranks), both replica policies; every (token, expert) reaches exactly one replica of
//! that expert, combine equals the no-replica reference (bitwise for f32, within bounds for
//! bf16/f16/INT8), rotate splits each expert's rows over its replicas within one; maps
//! switched under a running job stay exact, and a rank handed another map fails every rank.

mod common;

use common::moe_rows::{c, decode, encode, scaled_outputs};
use common::{run_comms, Fabric};
use proptest::prelude::*;
use std::sync::Arc;
use xccl::coll::{Coll, ReduceOp};
use xccl::moe::{rebalance, Dtype, ExpertMap, MapShape, MoeBuffer, MoeConfig, ReplicaPolicy};
use xccl::{Communicator, Error};

/// One rank's input: token rows (f32 values), expert choices and weights.
#[derive(Debug, Clone)]
struct Input {
    x: Vec<f32>,
    idx: Vec<i64>,
    w: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Case {
    experts: usize,
    hidden: usize,
    topk: usize,
    map: ExpertMap,
    policy: ReplicaPolicy,
    ranks_per_host: Option<usize>,
    inputs: Vec<Input>,
}

/// How rows travel and are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    F32,
    Bf16,
    F16,
    Int8,
}

impl Kind {
    fn dtype(self) -> Dtype {
        match self {
            Kind::F32 => Dtype::F32,
            Kind::Bf16 | Kind::Int8 => Dtype::Bf16,
            Kind::F16 => Dtype::F16,
        }
    }
}

/// A valid map from random picks: each expert on the first rank with a free slot from a
/// random one, then extra replicas on random ranks with room that lack the expert.
fn map_from(experts: usize, ranks: usize, extra: usize, picks: &[u32]) -> ExpertMap {
    let spr = experts.div_ceil(ranks) + extra;
    let mut per_rank: Vec<Vec<usize>> = vec![Vec::new(); ranks];
    let mut pick = picks.iter().cycle().map(|&p| p as usize);
    for e in 0..experts {
        let r0 = pick.next().unwrap() % ranks;
        let r = (0..ranks)
            .map(|i| (r0 + i) % ranks)
            .find(|&r| per_rank[r].len() < spr)
            .unwrap();
        per_rank[r].push(e);
    }
    for _ in 0..ranks * spr {
        let (e, r) = (pick.next().unwrap() % experts, pick.next().unwrap() % ranks);
        if per_rank[r].len() < spr && !per_rank[r].contains(&e) {
            per_rank[r].push(e);
        }
    }
    let mut slots = vec![None; ranks * spr];
    for (r, list) in per_rank.iter().enumerate() {
        // Slot order within a rank from the picks too.
        let shift = pick.next().unwrap() % spr;
        for (j, &e) in list.iter().enumerate() {
            slots[r * spr + (j + shift) % spr] = Some(e);
        }
    }
    ExpertMap::new(experts, ranks, slots, 7).unwrap()
}

fn inputs(
    n: usize,
    experts: usize,
    hidden: usize,
    topk: usize,
) -> impl Strategy<Value = Vec<Input>> {
    let input = (0usize..=12).prop_flat_map(move |tokens| {
        (
            proptest::collection::vec(0u8..8, tokens * hidden),
            proptest::collection::vec(
                proptest::sample::subsequence((0..experts as i64).collect::<Vec<_>>(), topk)
                    .prop_shuffle(),
                tokens,
            ),
            proptest::collection::vec(proptest::bool::weighted(0.2), tokens * topk),
            proptest::collection::vec(1u8..4, tokens * topk),
        )
            .prop_map(move |(x, choice, mask, w)| {
                let mut idx = Vec::new();
                for (t, c) in choice.iter().enumerate() {
                    for j in 0..topk {
                        idx.push(if mask[t * topk + j] { -1 } else { c[j] });
                    }
                }
                Input {
                    x: x.iter().map(|&v| v as f32).collect(),
                    idx,
                    w: w.iter().map(|&v| v as f32).collect(),
                }
            })
    });
    proptest::collection::vec(input, n)
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1usize..=8, 1usize..=10, 1usize..=12, 0usize..=3).prop_flat_map(
        |(n, experts, hidden, extra)| {
            (1usize..=experts.min(4)).prop_flat_map(move |topk| {
                (
                    proptest::collection::vec(any::<u32>(), 16),
                    0usize..3,
                    1usize..=n,
                    inputs(n, experts, hidden, topk),
                )
                    .prop_map(move |(picks, local, h, inputs)| {
                        // Hosts of `h` ranks when that divides the world, else one host.
                        let h = if n % h == 0 { h } else { n };
                        Case {
                            experts,
                            hidden,
                            topk,
                            map: map_from(experts, n, extra, &picks),
                            policy: [
                                ReplicaPolicy::Rotate,
                                ReplicaPolicy::LocalFirst,
                                ReplicaPolicy::FewestRanks,
                            ][local],
                            ranks_per_host: Some(h),
                            inputs,
                        }
                    })
            })
        },
    )
}

/// Runs one case on every rank of `fabric` and checks it (`reruns` times, bitwise equal).
fn check_case(fabric: Fabric, case: Case, kind: Kind, reruns: usize) {
    let n = case.inputs.len();
    let case = Arc::new(case);
    run_comms(fabric, n, move |comm| check_on(comm, &case, kind, reruns));
}

fn config(case: &Case, kind: Kind) -> MoeConfig {
    let max_tokens = case
        .inputs
        .iter()
        .map(|i| i.idx.len() / case.topk)
        .max()
        .unwrap_or(0);
    let mut cfg = MoeConfig::new(
        case.experts,
        case.hidden,
        case.topk,
        max_tokens.max(1),
        kind.dtype(),
    );
    cfg.map = Some(case.map.clone());
    cfg.replica_policy = case.policy;
    cfg.ranks_per_host = case.ranks_per_host;
    cfg.int8_dispatch = kind == Kind::Int8;
    cfg
}

fn check_on(comm: &Communicator, case: &Case, kind: Kind, reruns: usize) {
    let (me, n) = (comm.rank(), comm.world_size());
    let coll = Coll::new(comm).unwrap();
    let mut buf = MoeBuffer::new(comm, config(case, kind)).unwrap();
    let (h, k, dtype) = (case.hidden, case.topk, kind.dtype());
    let mine = &case.inputs[me];
    let x = encode(dtype, &mine.x);
    let max_t = buf.config().max_tokens;
    let slots = case.map.slot_count();
    let mut first: Option<Vec<u8>> = None;
    for _ in 0..reruns {
        let view = buf.dispatch(&x, &mine.idx, &mine.w).unwrap();
        let rows = view.rows().unwrap();
        // Received: (source, token, slot) counted here, then summed over the ranks.
        let mut seen = vec![0u64; n * max_t * slots];
        for row in &rows {
            let inp = &case.inputs[row.src_rank];
            let t = row.src_token;
            assert_eq!(row.experts.len(), row.slots.len());
            for (&(e, w), &s) in row.experts.iter().zip(&row.slots) {
                assert_eq!(
                    case.map.logical(s),
                    Some(e),
                    "slot {s} does not hold expert {e}"
                );
                assert_eq!(case.map.rank_of_slot(s), me, "slot {s} is not this rank's");
                let j = (0..k).find(|&j| inp.idx[t * k + j] == e as i64);
                let j = j.unwrap_or_else(|| {
                    panic!("token {t} of rank {} did not choose {e}", row.src_rank)
                });
                assert_eq!(w, inp.w[t * k + j]);
                seen[(row.src_rank * max_t + t) * slots + s] += 1;
            }
            let sent = encode(dtype, &inp.x[t * h..(t + 1) * h]);
            if kind != Kind::Int8 || row.src_rank == me {
                assert_eq!(
                    row.data,
                    &sent[..],
                    "row of token {t} from rank {}",
                    row.src_rank
                );
            }
        }
        coll.allreduce(&mut seen, ReduceOp::Sum).unwrap();
        check_delivery(case, &seen, max_t);
        // Experts f_e(x) = c_e x, reduced over this rank's experts with the gate weights.
        let reduced = scaled_outputs(&rows, dtype);
        drop(rows);
        let _ = view;
        let mut out = vec![0u8; x.len()];
        buf.combine(&reduced, &mut out).unwrap();
        check_combined(kind, mine, k, h, &decode(dtype, &out));
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(f, &out, "rerun differs"),
        }
    }
    buf.close().unwrap();
    coll.close().unwrap();
}

/// From the job-wide counts of (source, token, slot): every chosen (token, expert) reached
/// exactly one replica of the expert and nothing else arrived; rotate splits each source's
/// rows of an expert over its replicas within one; local-first uses the source's own
/// replica when it has one.
fn check_delivery(case: &Case, seen: &[u64], max_t: usize) {
    let (k, map, slots) = (case.topk, &case.map, case.map.slot_count());
    let mut expected = 0u64;
    for (s, inp) in case.inputs.iter().enumerate() {
        let mut per_replica: Vec<Vec<u64>> = (0..case.experts)
            .map(|e| vec![0; map.replicas(e).len()])
            .collect();
        for t in 0..inp.idx.len() / k {
            for j in 0..k {
                let e = inp.idx[t * k + j];
                if e < 0 {
                    continue;
                }
                let e = e as usize;
                expected += 1;
                let reps = map.replicas(e);
                let hits: Vec<usize> = (0..reps.len())
                    .filter(|&i| seen[(s * max_t + t) * slots + reps[i] as usize] > 0)
                    .collect();
                assert_eq!(
                    hits.len(),
                    1,
                    "token {t} of rank {s}, expert {e}: replicas {hits:?}"
                );
                assert_eq!(seen[(s * max_t + t) * slots + reps[hits[0]] as usize], 1);
                per_replica[e][hits[0]] += 1;
                if case.policy == ReplicaPolicy::LocalFirst {
                    if let Some(i) = reps.iter().position(|&r| map.rank_of_slot(r as usize) == s) {
                        assert_eq!(hits[0], i, "local-first: rank {s} has expert {e} itself");
                    }
                }
            }
        }
        if case.policy == ReplicaPolicy::Rotate {
            for (e, counts) in per_replica.iter().enumerate() {
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(
                    hi - lo <= 1,
                    "rank {s}, expert {e}: rows per replica {counts:?}"
                );
            }
        }
    }
    assert_eq!(seen.iter().sum::<u64>(), expected, "rows delivered in all");
}

/// The combine against the single-process reference: per token and element, the sum in
/// top-k order of w_j c_j x — exact in f32, within rounding for bf16/f16, within the INT8
/// bound (max|x|/254 per element, plus rounding) when rows crossed quantized.
fn check_combined(kind: Kind, mine: &Input, k: usize, h: usize, got: &[f32]) {
    for t in 0..mine.idx.len() / k {
        let chosen = || (0..k).filter(|&q| mine.idx[t * k + q] >= 0);
        let gain: f32 = chosen()
            .map(|q| mine.w[t * k + q] * c(mine.idx[t * k + q] as usize))
            .sum();
        let row_max = mine.x[t * h..(t + 1) * h]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        for j in 0..h {
            let v = mine.x[t * h + j];
            let want: f32 = chosen()
                .map(|q| mine.w[t * k + q] * c(mine.idx[t * k + q] as usize) * v)
                .sum();
            let g = got[t * h + j];
            match kind {
                Kind::F32 => assert_eq!(g, want, "token {t} elem {j}"),
                Kind::Int8 => assert!(
                    (g - want).abs()
                        <= gain * (row_max / 254.0 + v.abs() / 256.0) + want.abs() / 64.0 + 0.02,
                    "token {t} elem {j}: {g} vs {want}"
                ),
                _ => assert!(
                    (g - want).abs() <= want.abs() * 0.02 + 0.02,
                    "token {t} elem {j}: {g} vs {want}"
                ),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn every_row_reaches_one_replica_and_combine_is_exact_loopback(case in case_strategy()) {
        check_case(Fabric::Loopback, case, Kind::F32, 2);
    }

    #[test]
    fn every_row_reaches_one_replica_and_combine_is_exact_shm(case in case_strategy()) {
        check_case(Fabric::Shm, case, Kind::F32, 2);
    }

    #[test]
    fn every_row_reaches_one_replica_and_combine_is_exact_tcp(case in case_strategy()) {
        check_case(Fabric::Tcp, case, Kind::F32, 1);
    }

    #[test]
    fn replicas_keep_bf16_f16_and_int8_within_their_bounds(case in case_strategy(), kind in 0usize..3, fabric in 0usize..3) {
        let kind = [Kind::Bf16, Kind::F16, Kind::Int8][kind];
        let fabric = [Fabric::Loopback, Fabric::Shm, Fabric::Tcp][fabric];
        check_case(fabric, case, kind, 1);
    }
}

/// Non-integer data through a map with replicas: 20 reruns give the same bits.
#[test]
fn twenty_reruns_through_replicas_are_bitwise_identical() {
    let (n, experts, hidden, topk, tokens) = (4, 8, 64, 3, 16);
    let map = map_from(
        experts,
        n,
        2,
        &[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3],
    );
    assert!(map.extra_replicas() > 0);
    let inputs = (0..n)
        .map(|r| {
            let mut seed = 0x9E37_79B9u64 + r as u64;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            Input {
                x: (0..tokens * hidden)
                    .map(|_| (next() % 10_000) as f32 / 997.0 - 5.0)
                    .collect(),
                idx: (0..tokens)
                    .flat_map(|t| (0..topk).map(move |j| ((t * 5 + j * 3 + r) % experts) as i64))
                    .collect(),
                w: (0..tokens * topk)
                    .map(|_| (next() % 1000) as f32 / 1013.0)
                    .collect(),
            }
        })
        .collect();
    let case = Arc::new(Case {
        experts,
        hidden,
        topk,
        map,
        policy: ReplicaPolicy::Rotate,
        ranks_per_host: None,
        inputs,
    });
    run_comms(Fabric::Shm, n, move |comm| {
        let me = comm.rank();
        let mut buf = MoeBuffer::new(comm, config(&case, Kind::F32)).unwrap();
        let mine = &case.inputs[me];
        let x = encode(Dtype::F32, &mine.x);
        let mut first: Option<Vec<u8>> = None;
        for _ in 0..20 {
            let view = buf.dispatch(&x, &mine.idx, &mine.w).unwrap();
            let reduced = scaled_outputs(&view.rows().unwrap(), Dtype::F32);
            let mut out = vec![0u8; x.len()];
            buf.combine(&reduced, &mut out).unwrap();
            match &first {
                None => first = Some(out),
                Some(f) => assert_eq!(f, &out, "rerun differs"),
            }
        }
    });
}

/// Skewed routing for `step`: low expert ids are hot.
fn skewed_input(
    r: usize,
    step: usize,
    experts: usize,
    hidden: usize,
    topk: usize,
    tokens: usize,
) -> Input {
    let mut seed = (0xA076_1D64_78BD_642Fu64 ^ ((r as u64) << 32)) + step as u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut idx = Vec::new();
    for _ in 0..tokens {
        let mut row: Vec<i64> = Vec::new();
        while row.len() < topk {
            // Square of a uniform: a bias towards low ids.
            let u = (next() % 1000) as f64 / 1000.0;
            let e = ((u * u) * experts as f64) as i64;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        idx.extend(row);
    }
    Input {
        x: (0..tokens * hidden).map(|_| (next() % 8) as f32).collect(),
        idx,
        w: (0..tokens * topk)
            .map(|_| (1 + next() % 3) as f32)
            .collect(),
    }
}

/// Maps switched under a running job: every 10 steps of 200 the job-wide load of the last
/// window makes a new map (`rebalance`, keeping experts where they are), set on every rank;
/// every step is exact. Then a map that one rank sees differently fails every rank with
/// `ConfigMismatch`, a bad map is refused before anything is sent, and the buffer works on.
fn switch_maps(fabric: Fabric) {
    let (n, experts, hidden, topk, tokens) = (4, 16, 8, 4, 8);
    run_comms(fabric, n, move |comm| {
        let me = comm.rank();
        let coll = Coll::new(comm).unwrap();
        let mut cfg = MoeConfig::new(experts, hidden, topk, tokens, Dtype::F32);
        cfg.replica_policy = ReplicaPolicy::Rotate;
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        let shape = MapShape {
            ranks: n,
            slots_per_rank: 6,
            ranks_per_host: None,
        };
        let mut switched = 0;
        let step_once = |buf: &mut MoeBuffer<'_>, step: usize| {
            let inp = skewed_input(me, step, experts, hidden, topk, tokens);
            let x = encode(Dtype::F32, &inp.x);
            let view = buf.dispatch(&x, &inp.idx, &inp.w).unwrap();
            let reduced = scaled_outputs(&view.rows().unwrap(), Dtype::F32);
            let mut out = vec![0u8; x.len()];
            buf.combine(&reduced, &mut out).unwrap();
            check_combined(Kind::F32, &inp, topk, hidden, &decode(Dtype::F32, &out));
        };
        for step in 0..200 {
            step_once(&mut buf, step);
            if step % 10 == 9 {
                let load = buf.take_stats().job_expert_rows(&coll).unwrap();
                let load: Vec<f64> = load.iter().map(|&v| v as f64).collect();
                let map = rebalance(&load, &shape, Some(buf.map())).unwrap();
                buf.set_map(map).unwrap();
                switched += 1;
            }
        }
        assert_eq!(switched, 20);
        assert!(
            buf.map().extra_replicas() > 0,
            "the hot experts were replicated"
        );
        // One rank sees another map: every rank gets ConfigMismatch, the old map stays.
        let current = buf.map().clone();
        let other = match me {
            0 => current.clone().with_version(current.version() + 100),
            _ => current.clone().with_version(current.version() + 1),
        };
        match buf.set_map(other) {
            Err(Error::ConfigMismatch(_)) => {}
            r => panic!("rank {me}: a map rank 0 sees differently gave {r:?}"),
        }
        assert_eq!(buf.map(), &current);
        // A map of the wrong shape is refused before anything is sent.
        let wrong = ExpertMap::from_placement(&vec![0; experts], 1).unwrap();
        assert!(matches!(buf.set_map(wrong), Err(Error::InvalidArgument(_))));
        step_once(&mut buf, 200);
        buf.close().unwrap();
        coll.close().unwrap();
    });
}

#[test]
fn maps_switched_under_a_running_job_stay_exact_shm() {
    switch_maps(Fabric::Shm);
}

#[test]
fn maps_switched_under_a_running_job_stay_exact_tcp() {
    switch_maps(Fabric::Tcp);
}

/// One dispatch and combine with experts that return each row as it came; the output.
fn identity_step(buf: &mut MoeBuffer<'_>, x: &[u8], idx: &[i64], w: &[f32]) -> Vec<u8> {
    let view = buf.dispatch(x, idx, w).unwrap();
    let rows = view.rows().unwrap();
    let reduced: Vec<u8> = rows.iter().flat_map(|r| r.data.to_vec()).collect();
    let mut out = vec![0u8; x.len()];
    buf.combine(&reduced, &mut out).unwrap();
    out
}

/// Bad input: a policy that needs hosts without them, a map for another world, a map whose
/// experts differ from the configuration's.
#[test]
fn bad_maps_and_policies_are_refused_up_front() {
    run_comms(Fabric::Loopback, 2, |comm| {
        let mut cfg = MoeConfig::new(4, 8, 2, 4, Dtype::F32);
        cfg.replica_policy = ReplicaPolicy::LocalFirst;
        assert!(matches!(
            MoeBuffer::new(comm, cfg.clone()),
            Err(Error::InvalidArgument(_))
        ));
        cfg.replica_policy = ReplicaPolicy::Rotate;
        cfg.map = Some(ExpertMap::from_placement(&[0, 1, 2, 2], 3).unwrap());
        assert!(matches!(
            MoeBuffer::new(comm, cfg.clone()),
            Err(Error::InvalidArgument(_))
        ));
        cfg.map = Some(ExpertMap::from_placement(&[0, 1, 1], 2).unwrap());
        assert!(matches!(
            MoeBuffer::new(comm, cfg.clone()),
            Err(Error::InvalidArgument(_))
        ));
        // A good map still makes a working buffer.
        cfg.map = Some(ExpertMap::from_placement(&[0, 1, 1, 0], 2).unwrap());
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        let x = vec![0u8; 8 * 4];
        assert_eq!(identity_step(&mut buf, &x, &[0, 1], &[1.0, 1.0]), x);
    });
}

/// The statistics: rows per logical expert as dispatched (summed over ranks by the collective
/// call), the window restarted by `take_stats`, and the wait on a slow peer charged to that
/// peer (rank 2 starts each dispatch 30 ms late; rank 0 waited on it, not on rank 1).
#[test]
fn statistics_count_rows_per_expert_and_name_the_slow_peer() {
    run_comms(Fabric::Shm, 3, |comm| {
        let me = comm.rank();
        let coll = Coll::new(comm).unwrap();
        let mut buf = MoeBuffer::new(comm, MoeConfig::new(6, 8, 2, 4, Dtype::F32)).unwrap();
        let x = vec![0u8; 4 * 8 * 4];
        // Every rank: tokens choosing experts (0, 1), (0, 2), (me, -1), (5, 0).
        let idx = [0, 1, 0, 2, me as i64, -1, 5, 0];
        for _ in 0..3 {
            if me == 2 {
                std::thread::sleep(std::time::Duration::from_millis(30)); // the slow peer
            }
            identity_step(&mut buf, &x, &idx, &[1.0; 8]);
        }
        let stats = buf.take_stats();
        assert_eq!(stats.steps(), 3);
        let mut mine = [0u64; 6];
        for &e in idx.iter().filter(|&&e| e >= 0) {
            mine[e as usize] += 3;
        }
        assert_eq!(stats.expert_rows(), &mine[..]);
        let job = stats.job_expert_rows(&coll).unwrap();
        assert_eq!(job, vec![30, 12, 12, 0, 0, 9]);
        if me == 0 {
            let waited = stats.waited_dispatch();
            assert_eq!(waited[0], std::time::Duration::ZERO, "no wait on itself");
            assert!(
                waited[2] >= std::time::Duration::from_millis(60),
                "{waited:?}"
            );
            assert!(waited[2] > 4 * waited[1], "{waited:?}");
        }
        // A fresh window.
        assert_eq!(buf.stats().steps(), 0);
        assert!(buf.stats().expert_rows().iter().all(|&c| c == 0));
        buf.close().unwrap();
        coll.close().unwrap();
    });
}
