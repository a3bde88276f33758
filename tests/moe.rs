//! MoE dispatch and combine against a single-process reference, over loopback, shared memory
//! (ranks as threads, and as real processes) and tcp: random world sizes, token counts
//! (including 0), hidden sizes, top-k, expert counts, placements and `-1` masks; determinism
//! over reruns; bad input refused up front.

mod common;

use common::moe_rows::{c, decode, encode, scaled_outputs};
use common::{
    assert_no_leaks, run_comms, run_on_hosts, run_split_comms, Fabric, Job, SCENARIO, SERIAL,
};
use proptest::prelude::*;
use std::sync::Arc;
use xccl::moe::{quant, Dtype, MoeBuffer, MoeConfig, TwoLevel};
use xccl::{Communicator, Error};

/// Entry point of the rank processes of the multi-process test (the binary re-enters itself).
#[test]
#[ignore = "entry point of the rank processes that the other tests start"]
fn worker() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    if scenario == "moe_peer_killed" {
        return peer_killed_mid_dispatch();
    }
    assert_eq!(scenario, "moe_case", "unknown scenario");
    let seed: u64 = std::env::var("XCCL_TEST_SEED").unwrap().parse().unwrap();
    let comm = Communicator::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let case = seeded_case(comm.world_size(), seed);
    // Both modes through real processes' mapped windows; INT8 on odd seeds, zero-copy
    // dispatch on even ones.
    check_on(&comm, &case, Dtype::F32, 2, Rows::Plain);
    check_low_latency_on(&comm, &case, Dtype::F32, false);
    if seed % 2 == 1 {
        check_on(&comm, &case, Dtype::Bf16, 2, Rows::Int8);
        check_low_latency_on(&comm, &case, Dtype::Bf16, true);
    } else {
        check_on(&comm, &case, Dtype::Bf16, 2, Rows::ZeroCopy);
    }
    comm.barrier().unwrap();
    println!("DONE {seed}");
}

/// The property test's cases, drawn from seeds, run by real processes over shared memory
/// (1 to 8 ranks) in both modes (INT8 too on odd seeds), each job under a watchdog and
/// followed by a leak check.
#[test]
fn dispatch_and_combine_match_reference_multiprocess_shm() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for (n, seed) in [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
        (5, 5),
        (8, 6),
        (2, 7),
        (3, 8),
    ] {
        let case = seeded_case(n, seed);
        eprintln!(
            "{n} ranks, seed {seed}: {} experts, hidden {}, top-{}, tokens {:?}",
            case.experts,
            case.hidden,
            case.topk,
            case.inputs
                .iter()
                .map(|i| i.idx.len() / case.topk)
                .collect::<Vec<_>>()
        );
        let mut job = Job::start(n, "moe_case", &[("XCCL_TEST_SEED", seed.to_string())]);
        let status = job.wait_all(std::time::Duration::from_secs(120));
        assert!(
            status.iter().all(|s| s.success()),
            "seed {seed} on {n} ranks: {status:?}"
        );
        assert_no_leaks(&job.mark);
    }
}

/// Three ranks run one checked round of each mode, then rank 1 stops taking part (the test
/// kills it) while rank 0 dispatches in normal mode and rank 2 in low-latency mode: both
/// waits must end with `PeerFailed { rank: 1 }`, not hang.
fn peer_killed_mid_dispatch() {
    let comm = Communicator::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let (experts, hidden, tokens) = (3, 8, 4);
    let mut cfg = MoeConfig::new(experts, hidden, 1, tokens, Dtype::F32);
    cfg.placement = Some(vec![0, 1, 2]);
    let mut normal = MoeBuffer::new(&comm, cfg.clone()).unwrap();
    let mut ll = xccl::moe::LowLatencyBuffer::new(&comm, cfg).unwrap();
    let x = encode(
        Dtype::F32,
        &(0..tokens * hidden).map(|v| v as f32).collect::<Vec<_>>(),
    );
    let w = vec![1.0; tokens];
    // A checked round: token t goes to expert t mod 3; identity experts, weight 1: out == x.
    let spread: Vec<i64> = (0..tokens as i64).map(|t| t % 3).collect();
    let view = normal.dispatch(&x, &spread, &w).unwrap();
    let reduced: Vec<u8> = view
        .rows()
        .unwrap()
        .iter()
        .flat_map(|r| r.data.to_vec())
        .collect();
    let mut out = vec![0u8; x.len()];
    normal.combine(&reduced, &mut out).unwrap();
    assert_eq!(out, x, "normal round");
    let view = ll.dispatch(&x, &spread, &w).unwrap();
    let outputs = common::low_latency::weighted_sums(&view, |_, v| v);
    let mut out = vec![0u8; x.len()];
    ll.combine(&outputs, &mut out).unwrap();
    assert_eq!(out, x, "low-latency round");
    comm.barrier().unwrap();
    println!("READY {}", comm.transport().caps().backend);
    // Every token to rank 1's expert; rank 1 does not come.
    let to_1 = vec![1i64; tokens];
    let r = match comm.rank() {
        0 => normal.dispatch(&x, &to_1, &w).map(|_| ()),
        2 => ll.dispatch(&x, &to_1, &w).map(|_| ()),
        _ => {
            let t = comm.transport();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let _ = t.wait(0, xccl::transport::Cmp::Ge, u64::MAX, until);
            panic!("rank 1 was to be killed");
        }
    };
    match r {
        Err(Error::PeerFailed { rank }) => println!("PEERFAILED {rank}"),
        other => panic!("expected PeerFailed, got {other:?}"),
    }
}

