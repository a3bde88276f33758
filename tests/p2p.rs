//! Point-to-point send/recv over loopback and shared memory: sizes from 0 bytes to many
//! chunks, tag ordering, vectored blocks, both directions at once, non-blocking requests,
//! and errors that leave the channel usable.

mod common;

use common::{run_comms, Fabric};
use xccl::p2p::{P2p, P2pConfig};
use xccl::Error;

/// Small slots, so a few KiB already span several chunks and wrap the ring.
const SMALL: P2pConfig = P2pConfig {
    slots: 2,
    slot_bytes: 4096,
};

fn bytes(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k.wrapping_mul(7) ^ seed.wrapping_mul(131)) as u8)
        .collect()
}

fn sizes_and_tags(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        let sizes = [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 5, 100_000];
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&l| vec![0xEE; l + 3]).collect();
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &l)| bytes(me * 100 + k, l))
            .collect();
        p2p.scope(|s| {
            // Receive the tags in the reverse order of sending: earlier messages wait in the
            // unexpected buffer.
            let mut recvs = Vec::new();
            for (k, b) in bufs.iter_mut().enumerate().rev() {
                recvs.push((k, s.irecv(prev, k as u64, b)?));
            }
            for (k, d) in data.iter().enumerate() {
                let _ = s.isend(next, k as u64, d)?;
            }
            for (k, r) in recvs {
                assert_eq!(r.wait(comm.deadline())?, sizes[k]);
            }
            Ok(())
        })
        .unwrap();
        for (k, b) in bufs.iter().enumerate() {
            assert!(
                b[..sizes[k]] == bytes(prev * 100 + k, sizes[k])[..],
                "tag {k} from {prev}"
            );
            assert!(
                b[sizes[k]..].iter().all(|&x| x == 0xEE),
                "bytes past message {k} were written"
            );
        }
        // Same tag twice: order is kept per (source, tag).
        for round in 0..3 {
            p2p.send(next, 5, &bytes(round, 9000)).unwrap();
        }
        for round in 0..3 {
            let mut b = vec![0u8; 9000];
            assert_eq!(p2p.recv(prev, 5, &mut b).unwrap(), 9000);
            assert_eq!(b, bytes(round, 9000), "message {round} from {prev}");
        }
        comm.barrier().unwrap();
    });
}

fn contents_arrive_intact(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        for len in [0usize, 1, 4097, 50_001] {
            for d in 0..n {
                p2p.send(d, len as u64, &bytes(me * 1000 + d, len))
                    .unwrap_or_else(|e| panic!("send {len} to {d}: {e}"));
            }
            for s in 0..n {
                let mut b = vec![0u8; len];
                assert_eq!(p2p.recv(s, len as u64, &mut b).unwrap(), len);
                assert!(b == bytes(s * 1000 + me, len), "{len} bytes from {s}");
            }
        }
        comm.barrier().unwrap();
    });
}

fn vectored_blocks(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        // Paged-KV-like: 5 pages of 3000 bytes sent as one message, received into 3 blocks
        // of other sizes.
        let pages: Vec<Vec<u8>> = (0..5).map(|p| bytes(me * 10 + p, 3000)).collect();
        let refs: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
        let expect: Vec<u8> = (0..5).flat_map(|p| bytes(prev * 10 + p, 3000)).collect();
        let (mut a, mut b, mut c) = (vec![0u8; 7000], vec![0u8; 1], vec![0u8; 7999]);
        p2p.scope(|s| {
            let r = s.irecvv(prev, 1, vec![&mut a, &mut b, &mut c])?;
            s.isendv(next, 1, &refs)?.wait(comm.deadline())?;
            assert_eq!(r.wait(comm.deadline())?, 15_000);
            Ok(())
        })
        .unwrap();
        let got: Vec<u8> = a.iter().chain(&b).chain(&c).copied().collect();
        assert_eq!(got, expect);
        comm.barrier().unwrap();
    });
}

fn both_directions_blocking(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let me = comm.rank();
        let peer = me ^ 1;
        if peer >= comm.world_size() {
            return;
        }
        // Each message is 64 slots long: both ranks block in send first, which only works
        // because a waiting sender keeps draining what its peer sends.
        let out = bytes(me, 64 * 4096 + 17);
        p2p.send(peer, 3, &out).unwrap();
        let mut inp = vec![0u8; out.len()];
        assert_eq!(p2p.recv(peer, 3, &mut inp).unwrap(), out.len());
        assert_eq!(inp, bytes(peer, out.len()));
    });
}

fn many_in_flight_with_test(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        let data: Vec<Vec<u8>> = (0..n).map(|d| bytes(me * 7 + d, 10_000 + d)).collect();
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; 10_000 + me]).collect();
        p2p.scope(|s| {
            let mut recvs: Vec<_> = bufs
                .iter_mut()
                .enumerate()
                .map(|(src, b)| s.irecv(src, 9, b).unwrap())
                .collect();
            let mut sends: Vec<_> = data
                .iter()
                .enumerate()
                .map(|(d, b)| s.isend(d, 9, b).unwrap())
                .collect();
            let deadline = comm.deadline();
            loop {
                let mut all = true;
                for q in &mut sends {
                    all &= q.test()?;
                }
                for r in &mut recvs {
                    all &= r.test()?.is_some();
                }
                if all {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "requests never completed"
                );
            }
            for r in recvs {
                assert_eq!(r.wait(deadline)?, 10_000 + me);
            }
            Ok(())
        })
        .unwrap();
        for (src, b) in bufs.iter().enumerate() {
            assert_eq!(*b, bytes(src * 7 + me, 10_000 + me), "from {src}");
        }
        comm.barrier().unwrap();
    });
}

