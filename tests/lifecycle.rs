//! Lifecycle: every object gives back what it takes (1,000 create/drop cycles of each kind on
//! one communicator), buffers agree on their configuration, call counters cross the old
//! 32-bit limit, communicators are built again from the same environment (one after another
//! and two at a time) and split or duplicated while the parent is in use. Counts of
//! descriptors, threads, mappings and signal words must come back to where they started.

mod common;

use common::{assert_no_leaks, rank_comm, run_comms, run_split_comms, Fabric, Job, SERIAL};
use std::time::Duration;
use xccl::coll::{Coll, Exchange};
use xccl::moe::{Dtype, LowLatencyBuffer, MoeBuffer, MoeConfig};
use xccl::p2p::{P2p, P2pConfig};
use xccl::{Communicator, Error};

scenarios! {
    "rebuild" => rebuild_from_env,
    "rebuild_loopback" => rebuild_loopback,
    "cycles_loopback" => || cycles_in(Fabric::Loopback),
    "cycles_shm" => || cycles_in(Fabric::Shm),
    "cycles_tcp" => || cycles_in(Fabric::Tcp),
}

const FABRICS: [Fabric; 3] = [Fabric::Loopback, Fabric::Shm, Fabric::Tcp];
const HIDDEN: usize = 8;
const CYCLES: usize = 1000;
/// Rings of a few pages: the cycles measure what objects hold, not how fast pages clear.
const SMALL_RINGS: P2pConfig = P2pConfig {
    slots: 2,
    slot_bytes: 4096,
};

/// What this process holds: open descriptors, threads, memory mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    fds: usize,
    threads: usize,
    maps: usize,
}

/// What the process holds once threads that have been joined are gone from `/proc` too (the
/// kernel lists an exiting thread a little after `join` returns): polls until `done` holds
/// for the counts or two seconds pass, and returns the last counts.
fn held_when(done: impl Fn(&Held) -> bool) -> Held {
    let until = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = held();
        if done(&now) || std::time::Instant::now() >= until {
            return now;
        }
        std::thread::yield_now();
    }
}

/// What the process holds once nothing changes for 300 ms (threads of the setup before,
/// which end and are joined in the background, are gone): at most five seconds.
fn held_steady() -> Held {
    let give_up = std::time::Instant::now() + Duration::from_secs(5);
    let (mut last, mut since) = (held(), std::time::Instant::now());
    while since.elapsed() < Duration::from_millis(300) && std::time::Instant::now() < give_up {
        std::thread::yield_now();
        let now = held();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
    }
    last
}

fn held_like(want: Held) -> Held {
    held_when(|h| *h == want)
}

fn held() -> Held {
    let count = |dir: &str| std::fs::read_dir(dir).expect(dir).count();
    Held {
        fds: count("/proc/self/fd"),
        threads: count("/proc/self/task"),
        maps: std::fs::read_to_string("/proc/self/maps")
            .expect("maps")
            .lines()
            .count(),
    }
}

/// Two experts per rank, top-2, `HIDDEN` f32 (or another 4-byte dtype's worth) per row.
fn config(world: usize, dtype: Dtype) -> MoeConfig {
    MoeConfig::new(2 * world, HIDDEN, 2, 2, dtype)
}

