//! The TCP backend across real processes: a rank killed mid-transfer (also on the hybrid
//! backend, across emulated hosts), hostile clients on a live job's listener, and ranks in
//! separate network namespaces whose link is cut.

#[macro_use]
mod common;

use common::{assert_no_leaks, Job, SERIAL};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use xccl::bootstrap::{store_barrier, Store, TcpStore};
use xccl::transport::{Cmp, SignalOp};
use xccl::{Communicator, Error};

scenarios! {
    "stream_until_killed" => stream_until_killed,
    "round_trips_for_3s" => round_trips_for_3s,
    "netns" => netns_worker,
}

/// Every rank streams 1 MiB puts around a ring until a peer dies, then reports it.
fn stream_until_killed() {
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (me, n) = (comm.rank(), comm.world_size());
    let t = comm.transport();
    let win = comm.register(1 << 20).unwrap();
    let data = vec![me as u8; 1 << 20];
    comm.barrier().unwrap();
    println!("READY");
    let mut i = 0u64;
    let r = loop {
        i += 1;
        if let Err(e) = t.put_signal((me + 1) % n, &win, 0, &data, 0, SignalOp::Add, 1) {
            break e;
        }
        if let Err(e) = t.wait(0, Cmp::Ge, i, comm.deadline()) {
            break e;
        }
    };
    match r {
        Error::PeerFailed { rank } => {
            // A get from the dead rank fails the same way (not as a bad argument).
            let mut back = [0u8; 8];
            match t.get(rank, &win, 0, &mut back) {
                Err(Error::PeerFailed { rank: r }) if r == rank => {}
                other => panic!("get from dead rank {rank}: {other:?}"),
            }
            println!("PEERFAILED {rank}");
            // Survivors leave together: one that closed its node early would make the other's
            // next put fail for that reason before it noticed the killed rank.
            let addr = std::env::var("XCCL_STORE").unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let secret = std::env::var("XCCL_JOB_SECRET").unwrap();
            let store = TcpStore::connect(
                addr.trim_start_matches("tcp://"),
                Some(secret.as_bytes()),
                deadline,
            )
            .unwrap();
            store_barrier(&store, "survivors", n - 1, deadline).unwrap();
        }
        other => panic!("expected PeerFailed, got {other}"),
    }
}

/// Ranks 0 and 1 ping-pong checked 8-byte values for 3 s of work, then stop together.
fn round_trips_for_3s() {
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let me = comm.rank();
    let t = comm.transport();
    let win = comm.register(64).unwrap();
    comm.barrier().unwrap();
    println!("READY");
    let start = Instant::now();
    let mut i = 0u64;
    loop {
        i += 1;
        if me == 0 {
            let stop = start.elapsed() > Duration::from_secs(3);
            let v = if stop { u64::MAX } else { i };
            t.put_signal(1, &win, 0, &v.to_le_bytes(), 0, SignalOp::Add, 1)
                .unwrap();
            t.wait(0, Cmp::Ge, i, comm.deadline()).unwrap();
            let mut b = [0u8; 8];
            t.read_local(&win, 0, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), v ^ 0x5A5A, "round trip {i}");
            if stop {
                break;
            }
        } else {
            t.wait(0, Cmp::Ge, i, comm.deadline()).unwrap();
            let mut b = [0u8; 8];
            t.read_local(&win, 0, &mut b).unwrap();
            let v = u64::from_le_bytes(b);
            t.put_signal(0, &win, 0, &(v ^ 0x5A5A).to_le_bytes(), 0, SignalOp::Add, 1)
                .unwrap();
            if v == u64::MAX {
                break;
            }
        }
    }
    comm.barrier().unwrap();
    println!("DONE {i}");
}