/// A rank killed while the others dispatch (normal mode on one, low-latency on another)
/// fails both dispatches with `PeerFailed` within 5 s, over shared memory and over tcp (2 s
/// peer timeout); nothing is left behind.
#[test]
fn a_rank_killed_mid_dispatch_fails_the_others() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tcp = [
        ("XCCL_BACKEND", "tcp".to_string()),
        ("XCCL_TCP_PEER_TIMEOUT_MS", "2000".to_string()),
    ];
    for (backend, env) in [("shm", &[][..]), ("tcp", &tcp[..])] {
        let mut job = Job::start(3, "moe_peer_killed", env);
        let ready = format!("READY {backend}");
        job.expect_from(&[0, 1, 2], &ready, std::time::Duration::from_secs(60));
        let killed_at = std::time::Instant::now();
        job.kill(1);
        job.expect_from(&[0, 2], "PEERFAILED 1", std::time::Duration::from_secs(5));
        let took = killed_at.elapsed();
        let st = job.wait_all(std::time::Duration::from_secs(30));
        for r in [0, 2] {
            assert!(st[r].success(), "rank {r}: {:?}", st[r]);
        }
        eprintln!("{backend}: both dispatches failed with PeerFailed within {took:?} of SIGKILL");
        let mark = job.mark.clone();
        drop(job);
        assert_no_leaks(&mark);
    }
}

/// How normal-mode rows travel: as they are, as INT8, or left in place (zero-copy).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rows {
    Plain,
    Int8,
    ZeroCopy,
}

/// One rank's input: token rows (f32 values), expert choices and weights.
#[derive(Debug, Clone)]
struct RankInput {
    x: Vec<f32>,
    idx: Vec<i64>,
    w: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Case {
    experts: usize,
    hidden: usize,
    topk: usize,
    placement: Vec<usize>,
    inputs: Vec<RankInput>,
}

impl Case {
    /// Experts dealt to the ranks in turn (expert e on rank e mod world).
    fn round_robin(experts: usize, hidden: usize, topk: usize, inputs: Vec<RankInput>) -> Case {
        let n = inputs.len();
        Case {
            experts,
            hidden,
            topk,
            placement: (0..experts).map(|e| e % n).collect(),
            inputs,
        }
    }
}

/// A row that crossed as INT8: exactly the sender's row quantized and rebuilt (so it did
/// travel quantized), and within the documented bound of the original.
fn check_int8_row(dtype: Dtype, got: &[u8], sent: &[u8], hidden: usize) {
    let scale = quant::row_scale(dtype, sent, hidden).expect("finite row");
    let mut q = vec![0u8; hidden];
    quant::quantize(dtype, sent, hidden, scale, &mut q);
    let mut rebuilt = vec![0u8; sent.len()];
    quant::dequantize(dtype, &q, scale, &mut rebuilt);
    assert_eq!(got, &rebuilt[..], "INT8 row rebuilt differently");
    let (got, want) = (decode(dtype, got), decode(dtype, sent));
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= max / 254.0 + g.abs() / 256.0 + 1e-6,
            "int8 row: {g} vs {w}"
        );
    }
}

/// Checks a combine's output `got` for this rank's input: per token and element, the sum in
/// top-k order of `term(w_j, c_j, x)` over the chosen experts — exact in f32, within rounding
/// for bf16/f16, within the INT8 bound when rows crossed quantized.
fn check_combined(
    dtype: Dtype,
    int8: bool,
    mine: &RankInput,
    k: usize,
    h: usize,
    got: &[f32],
    term: impl Fn(f32, f32, f32) -> f32,
) {
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
                .map(|q| term(mine.w[t * k + q], c(mine.idx[t * k + q] as usize), v))
                .sum();
            let g = got[t * h + j];
            match dtype {
                _ if int8 => assert!(
                    (g - want).abs()
                        <= gain * (row_max / 254.0 + v.abs() / 256.0) + want.abs() / 64.0 + 0.02,
                    "token {t} elem {j}: {g} vs {want}"
                ),
                Dtype::F32 => assert_eq!(g, want, "token {t} elem {j}"),
                _ => assert!(
                    (g - want).abs() <= want.abs() * 0.02 + 0.02,
                    "token {t} elem {j}: {g} vs {want}"
                ),
            }
        }
    }
}

/// Runs dispatch + combine on every rank and checks both against the reference.
fn check_case(fabric: Fabric, case: Case, dtype: Dtype, reruns: usize) {
    check_case_with(fabric, case, dtype, reruns, Rows::Plain)
}