/// Token rows of this rank for call `call`: small integers, exact in f32.
fn rows(me: usize, call: u64) -> Vec<f32> {
    (0..2 * HIDDEN)
        .map(|i| (me * 100 + i + (call % 7) as usize) as f32)
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Token 0 goes to an expert on this rank and one on the next; token 1 to the next rank
/// and the one after.
fn routing(me: usize, n: usize) -> Vec<i64> {
    let e = |r: usize, j: usize| (2 * (r % n) + j) as i64;
    vec![e(me, 0), e(me + 1, 0), e(me + 1, 1), e(me + 2, 1)]
}

/// One normal-mode call whose experts return their input: each token comes back once per
/// rank it went to, summed in f32, exactly.
fn normal_call(buf: &mut MoeBuffer, call: u64) {
    let (me, n) = (buf.comm().rank(), buf.comm().world_size());
    let idx = routing(me, n);
    let x = rows(me, call);
    let xb = bytes(&x);
    let reduced = {
        let view = buf.dispatch(&xb, &idx, &[1.0; 4]).expect("dispatch");
        view.rows()
            .expect("rows")
            .iter()
            .flat_map(|r| r.data.to_vec())
            .collect::<Vec<u8>>()
    };
    let mut out = vec![0u8; xb.len()];
    buf.combine(&reduced, &mut out).expect("combine");
    let got = floats(&out);
    for tok in 0..2 {
        let ranks: std::collections::BTreeSet<usize> = idx[2 * tok..2 * tok + 2]
            .iter()
            .map(|&e| e as usize / 2)
            .collect();
        for h in 0..HIDDEN {
            let want = x[tok * HIDDEN + h] * ranks.len() as f32;
            assert_eq!(got[tok * HIDDEN + h], want, "call {call} token {tok}");
        }
    }
}

/// One low-latency call whose experts return their input: each token comes back once per
/// expert, weighted 1.0, exactly (the experts of a rank sum theirs).
fn low_latency_call(buf: &mut LowLatencyBuffer, call: u64) {
    let (me, n) = (buf.comm().rank(), buf.comm().world_size());
    let idx = routing(me, n);
    let x = rows(me, call);
    let xb = bytes(&x);
    let outputs = {
        let view = buf.dispatch(&xb, &idx, &[1.0; 4]).expect("dispatch");
        common::low_latency::weighted_sums(&view, |_, v| v)
    };
    let mut out = vec![0u8; xb.len()];
    buf.combine(&outputs, &mut out).expect("combine");
    let got = floats(&out);
    for (i, (g, x)) in got.iter().zip(&x).enumerate() {
        assert_eq!(*g, 2.0 * x, "call {call} element {i}");
    }
}

/// One all-to-all-v call, every block checked.
fn exchange_call(ex: &mut Exchange, comm: &Communicator, call: u64) {
    let (me, n) = (comm.rank(), comm.world_size());
    let block = |s: usize, d: usize| vec![(s * 16 + d + call as usize) as u8; 8 + d];
    let send: Vec<u8> = (0..n).flat_map(|d| block(me, d)).collect();
    let counts: Vec<usize> = (0..n).map(|d| 8 + d).collect();
    let displs: Vec<usize> = (0..n).map(|d| (0..d).map(|j| 8 + j).sum()).collect();
    let view = ex.alltoallv(&send, &counts, &displs).expect("alltoallv");
    for s in 0..n {
        assert_eq!(view.block(s), &block(s, me)[..], "call {call} from {s}");
    }
}

/// One message round on the point-to-point rings.
fn p2p_call(p2p: &P2p, call: u64) {
    let (me, n) = (p2p.comm().rank(), p2p.comm().world_size());
    let msg = vec![me as u8 ^ call as u8; 100];
    let mut got = vec![0u8; 100];
    p2p.sendrecv((me + 1) % n, call, &msg, (me + n - 1) % n, call, &mut got)
        .expect("send and receive");
    assert_eq!(got, vec![((me + n - 1) % n) as u8 ^ call as u8; 100]);
}

/// Creates, uses once and drops each kind of object `CYCLES` times; descriptors, threads,
/// mappings and signal words end where they started.
fn cycles(comm: &Communicator) {
    let n = comm.world_size();
    let kinds = ["moe", "low-latency", "p2p", "coll", "exchange"];
    let one = |kind: &str, i: u64| match kind {
        "moe" => normal_call(&mut MoeBuffer::new(comm, config(n, Dtype::F32)).unwrap(), i),
        "low-latency" => low_latency_call(
            &mut LowLatencyBuffer::new(comm, config(n, Dtype::F32)).unwrap(),
            i,
        ),
        "p2p" => p2p_call(&P2p::new(comm, SMALL_RINGS).unwrap(), i),
        "coll" => Coll::with_config(comm, SMALL_RINGS)
            .unwrap()
            .barrier()
            .expect("barrier"),
        _ => exchange_call(&mut Exchange::new(comm, 64).unwrap(), comm, i),
    };
    // The first of each kind sets up what lives as long as the communicator (its control
    // window); what setting up the fabric started may still be ending. Counting starts at a
    // steady state: a round of every kind that leaves the counts as they were.
    let reader = comm.rank() == 0;
    // (Steady: unchanged over rounds spanning half a second; tcp's setup threads and
    // sockets end a little after the transports are handed over.)
    let mut start = held();
    let mut since = std::time::Instant::now();
    let give_up = since + Duration::from_secs(20);
    loop {
        for kind in kinds {
            one(kind, 0);
        }
        // The ranks are threads of one process: rank 0 reads for all, while all are between
        // rounds (a rank reading too would count the other's open `/proc` directory).
        comm.barrier().unwrap();
        let now = if reader { held() } else { start };
        comm.barrier().unwrap();
        if now != start {
            (start, since) = (now, std::time::Instant::now());
        }
        let steady = since.elapsed() >= Duration::from_millis(500);
        if all_ranks(comm, steady || std::time::Instant::now() >= give_up) {
            break;
        }
    }
    let words = comm.signals_in_use();
    assert_eq!(words, 0, "signal words in use with no object alive");
    for kind in kinds {
        for i in 1..=CYCLES as u64 {
            one(kind, i);
        }
        assert_eq!(
            comm.signals_in_use(),
            0,
            "{kind}: signal words after {CYCLES} cycles"
        );
    }
    comm.barrier().unwrap();
    if reader {
        let end = held_like(start);
        println!(
            "{} cycles of each of {kinds:?}: {start:?} -> {end:?}, signal words 0 -> {}",
            CYCLES,
            comm.signals_in_use()
        );
        assert_eq!(start, end, "process resources after the cycles");
    }
    comm.barrier().unwrap();
}

/// Whether `mine` holds on every rank (the ranks decide together).
fn all_ranks(comm: &Communicator, mine: bool) -> bool {
    let n = comm.world_size();
    let mut ex = Exchange::new(comm, 1).unwrap();
    let send = vec![mine as u8; n];
    let view = ex
        .alltoallv(&send, &vec![1; n], &(0..n).collect::<Vec<_>>())
        .unwrap();
    (0..n).all(|r| view.block(r) == [1])
}

/// Counts of what the process holds mean something only while no other test of this binary
/// runs: every test here takes the lock.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The cycles run in a rank process of their own (as one rank of a [`Job`]), where nothing
/// else of the test binary comes and goes while the counts are taken.
fn cycles_alone(fabric: &str) {
    rebuild_job(1, &format!("cycles_{fabric}"), "loopback", &[]);
}

fn cycles_in(fabric: Fabric) {
    run_comms(fabric, 2, cycles);
    println!("DONE");
}

#[test]
fn every_object_gives_back_what_it_takes_loopback() {
    cycles_alone("loopback");
}

#[test]
fn every_object_gives_back_what_it_takes_shm() {
    cycles_alone("shm");
}

#[test]
fn every_object_gives_back_what_it_takes_tcp() {
    cycles_alone("tcp");
}

fn mismatch<T>(what: &str, r: xccl::Result<T>) {
    match r {
        Err(Error::ConfigMismatch(m)) => eprintln!("{what}: {m}"),
        Err(e) => panic!("{what}: expected ConfigMismatch, got {e}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[test]
fn buffers_agree_on_their_configuration() {
    let _g = alone();
    for fabric in FABRICS {
        run_comms(fabric, 2, |comm| {
            let n = comm.world_size();
            // Same row size, another dtype on rank 1: the windows alone would not tell.
            let dtype = if comm.rank() == 1 {
                Dtype::F16
            } else {
                Dtype::Bf16
            };
            mismatch("normal mode", MoeBuffer::new(comm, config(n, dtype)));
            mismatch("low-latency", LowLatencyBuffer::new(comm, config(n, dtype)));
            let mut experts = config(n, Dtype::F32);
            experts.topk = 1 + comm.rank();
            mismatch("low-latency top-k", LowLatencyBuffer::new(comm, experts));
            mismatch("exchange", Exchange::new(comm, 64 + comm.rank() * 4096));
            assert_eq!(comm.signals_in_use(), 0, "a refused buffer keeps no words");
            normal_call(&mut MoeBuffer::new(comm, config(n, Dtype::F32)).unwrap(), 1);
            low_latency_call(
                &mut LowLatencyBuffer::new(comm, config(n, Dtype::F32)).unwrap(),
                1,
            );
        });
    }
}

/// Below 2^32: the old `call << 32 | count` signal values ran out here.
const NEAR_WRAP: u64 = (1 << 32) - 50;

#[test]
fn counters_cross_the_old_32_bit_limit() {
    let _g = alone();
    for fabric in FABRICS {
        run_comms(fabric, 2, |comm| {
            let n = comm.world_size();
            let mut buf = MoeBuffer::new(comm, config(n, Dtype::F32)).unwrap();
            buf.skip_calls(NEAR_WRAP);
            let mut ll = LowLatencyBuffer::new(comm, config(n, Dtype::F32)).unwrap();
            ll.skip_calls(NEAR_WRAP);
            let mut ex = Exchange::new(comm, 64).unwrap();
            ex.skip_calls(NEAR_WRAP);
            for call in NEAR_WRAP..NEAR_WRAP + 100 {
                normal_call(&mut buf, call);
                low_latency_call(&mut ll, call);
                exchange_call(&mut ex, comm, call);
            }
        });
    }
}

#[test]
fn split_and_dup_work_while_the_parent_is_in_use() {
    let _g = alone();
    for fabric in FABRICS {
        run_split_comms(fabric, 2, |child| {
            let n = child.world_size();
            let twin = child.dup().expect("dup");
            assert_eq!((twin.rank(), twin.world_size()), (child.rank(), n));
            let mut a = MoeBuffer::new(child, config(n, Dtype::F32)).unwrap();
            let mut b = LowLatencyBuffer::new(&twin, config(n, Dtype::F32)).unwrap();
            for call in 0..20 {
                normal_call(&mut a, call);
                low_latency_call(&mut b, call);
            }
            drop((a, b));
            twin.close().expect("closing the duplicate");
        });
    }
}

#[test]
fn split_orders_by_key_and_leaves_out_ranks_without_colour() {
    let _g = alone();
    run_comms(Fabric::Loopback, 4, |comm| {
        let me = comm.rank();
        // Rank 3 joins nothing; the others form one group in reverse order.
        let colour = (me != 3).then_some(7);
        let child = comm.split(colour, -(me as i64)).unwrap();
        match child {
            None => assert_eq!(me, 3),
            Some(c) => {
                assert_eq!((c.rank(), c.world_size()), (2 - me, 3));
                exchange_call(&mut Exchange::new(&c, 64).unwrap(), &c, 5);
            }
        }
        // The parent goes on as before.
        exchange_call(&mut Exchange::new(comm, 64).unwrap(), comm, 6);
    });
}

/// Builds communicators from the environment again and again: 100 one after another, then
/// 100 two at a time (named, from two threads); each does a barrier and an all-to-all-v.
/// The counts are taken while every rank waits at a barrier of a communicator kept for the
/// purpose (rank 0 may serve the store: its counts include the other ranks' clients).
fn rebuild_from_env() {
    let timeout = Duration::from_secs(60);
    let work = |comm: &Communicator, call: u64| {
        comm.barrier().unwrap();
        exchange_call(&mut Exchange::new(comm, 64).unwrap(), comm, call);
    };
    let build = |name: String| {
        Communicator::builder()
            .name(&name)
            .timeout(timeout)
            .build()
            .unwrap()
    };
    let sync = build("sync".into());
    // The first build sets up what lives as long as the process (the logger, buffers of
    // the standard library, rank 0's store server).
    work(&rank_comm(timeout), 0);
    sync.barrier().unwrap();
    let start = held_steady();
    sync.barrier().unwrap();
    for i in 1..=100 {
        let comm = rank_comm(timeout);
        work(&comm, i);
        comm.close().unwrap();
    }
    sync.barrier().unwrap();
    let sequential = held_like(start);
    sync.barrier().unwrap();
    // Two threads build communicators side by side, each named so that every rank pairs
    // them the same way; the counts are taken while both threads exist, before and after.
    let gate = std::sync::Barrier::new(3);
    let (mut before, mut after) = (start, start);
    std::thread::scope(|s| {
        for side in ["a", "b"] {
            let (gate, build) = (&gate, &build);
            s.spawn(move || {
                let warm = build(format!("warm-{side}"));
                work(&warm, 0);
                warm.close().unwrap();
                gate.wait();
                gate.wait();
                for i in 1..=50 {
                    let comm = build(format!("pair-{i}-{side}"));
                    work(&comm, i);
                    comm.close().unwrap();
                }
                gate.wait();
                gate.wait();
            });
        }
        gate.wait();
        sync.barrier().unwrap();
        before = held_steady();
        sync.barrier().unwrap();
        gate.wait();
        gate.wait();
        sync.barrier().unwrap();
        after = held_like(before);
        sync.barrier().unwrap();
        gate.wait();
    });
    sync.close().unwrap();
    println!(
        "REBUILT one after another {start:?} -> {sequential:?}; two at a time {before:?} -> \
         {after:?}"
    );
    assert_eq!(
        start, sequential,
        "after 100 communicators one after another"
    );
    assert_eq!(before, after, "after 100 communicators two at a time");
    println!("DONE");
}

/// A single-rank loopback communicator built 100 times from the environment.
fn rebuild_loopback() {
    let build = || {
        Communicator::builder()
            .backend(xccl::Backend::Loopback)
            .build()
            .unwrap()
    };
    drop(build());
    let start = held();
    for i in 0..100 {
        let comm = build();
        exchange_call(&mut Exchange::new(&comm, 64).unwrap(), &comm, i);
        comm.close().unwrap();
    }
    let end = held_like(start);
    println!("REBUILT {start:?} -> {end:?}");
    assert_eq!(start, end);
    println!("DONE");
}

/// Glibc keeps the stacks of ended threads and an arena per thread for reuse: turned off in
/// the ranks, so that the mapping counts show what xccl itself holds.
const NO_ALLOCATOR_CACHES: &str = "glibc.pthread.stack_cache_size=0:glibc.malloc.arena_max=1";

fn rebuild(backend: &str, extra: &[(&str, String)]) {
    rebuild_job(3, "rebuild", backend, extra);
}

fn rebuild_job(ranks: usize, scenario: &str, backend: &str, extra: &[(&str, String)]) {
    let _g = alone();
    let mut env = vec![
        ("XCCL_BACKEND", backend.to_string()),
        ("GLIBC_TUNABLES", NO_ALLOCATOR_CACHES.to_string()),
    ];
    env.extend(extra.iter().cloned());
    let mut job = Job::start(ranks, scenario, &env);
    let all: Vec<usize> = (0..ranks).collect();
    job.expect_from(&all, "DONE", Duration::from_secs(200));
    let st = job.wait_all(Duration::from_secs(60));
    assert!(st.iter().all(|s| s.success()), "{backend}: {st:?}");
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

#[test]
fn communicators_are_built_again_from_the_environment_shm() {
    rebuild("shm", &[]);
}

#[test]
fn communicators_are_built_again_from_the_environment_tcp() {
    rebuild("tcp", &[]);
}

/// As torchrun sets up: rank 0 serves the store at `MASTER_ADDR:MASTER_PORT`, shared by the
/// communicators it builds at the same time.
#[test]
fn communicators_are_built_again_through_a_store_rank_0_serves() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    rebuild(
        "tcp",
        &[
            ("XCCL_STORE", String::new()),
            ("XCCL_STORE_SERVER", String::new()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ],
    );
}

#[test]
fn a_single_rank_loopback_communicator_is_built_again() {
    rebuild_job(1, "rebuild_loopback", "loopback", &[]);
}