/// In its own network namespace: checks put/get/signal with the peer, then waits until the
/// link is cut and reports the failure.
fn netns_worker() {
    let comm = Communicator::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (me, n) = (comm.rank(), comm.world_size());
    let t = comm.transport();
    let win = comm.register(4096).unwrap();
    let peer = 1 - me;
    t.put_signal(peer, &win, 0, &[me as u8 + 1; 100], 0, SignalOp::Add, 1)
        .unwrap();
    t.wait(0, Cmp::Ge, 1, comm.deadline()).unwrap();
    let mut got = [0u8; 100];
    t.read_local(&win, 0, &mut got).unwrap();
    assert_eq!(got, [peer as u8 + 1; 100]);
    let mut remote = [0u8; 100];
    t.get(peer, &win, 0, &mut remote).unwrap();
    assert_eq!(remote, [me as u8 + 1; 100]);
    comm.barrier().unwrap();
    assert_eq!(n, 2);
    println!("READY");
    match t.wait(1, Cmp::Ge, 1, Instant::now() + Duration::from_secs(30)) {
        Err(Error::PeerFailed { rank }) => println!("PEERFAILED {rank}"),
        other => panic!("expected PeerFailed, got {other:?}"),
    }
}

fn tcp_env() -> Vec<(&'static str, String)> {
    vec![
        ("XCCL_BACKEND", "tcp".into()),
        ("XCCL_TCP_PEER_TIMEOUT_MS", "2000".into()),
    ]
}

#[test]
fn sigkill_mid_transfer_fails_the_others() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(3, "stream_until_killed", &tcp_env());
    job.expect_from(&[0, 1, 2], "READY", Duration::from_secs(60));
    let at = Instant::now();
    job.kill(1);
    job.expect_from(&[0, 2], "PEERFAILED 1", Duration::from_secs(5));
    eprintln!("survivors saw PeerFailed {:?} after SIGKILL", at.elapsed());
    let st = job.wait_all(Duration::from_secs(30));
    assert!(st[0].success() && st[2].success(), "{st:?}");
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

/// Four ranks on two emulated hosts (hybrid backend): the last rank is killed mid-transfer;
/// the survivors on the other host (links over TCP) and on its own (shared memory) all see
/// `PeerFailed` within 5 s, and nothing of the job is left.
#[test]
fn sigkill_on_one_host_fails_every_survivor() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start_each(
        4,
        "stream_until_killed",
        &|r| {
            vec![
                ("XCCL_HOST_ID".into(), format!("kill-host{}", r / 2)),
                ("XCCL_BACKEND".into(), "hybrid".into()),
                ("XCCL_TCP_PEER_TIMEOUT_MS".into(), "2000".into()),
            ]
        },
        Some(xccl::bootstrap::random_job_id()),
    );
    job.expect_from(&[0, 1, 2, 3], "READY", Duration::from_secs(60));
    let at = Instant::now();
    job.kill(3);
    job.expect_from(&[0, 1, 2], "PEERFAILED 3", Duration::from_secs(5));
    eprintln!("survivors saw PeerFailed {:?} after SIGKILL", at.elapsed());
    let st = job.wait_all(Duration::from_secs(30));
    assert!(st[..3].iter().all(|s| s.success()), "{st:?}");
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

/// Waits up to `limit` for the server to close `s` (read gives EOF or an error).
fn closed_by_server(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {} // a challenge, or a refusal byte: keep reading until closed
        }
    }
}