fn short_buffer_is_an_error_and_channel_survives(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        p2p.send(next, 1, &bytes(1, 20_000)).unwrap();
        p2p.send(next, 2, &bytes(2, 300)).unwrap();
        let mut small = vec![0u8; 100];
        let r = p2p.recv(prev, 1, &mut small);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let mut ok = vec![0u8; 300];
        assert_eq!(p2p.recv(prev, 2, &mut ok).unwrap(), 300);
        assert_eq!(ok, bytes(2, 300));
        assert!(matches!(
            p2p.send(n, 0, &[1]),
            Err(Error::InvalidArgument(_))
        ));
        comm.barrier().unwrap();
    });
}

/// Small blocking messages (inline in a chunk header, and a few just too long for that) with
/// several tags, received in another tag order than sent, then a long ping-pong: order per
/// (source, tag) holds and nothing is lost whichever path each message takes.
fn small_messages_keep_order(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, SMALL).unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        let next = (me + 1) % n;
        let prev = (me + n - 1) % n;
        let msg = |from: usize, i: usize| bytes(from * 1000 + i, i % 20);
        for i in 0..60 {
            p2p.send(next, (i % 3) as u64, &msg(me, i)).unwrap();
        }
        for tag in [2usize, 0, 1] {
            for i in (0..60).filter(|i| i % 3 == tag) {
                let mut b = vec![0xEE; 24];
                let got = p2p.recv(prev, tag as u64, &mut b).unwrap();
                assert_eq!(
                    &b[..got],
                    &msg(prev, i)[..],
                    "tag {tag} message {i} from {prev}"
                );
                assert!(b[got..].iter().all(|&x| x == 0xEE));
            }
        }
        // Ping-pong between pairs (0,1), (2,3), ...: many times around each ring.
        if let Some(partner) = (me ^ 1 < n).then_some(me ^ 1) {
            let mut b = [0u8; 8];
            for i in 0u64..500 {
                if me % 2 == 0 {
                    p2p.send(partner, 7, &i.to_le_bytes()).unwrap();
                    assert_eq!(p2p.recv(partner, 7, &mut b).unwrap(), 8);
                } else {
                    assert_eq!(p2p.recv(partner, 7, &mut b).unwrap(), 8);
                    p2p.send(partner, 7, &b).unwrap();
                }
                assert_eq!(u64::from_le_bytes(b), i);
            }
        }
        comm.barrier().unwrap();
    });
}

/// Messages far larger than the caches (the streaming-store path into mapped rings), plain
/// and vectored with odd-sized, unaligned blocks, both directions at once: every byte
/// arrives, nothing past the message is written. Pairs of ranks, so world 1 only checks the
/// self send.
fn huge_messages_arrive_intact(fabric: Fabric, world: usize) {
    run_comms(fabric, world, |comm| {
        let p2p = P2p::new(comm, Default::default()).unwrap();
        let me = comm.rank();
        let peer = if me % 2 == 0 { me + 1 } else { me - 1 };
        let peer = if peer < comm.world_size() { peer } else { me };
        let len = (9 << 20) + 123;
        let data = bytes(me, len);
        let mut got = vec![0xEE; len + 5];
        p2p.scope(|s| {
            let r = s.irecv(peer, 3, &mut got)?;
            s.isend(peer, 3, &data)?.wait(comm.deadline())?;
            assert_eq!(r.wait(comm.deadline())?, len);
            Ok(())
        })
        .unwrap();
        assert!(
            got[..len] == bytes(peer, len)[..],
            "plain message from {peer}"
        );
        assert!(
            got[len..].iter().all(|&x| x == 0xEE),
            "bytes past the message"
        );
        // Blocks of odd sizes at odd offsets, received into blocks cut elsewhere.
        let cuts = [1usize, 3 << 20, (5 << 20) + 7, len];
        let blocks: Vec<&[u8]> = cuts.windows(2).map(|w| &data[w[0]..w[1]]).collect();
        let mut a = vec![0u8; (2 << 20) + 11];
        let mut b = vec![0u8; len - 1 - a.len()];
        p2p.scope(|s| {
            let r = s.irecvv(peer, 4, vec![&mut a, &mut b])?;
            s.isendv(peer, 4, &blocks)?.wait(comm.deadline())?;
            assert_eq!(r.wait(comm.deadline())?, len - 1);
            Ok(())
        })
        .unwrap();
        let joined: Vec<u8> = a.iter().chain(&b).copied().collect();
        assert!(
            joined == bytes(peer, len)[1..],
            "vectored message from {peer}"
        );
        comm.barrier().unwrap();
    });
}

macro_rules! per_fabric {
    ($($name:ident),*) => {
        mod loopback { use super::*; $(
            #[test] fn $name() { for w in [1, 2, 3, 8] { super::$name(Fabric::Loopback, w) } }
        )* }
        mod shm { use super::*; $(
            #[test] fn $name() { for w in [1, 2, 3, 8] { super::$name(Fabric::Shm, w) } }
        )* }
        mod tcp { use super::*; $(
            #[test] fn $name() { for w in [1, 2, 3, 8] { super::$name(Fabric::Tcp, w) } }
        )* }
        mod mixed { use super::*; $(
            #[test] fn $name() { for w in [2, 3, 5] { super::$name(Fabric::Mixed, w) } }
        )* }
    };
}

per_fabric!(
    sizes_and_tags,
    contents_arrive_intact,
    vectored_blocks,
    both_directions_blocking,
    many_in_flight_with_test,
    short_buffer_is_an_error_and_channel_survives,
    small_messages_keep_order,
    huge_messages_arrive_intact
);