/// As `check_case`; with `int8`, rows from other ranks travel quantized and are checked
/// against the documented bound (max|x| / 254 per element, plus the dtype's rounding).
fn check_case_with(fabric: Fabric, case: Case, dtype: Dtype, reruns: usize, rows: Rows) {
    let n = case.inputs.len();
    let case = Arc::new(case);
    run_comms(fabric, n, move |comm| {
        check_on(comm, &case, dtype, reruns, rows)
    });
}

/// One rank's part of `check_case_with` (threads or processes alike).
fn check_on(comm: &Communicator, case: &Case, dtype: Dtype, reruns: usize, travel: Rows) {
    let int8 = travel == Rows::Int8;
    {
        let me = comm.rank();
        let max_tokens = case
            .inputs
            .iter()
            .map(|i| i.idx.len() / case.topk)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut cfg = MoeConfig::new(case.experts, case.hidden, case.topk, max_tokens, dtype);
        cfg.placement = Some(case.placement.clone());
        cfg.int8_dispatch = int8;
        cfg.zero_copy_dispatch = travel == Rows::ZeroCopy;
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        let mine = &case.inputs[me];
        let x = encode(dtype, &mine.x);
        let h = case.hidden;
        let k = case.topk;
        let tokens = mine.idx.len() / k;
        let mut first_out: Option<Vec<u8>> = None;
        for rerun in 0..reruns {
            // Every other rank (and rerun) has its experts write straight into the window.
            let in_window = (rerun + me) % 2 == 1;
            let mut view = match travel {
                Rows::ZeroCopy => {
                    buf.input(tokens).unwrap().copy_from_slice(&x);
                    buf.dispatch_in_place(&mine.idx, &mine.w).unwrap()
                }
                _ => buf.dispatch(&x, &mine.idx, &mine.w).unwrap(),
            };
            // Dispatch: exactly the rows the reference predicts, grouped by source in order.
            let rows = view.rows().unwrap();
            let mut expect = Vec::new();
            for (s, inp) in case.inputs.iter().enumerate() {
                for t in 0..inp.idx.len() / k {
                    let local: Vec<(usize, f32)> = (0..k)
                        .filter(|&j| {
                            inp.idx[t * k + j] >= 0
                                && case.placement[inp.idx[t * k + j] as usize] == me
                        })
                        .map(|j| (inp.idx[t * k + j] as usize, inp.w[t * k + j]))
                        .collect();
                    if !local.is_empty() {
                        expect.push((s, t, local, encode(dtype, &inp.x[t * h..(t + 1) * h])));
                    }
                }
            }
            assert_eq!(rows.len(), expect.len(), "rank {me}: rows received");
            for (row, (s, t, local, data)) in rows.iter().zip(&expect) {
                assert_eq!((row.src_rank, row.src_token), (*s, *t));
                assert_eq!(&row.experts, local);
                if int8 && *s != me {
                    check_int8_row(dtype, row.data, data, h);
                } else {
                    assert_eq!(row.data, &data[..]);
                }
            }
            let per_expert = view.tokens_per_local_expert().unwrap();
            for (e, count) in per_expert {
                let want = expect
                    .iter()
                    .filter(|(_, _, l, _)| l.iter().any(|&(x, _)| x == e))
                    .count();
                assert_eq!(count, want, "tokens for expert {e}");
            }
            // Experts: f_e(x) = c_e x, reduced over this rank's experts with the gate weights.
            let reduced = scaled_outputs(&rows, dtype);
            if in_window {
                view.expert_output().unwrap().copy_from_slice(&reduced);
            }
            drop(rows);
            let _ = view;
            if travel == Rows::ZeroCopy {
                // Peers may still read the input rows: not writable until the combine.
                match buf.input(tokens) {
                    Err(Error::InvalidUsage(_)) => {}
                    other => panic!("input before the combine: {:?}", other.map(|_| ())),
                }
            }
            let mut out = vec![0u8; x.len()];
            if in_window {
                buf.combine_in_place(&mut out).unwrap();
            } else {
                buf.combine(&reduced, &mut out).unwrap();
            }
            // Experts reduce with the gate weights: (w · c_e) · x.
            let got = decode(dtype, &out);
            check_combined(dtype, int8, mine, k, h, &got, |w, ce, v| w * ce * v);
            match &first_out {
                None => first_out = Some(out),
                Some(f) => assert_eq!(f, &out, "rerun differs"),
            }
        }
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (1usize..=5).prop_flat_map(case_for_world)
}

/// The case a seed stands for, for `n` ranks (every process of a job derives the same one).
fn seeded_case(n: usize, seed: u64) -> Case {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    case_for_world(n)
        .new_tree(&mut runner)
        .expect("a case")
        .current()
}

fn case_for_world(n: usize) -> impl Strategy<Value = Case> {
    (1usize..=10, 1usize..=12).prop_flat_map(move |(experts, hidden)| {
        (1usize..=experts.min(4)).prop_flat_map(move |topk| {
            let input = (0usize..=20).prop_flat_map(move |tokens| {
                (
                    proptest::collection::vec(0u8..8, tokens * hidden),
                    proptest::collection::vec(
                        proptest::sample::subsequence(
                            (0..experts as i64).collect::<Vec<_>>(),
                            topk,
                        ),
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
                        RankInput {
                            x: x.iter().map(|&v| v as f32).collect(),
                            idx,
                            w: w.iter().map(|&v| v as f32).collect(),
                        }
                    })
            });
            (
                proptest::collection::vec(0..n, experts),
                proptest::collection::vec(input, n),
            )
                .prop_map(move |(placement, inputs)| Case {
                    experts,
                    hidden,
                    topk,
                    placement,
                    inputs,
                })
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn dispatch_and_combine_match_reference_loopback(case in case_strategy()) {
        check_case(Fabric::Loopback, case, Dtype::F32, 2);
    }

    #[test]
    fn dispatch_and_combine_match_reference_shm(case in case_strategy()) {
        check_case(Fabric::Shm, case, Dtype::F32, 2);
    }

    #[test]
    fn dispatch_and_combine_match_reference_tcp(case in case_strategy()) {
        check_case(Fabric::Tcp, case, Dtype::F32, 2);
    }

    /// Path kinds differ by peer: even ranks map each other, the rest go through puts.
    #[test]
    fn dispatch_and_combine_match_reference_when_paths_differ(case in case_strategy()) {
        check_case(Fabric::Mixed, case, Dtype::F32, 2);
    }

    #[test]
    fn bf16_and_f16_stay_within_their_rounding(case in case_strategy(), f16 in any::<bool>()) {
        check_case(Fabric::Loopback, case, if f16 { Dtype::F16 } else { Dtype::Bf16 }, 1);
    }

    #[test]
    fn int8_dispatch_stays_within_its_bound(case in case_strategy(), f16 in any::<bool>(), fabric in 0usize..4) {
        // Hybrid: relayed through gateways (two-level) wherever a host holds two ranks.
        let fabric = [Fabric::Shm, Fabric::Loopback, Fabric::Mixed, Fabric::Hybrid][fabric];
        check_case_with(fabric, case, if f16 { Dtype::F16 } else { Dtype::Bf16 }, 2, Rows::Int8);
    }

    /// Zero-copy dispatch: mapped ranks read the rows where their sources wrote them, the
    /// others are sent them; the same rows and sums as a copying dispatch, on every fabric.
    #[test]
    fn zero_copy_dispatch_matches_reference(case in case_strategy(), fabric in 0usize..4) {
        let fabric = [Fabric::Shm, Fabric::Loopback, Fabric::Mixed, Fabric::Tcp][fabric];
        check_case_with(fabric, case, Dtype::F32, 3, Rows::ZeroCopy);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// Shared memory within each of two emulated hosts, TCP between them: copying and
    /// zero-copy dispatch (mapped peers read in place, the others are sent their rows).
    #[test]
    fn dispatch_and_combine_match_reference_hybrid(case in case_strategy(), zero_copy in any::<bool>()) {
        let rows = if zero_copy { Rows::ZeroCopy } else { Rows::Plain };
        check_case_with(Fabric::Hybrid, case, Dtype::F32, 2, rows);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Both modes on communicators split from a parent (its even and its odd ranks), while
    /// every parent rank keeps running checked all-to-all-v calls on the parent.
    #[test]
    fn both_modes_match_reference_on_a_split_communicator(
        case in (1usize..=3).prop_flat_map(case_for_world),
        fabric in 0usize..4,
    ) {
        let fabric = [Fabric::Loopback, Fabric::Shm, Fabric::Tcp, Fabric::Hybrid][fabric];
        let n = case.inputs.len();
        let case = Arc::new(case);
        run_split_comms(fabric, n, move |child| {
            check_on(child, &case, Dtype::F32, 2, Rows::Plain);
            check_low_latency_on(child, &case, Dtype::F32, false);
        });
    }
}

/// 20 reruns of dispatch + combine give bitwise identical outputs.
#[test]
fn twenty_reruns_are_bitwise_identical() {
    let n = 4;
    let (experts, hidden, topk, tokens) = (8, 32, 3, 64);
    let inputs = (0..n)
        .map(|r| RankInput {
            x: (0..tokens * hidden)
                .map(|i| ((i * 7 + r * 3) % 11) as f32 * 0.37 - 1.1)
                .collect(),
            idx: (0..tokens * topk)
                .map(|i| ((i * 5 + r) % experts) as i64)
                .collect::<Vec<_>>(),
            w: (0..tokens * topk)
                .map(|i| 0.1 + (i % 7) as f32 * 0.13)
                .collect(),
        })
        .map(|mut inp| {
            // Make every row's experts distinct.
            for t in 0..tokens {
                for j in 0..topk {
                    inp.idx[t * topk + j] = ((t + j * 3 + inp.x.len()) % experts) as i64;
                }
            }
            inp
        })
        .collect();
    let case = Case::round_robin(experts, hidden, topk, inputs);
    // Non-integer data: combine is checked against the reference within rounding and across
    // the reruns bit for bit, with rows copied and left in place.
    check_case(Fabric::Shm, case.clone(), Dtype::Bf16, 20);
    check_case_with(Fabric::Shm, case, Dtype::Bf16, 20, Rows::ZeroCopy);
}

/// Dispatches large enough to take the streaming-store path into mapped windows (over 1 MiB
/// to a peer), and over tcp to leave in several staged chunks (and the combine's rows to
/// come back in several chunks, summed as they arrive), deliver exactly the reference rows
/// and sums, three calls in a row (both epochs); the combine's 4 MiB outputs are written
/// with streaming stores.
#[test]
fn large_dispatch_is_exact() {
    let (n, experts, hidden, topk, tokens) = (2, 4, 4096, 2, 256);
    let inputs = (0..n)
        .map(|r| RankInput {
            // Small integers: every sum is exact in f32.
            x: (0..tokens * hidden)
                .map(|i| ((i * 7 + r * 3) % 9) as f32 - 4.0)
                .collect(),
            idx: (0..tokens)
                .flat_map(|t| [(t % experts) as i64, ((t + 1 + r) % experts) as i64])
                .collect(),
            w: (0..tokens * topk).map(|i| (1 + i % 3) as f32).collect(),
        })
        .collect();
    let case = Case::round_robin(experts, hidden, topk, inputs);
    check_case(Fabric::Shm, case.clone(), Dtype::F32, 3);
    check_case(Fabric::Tcp, case, Dtype::F32, 3);
}

/// 3 ranks, 6 experts, hidden 2048, top-2, 90 tokens each of non-integer values: rows large
/// enough that INT8 rows cross in several chunks in either mode.
fn large_int8_case() -> Case {
    let (n, experts, hidden, topk, tokens) = (3, 6, 2048, 2, 90);
    let inputs = (0..n)
        .map(|r| RankInput {
            x: (0..tokens * hidden)
                .map(|i| ((i * 13 + r * 5) % 23) as f32 * 0.25 - 2.75)
                .collect(),
            idx: (0..tokens)
                .flat_map(|t| [(t % experts) as i64, ((t + 2 + r) % experts) as i64])
                .collect(),
            w: (0..tokens * topk)
                .map(|i| 0.5 + (i % 4) as f32 * 0.25)
                .collect(),
        })
        .collect();
    Case::round_robin(experts, hidden, topk, inputs)
}

/// INT8 dispatch over tcp, where records cross the network packed (half a full record each)
/// and are spread out as they are dequantized: several staged chunks, three calls in a row,
/// every row within the INT8 bound.
#[test]
fn int8_dispatch_over_tcp_stays_within_its_bound() {
    let case = large_int8_case();
    check_case_with(Fabric::Tcp, case, Dtype::Bf16, 3, Rows::Int8);
}

#[test]
fn bad_input_is_refused_before_anything_is_sent() {
    run_comms(Fabric::Loopback, 2, |comm| {
        let cfg = MoeConfig::new(4, 8, 2, 3, Dtype::F32);
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        let row = vec![0u8; 8 * 4];
        let bad =
            |r: xccl::Result<()>| assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        bad(buf.dispatch(&row, &[0, 4], &[1.0, 1.0]).map(|_| ()));
        bad(buf.dispatch(&row, &[1, 1], &[1.0, 1.0]).map(|_| ()));
        bad(buf.dispatch(&row, &[0, 1], &[1.0, f32::NAN]).map(|_| ()));
        bad(buf.dispatch(&row[..8], &[0, 1], &[1.0, 1.0]).map(|_| ()));
        bad(buf
            .dispatch(&[0u8; 4 * 32], &[0, 1, 0, 1, 0, 1, 0, 1], &[1.0; 8])
            .map(|_| ()));
        bad(buf.dispatch(&row, &[0, 1], &[1.0]).map(|_| ()));
        // A NaN weight on a masked slot does not matter; zero tokens work; the buffer is still
        // usable after the refusals (nothing was sent).
        let view = buf.dispatch(&row, &[0, -1], &[2.0, f32::NAN]).unwrap();
        assert_eq!(
            view.counts().iter().sum::<usize>(),
            if comm.rank() == 0 { 2 } else { 0 }
        );
        let _ = view;
        let n_in: usize = if comm.rank() == 0 { 2 } else { 0 };
        let mut out = vec![0u8; row.len()];
        buf.combine(&vec![0u8; n_in * 32], &mut out).unwrap();
        let view = buf.dispatch(&[], &[], &[]).unwrap();
        assert!(view.is_empty());
        let _ = view;
        buf.combine(&[], &mut []).unwrap();
    });
}

/// Low-latency mode refuses the same bad input up front (and, with INT8, a row that is not
/// finite); the buffer still works afterwards, so nothing was sent.
#[test]
fn low_latency_bad_input_is_refused_before_anything_is_sent() {
    run_comms(Fabric::Loopback, 2, |comm| {
        let mut cfg = MoeConfig::new(4, 8, 2, 3, Dtype::Bf16);
        cfg.int8_dispatch = true;
        let mut buf = xccl::moe::LowLatencyBuffer::new(comm, cfg).unwrap();
        let row = encode(Dtype::Bf16, &[1.0; 8]);
        let bad =
            |r: xccl::Result<()>| assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        bad(buf.dispatch(&row, &[0, 4], &[1.0, 1.0]).map(|_| ()));
        bad(buf.dispatch(&row, &[1, 1], &[1.0, 1.0]).map(|_| ()));
        bad(buf
            .dispatch(&row, &[0, 1], &[1.0, f32::INFINITY])
            .map(|_| ()));
        bad(buf.dispatch(&row[..8], &[0, 1], &[1.0, 1.0]).map(|_| ()));
        bad(buf
            .dispatch(&[0u8; 4 * 16], &[0, 1, 0, 1, 0, 1, 0, 1], &[1.0; 8])
            .map(|_| ()));
        bad(buf.dispatch(&row, &[0, 1], &[1.0]).map(|_| ()));
        let nan = encode(Dtype::Bf16, &[1.0, 2.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0]);
        bad(buf.dispatch(&nan, &[0, 3], &[1.0, 1.0]).map(|_| ()));
        // Still usable: every rank sends its token to expert 1 (rank 0) and expert 3 (rank 1),
        // the second of each rank's two experts.
        let view = buf.dispatch(&row, &[1, 3], &[1.0, 0.5]).unwrap();
        assert_eq!(view.counts().unwrap(), vec![0, 2]);
        // Identity experts: each received token's row times its expert's weight.
        let outputs: Vec<u8> = (0..2)
            .flat_map(|l| view.expert_rows(l).unwrap())
            .flat_map(|r| {
                let y: Vec<f32> = decode(Dtype::Bf16, r.data)
                    .iter()
                    .map(|v| r.weight * v)
                    .collect();
                encode(Dtype::Bf16, &y)
            })
            .collect();
        let _ = view;
        let mut out = vec![0u8; row.len()];
        buf.combine(&outputs, &mut out).unwrap();
        assert_eq!(decode(Dtype::Bf16, &out), vec![1.5; 8]);
    });
}

/// Low-latency mode: each expert gets the rows that chose it, grouped by source in rank
/// order; the rank's experts sum their weighted outputs per token, the homes add the ranks'.
fn check_low_latency(fabric: Fabric, case: Case) {
    check_low_latency_with(fabric, case, Dtype::F32, false)
}

/// As `check_low_latency`, in `dtype`: f32 exact, bf16/f16 within their rounding; with
/// `int8`, rows from other ranks travel quantized and are checked against the INT8 bound.
/// The reruns give the same bits.
fn check_low_latency_with(fabric: Fabric, case: Case, dtype: Dtype, int8: bool) {
    let n = case.inputs.len();
    let case = Arc::new(case);
    run_comms(fabric, n, move |comm| {
        check_low_latency_on(comm, &case, dtype, int8)
    });
}

/// One rank's part of `check_low_latency_with` (threads or processes alike).
fn check_low_latency_on(comm: &Communicator, case: &Case, dtype: Dtype, int8: bool) {
    {
        let me = comm.rank();
        let (h, k) = (case.hidden, case.topk);
        let max_tokens = case
            .inputs
            .iter()
            .map(|i| i.idx.len() / k)
            .max()
            .unwrap_or(0)
            .max(1);
        let mut cfg = MoeConfig::new(case.experts, h, k, max_tokens, dtype);
        cfg.placement = Some(case.placement.clone());
        cfg.int8_dispatch = int8;
        let mut buf = xccl::moe::LowLatencyBuffer::new(comm, cfg).unwrap();
        let mine = &case.inputs[me];
        let x = encode(dtype, &mine.x);
        let mut first_out: Option<Vec<u8>> = None;
        for rerun in 0..3 {
            // Every other rank (and rerun) has its experts write straight into the window.
            let in_window = (rerun + me) % 2 == 1;
            let mut view = buf.dispatch(&x, &mine.idx, &mine.w).unwrap();
            // Per received token (row `index` of the output): this rank's experts' weighted
            // sum, w · (c_e · x), in f32.
            let mut sums = vec![0f32; view.len() * h];
            let by_expert = view.rows_by_expert().unwrap();
            for (l, &e) in view.local_experts().to_vec().iter().enumerate() {
                let rows = view.expert_rows(l).unwrap();
                assert_eq!(
                    by_expert[l], rows,
                    "rows_by_expert()[{l}] against expert_rows({l})"
                );
                let mut expect = Vec::new();
                for (s, inp) in case.inputs.iter().enumerate() {
                    for t in 0..inp.idx.len() / k {
                        for j in 0..k {
                            if inp.idx[t * k + j] == e as i64 {
                                expect.push((
                                    s,
                                    t,
                                    inp.w[t * k + j],
                                    encode(dtype, &inp.x[t * h..(t + 1) * h]),
                                ));
                            }
                        }
                    }
                }
                assert_eq!(rows.len(), expect.len(), "expert {e}");
                for (r, (s, t, w, d)) in rows.iter().zip(&expect) {
                    assert_eq!((r.src_rank, r.src_token, r.weight), (*s, *t, *w));
                    if int8 && *s != me {
                        check_int8_row(dtype, r.data, d, h);
                    } else {
                        assert_eq!(r.data, &d[..]);
                    }
                    assert!(
                        r.index < view.len(),
                        "row index {} of {}",
                        r.index,
                        view.len()
                    );
                    // The expert's output, in the dtype, as an expert would give it.
                    let y: Vec<f32> = decode(dtype, r.data).iter().map(|v| c(e) * v).collect();
                    let y = decode(dtype, &encode(dtype, &y));
                    let acc = &mut sums[r.index * h..(r.index + 1) * h];
                    for (a, v) in acc.iter_mut().zip(y) {
                        *a += w * v;
                    }
                }
            }
            // Every received token is some source's token that chose one of this rank's
            // experts, once.
            let received: usize = case
                .inputs
                .iter()
                .map(|inp| {
                    inp.idx
                        .chunks(k)
                        .filter(|c| {
                            c.iter()
                                .any(|&e| e >= 0 && case.placement[e as usize] == me)
                        })
                        .count()
                })
                .sum();
            assert_eq!(view.len(), received);
            let outputs = encode(dtype, &sums);
            if in_window {
                view.output().unwrap().copy_from_slice(&outputs);
            }
            let _ = view;
            let mut out = vec![0u8; x.len()];
            if in_window {
                buf.combine_in_place(&mut out).unwrap();
            } else {
                buf.combine(&outputs, &mut out).unwrap();
            }
            // The homes add up the ranks' sums of w · (c_e · x).
            let got = decode(dtype, &out);
            check_combined(dtype, int8, mine, k, h, &got, |w, ce, v| w * (ce * v));
            match &first_out {
                None => first_out = Some(out),
                Some(f) => assert_eq!(f, &out, "rerun differs"),
            }
        }
    }
}

/// Low-latency dispatch with rows large enough that one expert's rows from one rank leave
/// over tcp in several chunks (and into mapped windows with streaming stores), checked
/// against the reference on both.
#[test]
fn large_low_latency_is_exact() {
    let (n, experts, hidden, topk, tokens) = (2, 4, 4096, 2, 72);
    let inputs = (0..n)
        .map(|r| RankInput {
            x: (0..tokens * hidden)
                .map(|i| ((i * 5 + r * 7) % 11) as f32 - 5.0)
                .collect(),
            idx: (0..tokens)
                .flat_map(|t| [(t % 2) as i64 * 2, ((t + r) % 2) as i64 * 2 + 1])
                .collect(),
            w: (0..tokens * topk).map(|i| (1 + i % 2) as f32).collect(),
        })
        .collect();
    let case = Case::round_robin(experts, hidden, topk, inputs);
    check_low_latency(Fabric::Shm, case.clone());
    check_low_latency(Fabric::Tcp, case);
}

/// Low-latency INT8 dispatch with rows large enough to cross in several chunks over tcp and
/// with streaming stores into mapped windows: packed INT8 rows are spread out and rebuilt in
/// their slots, three calls in a row (both epochs), every row within the INT8 bound.
#[test]
fn large_low_latency_int8_stays_within_its_bound() {
    let case = large_int8_case();
    check_low_latency_with(Fabric::Shm, case.clone(), Dtype::Bf16, true);
    check_low_latency_with(Fabric::Mixed, case.clone(), Dtype::Bf16, true);
    check_low_latency_with(Fabric::Tcp, case, Dtype::F16, true);
}

/// INT8 dispatch is for bf16 and f16 rows: both modes refuse it for f32 when the buffer is
/// made.
#[test]
fn int8_of_f32_rows_is_refused() {
    run_comms(Fabric::Loopback, 2, |comm| {
        let mut cfg = MoeConfig::new(4, 8, 2, 3, Dtype::F32);
        cfg.int8_dispatch = true;
        let bad = |r: xccl::Result<()>| assert!(matches!(r, Err(Error::InvalidArgument(_))));
        bad(MoeBuffer::new(comm, cfg.clone()).map(|_| ()));
        bad(xccl::moe::LowLatencyBuffer::new(comm, cfg).map(|_| ()));
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Every fabric, the hybrid one across two emulated hosts included (one put per row to
    /// the ranks of the other host).
    #[test]
    fn low_latency_matches_reference(case in case_strategy(), fabric in 0usize..4) {
        check_low_latency([Fabric::Shm, Fabric::Tcp, Fabric::Mixed, Fabric::Hybrid][fabric], case);
    }

    #[test]
    fn low_latency_in_bf16_and_f16_stays_within_rounding(case in case_strategy(), f16 in any::<bool>()) {
        check_low_latency_with(Fabric::Loopback, case, if f16 { Dtype::F16 } else { Dtype::Bf16 }, false);
    }

    #[test]
    fn low_latency_int8_stays_within_its_bound(case in case_strategy(), f16 in any::<bool>(), fabric in 0usize..3) {
        let fabric = [Fabric::Shm, Fabric::Tcp, Fabric::Mixed][fabric];
        check_low_latency_with(fabric, case, if f16 { Dtype::F16 } else { Dtype::Bf16 }, true);
    }
}

/// Hosts for two-level routing: 2×2, 2×3 and 3×1 (hosts × ranks), or a random host per rank
/// (at most three hosts), numbered by their lowest rank.
fn host_table() -> impl Strategy<Value = Vec<usize>> {
    let random = (2usize..=6)
        .prop_flat_map(|n| proptest::collection::vec(0usize..3, n))
        .prop_map(|raw| {
            let mut seen: Vec<usize> = Vec::new();
            raw.iter()
                .map(|h| match seen.iter().position(|s| s == h) {
                    Some(i) => i,
                    None => {
                        seen.push(*h);
                        seen.len() - 1
                    }
                })
                .collect()
        });
    prop_oneof![
        Just(vec![0, 0, 1, 1]),
        Just(vec![0, 0, 0, 1, 1, 1]),
        Just(vec![0, 1, 2]),
        random,
    ]
}

/// What one routing gave a rank: the combined rows, the rows received (source, token), the
/// rows all ranks sent across hosts (dispatch, combine), and whether the buffer routed in two
/// levels.
struct Routed {
    out: Vec<u8>,
    received: Vec<(usize, usize)>,
    crossed: (usize, usize),
    two_level: bool,
}

/// Dispatch and combine of `case` with `two_level`. The experts' output is each row scaled by
/// a factor that does not round evenly, so the order of the sum shows.
fn run_routing(comm: &Communicator, case: &Case, dtype: Dtype, two_level: TwoLevel) -> Routed {
    let me = comm.rank();
    let k = case.topk;
    let max_tokens = case
        .inputs
        .iter()
        .map(|i| i.idx.len() / k)
        .max()
        .unwrap_or(0);
    let mut cfg = MoeConfig::new(case.experts, case.hidden, k, max_tokens.max(1), dtype);
    cfg.placement = Some(case.placement.clone());
    cfg.two_level = two_level;
    let mut buf = MoeBuffer::new(comm, cfg).unwrap();
    let mine = &case.inputs[me];
    let x: Vec<f32> = mine
        .x
        .iter()
        .enumerate()
        .map(|(i, v)| v * 1.37 + i as f32 * 0.011)
        .collect();
    let x = encode(dtype, &x);
    let view = buf.dispatch(&x, &mine.idx, &mine.w).unwrap();
    let rows = view.rows().unwrap();
    let got: Vec<(usize, usize)> = rows.iter().map(|r| (r.src_rank, r.src_token)).collect();
    let scale = 1.0 + 0.0371 * (me as f32 + 1.0);
    let mut reduced = Vec::new();
    for row in &rows {
        let v: Vec<f32> = decode(dtype, row.data)
            .iter()
            .map(|v| v * scale + 0.3)
            .collect();
        reduced.extend(encode(dtype, &v));
    }
    drop(rows);
    let _ = view;
    // Per host, the tokens sent there: the layout's count, and what two-level relays.
    let per_host = buf.layout().tokens_per_host.clone();
    let mut out = vec![0u8; x.len()];
    buf.combine(&reduced, &mut out).unwrap();
    let crossed = buf.rows_across_hosts();
    let hosts = comm.hosts();
    let away: usize = (0..hosts.count())
        .filter(|&h| h != hosts.host_of(me))
        .map(|h| per_host[h])
        .sum();
    let coll = xccl::coll::Coll::new(comm).unwrap();
    let mut sums = [crossed.0 as u64, crossed.1 as u64];
    coll.allreduce(&mut sums, xccl::coll::ReduceOp::Sum)
        .unwrap();
    if buf.two_level() {
        // Out: one row per (token, other host); back: one per token relayed, as many.
        assert_eq!(crossed.0, away, "rank {me}: one row per (token, host)");
        assert_eq!(sums[0], sums[1], "rows relayed and rows returned");
    }
    let crossed = (sums[0] as usize, sums[1] as usize);
    let two = buf.two_level();
    buf.close().unwrap();
    Routed {
        out,
        received: got,
        crossed,
        two_level: two,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Two-level routing on random host layouts (2×2, 2×3 and 3×1 among them): the experts
    /// get the same rows, combine gives the same bits as the flat routing (bf16 and f32,
    /// values whose sums round), and no more rows cross hosts; the automatic choice takes it
    /// wherever a host holds several ranks.
    #[test]
    fn two_level_routing_equals_flat_bitwise(
        hosts in host_table(),
        seed in any::<u64>(),
        bf16 in any::<bool>(),
    ) {
        let case = Arc::new(seeded_case(hosts.len(), seed));
        let dtype = if bf16 { Dtype::Bf16 } else { Dtype::F32 };
        let shared = (0..hosts.len()).any(|r| hosts.iter().filter(|&&h| h == hosts[r]).count() > 1);
        let several = hosts.iter().any(|&h| h > 0);
        run_on_hosts(&hosts, move |comm| {
            let flat = run_routing(comm, &case, dtype, TwoLevel::Off);
            let two = run_routing(comm, &case, dtype, TwoLevel::On);
            let auto = run_routing(comm, &case, dtype, TwoLevel::Auto);
            assert!(!flat.two_level);
            assert_eq!(two.two_level, several);
            assert_eq!(auto.two_level, several && shared, "the automatic choice");
            assert_eq!(flat.received, two.received, "rank {}: rows received", comm.rank());
            assert_eq!(flat.out, two.out, "rank {}: combine differs from the flat one", comm.rank());
            assert!(two.crossed.0 <= flat.crossed.0 && two.crossed.1 <= flat.crossed.1);
        });
    }
}