#[test]
fn hostile_clients_are_refused_while_the_job_completes() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(2, "round_trips_for_3s", &tcp_env());
    job.expect_from(&[0, 1], "READY", Duration::from_secs(60));
    let store = job.store();
    let addr = String::from_utf8(
        store
            .get(
                "xccl/g-0/tcp/addr/0",
                Instant::now() + Duration::from_secs(10),
            )
            .unwrap(),
    )
    .unwrap();
    // Garbage.
    let mut garbage = TcpStream::connect(&addr).unwrap();
    garbage.write_all(&[0xAB; 64]).unwrap();
    // A frame header announcing u64::MAX bytes, before any authentication.
    let mut huge = TcpStream::connect(&addr).unwrap();
    let mut h = [0u8; 48];
    h[0..4].copy_from_slice(&0x5843_5450u32.to_le_bytes());
    h[4] = 1;
    h[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    huge.write_all(&h).unwrap();
    // A well-formed hello from "rank 1", then a proof made without the secret.
    let mut liar = TcpStream::connect(&addr).unwrap();
    let mut hello = Vec::new();
    for w in [0x5843_5448u32, 1, 1, 2] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    hello.extend_from_slice(&[7u8; 16]);
    liar.write_all(&hello).unwrap();
    let mut challenge = [0u8; 52];
    liar.read_exact(&mut challenge).unwrap();
    liar.write_all(&[0u8; 32]).unwrap();
    // A client that connects and says nothing.
    let mut mute = TcpStream::connect(&addr).unwrap();
    for (name, s) in [
        ("garbage", &mut garbage),
        ("u64::MAX frame", &mut huge),
        ("wrong secret", &mut liar),
        ("silent", &mut mute),
    ] {
        assert!(
            closed_by_server(s, Duration::from_secs(10)),
            "{name} client was not dropped"
        );
    }
    let st = job.wait_all(Duration::from_secs(60));
    assert!(st.iter().all(|s| s.success()), "the job failed: {st:?}");
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

/// The job secret never reaches the store: with a launcher's secret the store serves no
/// stranger at all; without one (ranks on one host) rank 0 hands it over outside the store,
/// which then holds only where it is. Either way the job completes.
#[test]
fn the_job_secret_never_reaches_the_store() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let soon = || Instant::now() + Duration::from_millis(300);
    for secret in [Some(xccl::bootstrap::random_job_id()), None] {
        let launcher_secret = secret.is_some();
        let mut job = Job::start_with(2, "round_trips_for_3s", &tcp_env(), secret);
        job.expect_from(&[0, 1], "READY", Duration::from_secs(60));
        let stranger = TcpStore::connect(&job.store_addr(), None, soon());
        if launcher_secret {
            assert!(
                stranger.is_err(),
                "a stranger was served by a secured store"
            );
        } else {
            let stranger = stranger.expect("an open store");
            assert!(stranger.get("xccl/g-0/tcp/secret", soon()).is_err());
            let at = stranger.get("xccl/g-0/tcp/secret-at", soon()).unwrap();
            let at = String::from_utf8(at).unwrap();
            assert!(
                at.split('/').all(|p| p.parse::<u32>().is_ok()),
                "the store holds {at:?}, not where the secret is"
            );
        }
        assert!(job.store().get("xccl/g-0/tcp/secret", soon()).is_err());
        let st = job.wait_all(Duration::from_secs(60));
        assert!(
            st.iter().all(|s| s.success()),
            "secret {launcher_secret}: {st:?}"
        );
        let mark = job.mark.clone();
        drop(job);
        assert_no_leaks(&mark);
    }
}

#[test]
fn cut_link_between_namespaces_fails_both_sides() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let id = std::process::id() % 100_000;
    let Some(pair) = common::netns::veth_pair_or_skip(id) else {
        return;
    };
    let [a, b] = &pair.sides;
    let dir = std::env::temp_dir().join(format!("xccl-netns-store-{id}"));
    let mark = format!("netns-{}", xccl::bootstrap::random_job_id());
    let devs = [a.dev.clone(), b.dev.clone()];
    let mut job = common::netns::NsJob::start(&[&a.ns, &b.ns], "netns", &mark, &dir, &|rank| {
        [
            ("XCCL_BACKEND", "tcp".to_string()),
            ("XCCL_SOCKET_IFNAME", devs[rank].clone()),
            ("XCCL_TCP_HEARTBEAT_MS", "200".into()),
            ("XCCL_TCP_PEER_TIMEOUT_MS", "1500".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    });
    job.wait_for("READY", Duration::from_secs(60));
    let cut = Instant::now();
    assert!(pair.cut(0));
    let (seen, _) = job.wait_for("PEERFAILED", Duration::from_secs(10));
    let took = seen - cut;
    eprintln!("both sides saw PeerFailed {took:?} after the link was cut (timeout 1.5 s)");
    assert!(took <= Duration::from_millis(1500 + 2000), "took {took:?}");
    assert!(job.all_succeed());
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    assert_no_leaks(&mark);
}
