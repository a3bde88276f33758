//! Collectives over loopback and shared memory at world sizes 1, 2, 3, 7 and 8: all-to-all,
//! all-to-all-v (zero blocks, self-only traffic, disagreeing counts, blocks above 2^31
//! bytes), allgather, all-reduce, and a property test that random all-to-all-v exchanges
//! deliver every byte exactly once.

mod common;

use common::{run_comms, Fabric};
use proptest::prelude::*;
use xccl::coll::{Coll, ReduceOp};
use xccl::p2p::P2pConfig;
use xccl::Error;

const WORLDS: [usize; 5] = [1, 2, 3, 7, 8];

/// The byte that block (src → dst) carries at position k.
fn cell(src: usize, dst: usize, k: usize) -> u8 {
    (src.wrapping_mul(37) ^ dst.wrapping_mul(101) ^ k.wrapping_mul(13)) as u8
}

fn alltoall_typed(fabric: Fabric) {
    for w in WORLDS {
        run_comms(fabric, w, |comm| {
            let coll = Coll::new(comm).unwrap();
            let (me, n) = (comm.rank(), comm.world_size());
            for block in [0usize, 1, 5, 1000] {
                let send: Vec<u32> = (0..n * block)
                    .map(|i| (me * 1_000_000 + i) as u32)
                    .collect();
                let mut recv = vec![u32::MAX; n * block];
                coll.alltoall(&send, &mut recv).unwrap();
                for s in 0..n {
                    for k in 0..block {
                        assert_eq!(recv[s * block + k], (s * 1_000_000 + me * block + k) as u32);
                    }
                }
            }
        });
    }
}

fn alltoallv_edges(fabric: Fabric) {
    for w in WORLDS {
        run_comms(fabric, w, |comm| {
            let coll = Coll::with_config(
                comm,
                P2pConfig {
                    slots: 2,
                    slot_bytes: 4096,
                },
            )
            .unwrap();
            let (me, n) = (comm.rank(), comm.world_size());
            // Unequal counts: rank s sends (s + 2 * d) % 5 * 3000 bytes to d (zero for some).
            let count = |s: usize, d: usize| (s + 2 * d) % 5 * 3000;
            let scounts: Vec<usize> = (0..n).map(|d| count(me, d)).collect();
            let rcounts: Vec<usize> = (0..n).map(|s| count(s, me)).collect();
            let sdispls: Vec<usize> = scounts
                .iter()
                .scan(0, |a, &c| {
                    let d = *a;
                    *a += c;
                    Some(d)
                })
                .collect();
            // Receive blocks in reverse rank order with gaps of 7 bytes.
            let mut rdispls = vec![0; n];
            let mut at = 7;
            for s in (0..n).rev() {
                rdispls[s] = at;
                at += rcounts[s] + 7;
            }
            let send: Vec<u8> = (0..n)
                .flat_map(|d| (0..scounts[d]).map(move |k| cell(me, d, k)))
                .collect();
            let mut recv = vec![0xEEu8; at];
            coll.alltoallv_bytes(&send, &scounts, &sdispls, &mut recv, &rcounts, &rdispls)
                .unwrap();
            let mut expect = vec![0xEEu8; at];
            for s in 0..n {
                for k in 0..rcounts[s] {
                    expect[rdispls[s] + k] = cell(s, me, k);
                }
            }
            assert!(recv == expect, "rank {me}");
            // All zero.
            let z = vec![0; n];
            coll.alltoallv_bytes(&[], &z, &z, &mut [], &z, &z).unwrap();
            // Self only.
            let mut only = vec![0; n];
            only[me] = 10;
            let mut r = [0u8; 10];
            coll.alltoallv_bytes(&[me as u8; 10], &only, &z, &mut r, &only, &z)
                .unwrap();
            assert_eq!(r, [me as u8; 10]);
            // Bad arguments are refused before anything is sent (every rank refuses alike).
            let bad =
                coll.alltoallv_bytes(&[0u8; 4], &vec![5; n], &z, &mut [0u8; 64], &vec![1; n], &z);
            assert!(matches!(bad, Err(Error::InvalidArgument(_))), "{bad:?}");
            comm.barrier().unwrap();
        });
    }
}

fn disagreeing_counts_fail_clearly(fabric: Fabric) {
    for w in [2usize, 3] {
        run_comms(fabric, w, |comm| {
            let coll = Coll::new(comm).unwrap();
            let (me, n) = (comm.rank(), comm.world_size());
            let z = vec![0; n];
            let displs: Vec<usize> = (0..n).map(|j| j * 16).collect();
            // Every rank sends 8 bytes to each peer, but rank 0 expects 16 from each.
            let mut scounts = vec![8; n];
            scounts[me] = if me == 0 { 16 } else { 8 };
            let rcounts: Vec<usize> = (0..n)
                .map(|s| {
                    if s == me {
                        scounts[me]
                    } else if me == 0 {
                        16
                    } else {
                        8
                    }
                })
                .collect();
            let mut recv = vec![0u8; n * 16];
            let r = coll.alltoallv_bytes(&[1u8; 64], &scounts, &z, &mut recv, &rcounts, &displs);
            if me == 0 {
                assert!(
                    matches!(&r, Err(Error::InvalidArgument(m)) if m.contains("counts disagree")),
                    "{r:?}"
                );
            } else {
                r.unwrap();
            }
            // The channels stay usable after the error.
            let mut out = vec![0u64; n];
            coll.allgather(&[me as u64], &mut out).unwrap();
            assert_eq!(out, (0..n as u64).collect::<Vec<_>>());
        });
    }
}

fn allgather_and_allreduce(fabric: Fabric) {
    for w in WORLDS {
        run_comms(fabric, w, |comm| {
            let coll = Coll::new(comm).unwrap();
            let (me, n) = (comm.rank(), comm.world_size());
            let mine = [me as u16, 7, (me * 3) as u16];
            let mut all = vec![0u16; 3 * n];
            coll.allgather(&mine, &mut all).unwrap();
            for s in 0..n {
                assert_eq!(&all[3 * s..3 * s + 3], &[s as u16, 7, (s * 3) as u16]);
            }
            let mut v = [me as u64 + 1, 10];
            coll.allreduce(&mut v, ReduceOp::Sum).unwrap();
            assert_eq!(v, [(n * (n + 1) / 2) as u64, 10 * n as u64]);
            let mut f = [me as f32 * 0.5, -1.0];
            coll.allreduce(&mut f, ReduceOp::Max).unwrap();
            assert_eq!(f, [(n - 1) as f32 * 0.5, -1.0]);
            coll.barrier().unwrap();
        });
    }
}

/// Collectives called in different orders on different ranks fail with ConfigMismatch.
fn mismatched_collectives(fabric: Fabric) {
    run_comms(fabric, 2, |comm| {
        let coll = Coll::new(comm).unwrap();
        let r = if comm.rank() == 0 {
            coll.allgather(&[1u8; 4], &mut [0u8; 8])
        } else {
            coll.alltoall(&[1u8; 8], &mut [0u8; 8])
        };
        assert!(
            matches!(r, Err(Error::ConfigMismatch(_))),
            "rank {}: {r:?}",
            comm.rank()
        );
    });
}

/// The one-copy exchange: blocks land in place, lengths come from the senders, many calls
/// in a row reuse the two epochs safely, oversize blocks are refused before anything moves.
fn one_copy_exchange(fabric: Fabric) {
    for w in WORLDS {
        run_comms(fabric, w, |comm| {
            let (me, n) = (comm.rank(), comm.world_size());
            let mut ex = xccl::coll::Exchange::new(comm, 5000).unwrap();
            for call in 0..25usize {
                let count = |s: usize, d: usize| (s * 31 + d * 17 + call * 7) % 5001;
                let scounts: Vec<usize> = (0..n).map(|d| count(me, d)).collect();
                let sdispls: Vec<usize> = scounts
                    .iter()
                    .scan(0, |a, &c| {
                        let d = *a;
                        *a += c;
                        Some(d)
                    })
                    .collect();
                let send: Vec<u8> = (0..n)
                    .flat_map(|d| (0..scounts[d]).map(move |k| cell(me, d, k + call)))
                    .collect();
                let view = ex.alltoallv(&send, &scounts, &sdispls).unwrap();
                let expected: Vec<usize> = (0..n).map(|s| count(s, me)).collect();
                view.expect_counts(&expected).unwrap();
                for s in 0..n {
                    let b = view.block(s);
                    assert!(
                        b.iter()
                            .enumerate()
                            .all(|(k, &x)| x == cell(s, me, k + call)),
                        "call {call} from {s}"
                    );
                }
            }
            let big = vec![0u8; 5001 * n];
            let too_big = ex.alltoallv(&big, &vec![5001; n], &vec![0; n]);
            assert!(
                matches!(too_big, Err(Error::InvalidArgument(_))),
                "{:?}",
                too_big.err()
            );
        });
    }
}

macro_rules! per_fabric {
    ($($name:ident),*) => {
        mod loopback { $( #[test] fn $name() { super::$name(super::Fabric::Loopback) } )* }
        mod shm { $( #[test] fn $name() { super::$name(super::Fabric::Shm) } )* }
        mod tcp { $( #[test] fn $name() { super::$name(super::Fabric::Tcp) } )* }
        mod mixed { $( #[test] fn $name() { super::$name(super::Fabric::Mixed) } )* }
        mod hybrid { $( #[test] fn $name() { super::$name(super::Fabric::Hybrid) } )* }
    };
}

per_fabric!(
    one_copy_exchange,
    alltoall_typed,
    alltoallv_edges,
    disagreeing_counts_fail_clearly,
    allgather_and_allreduce,
    mismatched_collectives
);

/// A block of 2^31 + 4096 bytes: lengths are 64-bit all the way (MPI's int counts stop at
/// 2^31 - 1). Loopback only, to keep the memory of the run bounded (about 9 GiB).
#[test]
fn block_above_2_pow_31_bytes() {
    const BIG: usize = (1 << 31) + 4096;
    run_comms(Fabric::Loopback, 2, |comm| {
        let coll = Coll::with_config(
            comm,
            P2pConfig {
                slots: 4,
                slot_bytes: 8 << 20,
            },
        )
        .unwrap();
        let (me, n) = (comm.rank(), comm.world_size());
        let peer = 1 - me;
        let mut scounts = vec![0; n];
        scounts[peer] = BIG;
        let z = vec![0; n];
        let send: Vec<u8> = (0..BIG).map(|k| cell(me, peer, k >> 12)).collect();
        let mut recv = vec![0u8; BIG];
        coll.alltoallv_bytes(&send, &scounts, &z, &mut recv, &scounts, &z)
            .unwrap();
        drop(send);
        for (k, &b) in recv.iter().enumerate().step_by(4093) {
            assert_eq!(b, cell(peer, me, k >> 12), "byte {k}");
        }
        assert_eq!(recv[BIG - 1], cell(peer, me, (BIG - 1) >> 12));
    });
}

/// One random exchange: `counts[s][d]` bytes from s to d, receive displacements with random
/// gaps; every byte must arrive exactly once, in place, and nothing else may be written.
fn random_exchange(fabric: Fabric, counts: Vec<Vec<usize>>, gaps: Vec<usize>, slot_bytes: usize) {
    let n = counts.len();
    run_comms(fabric, n, move |comm| {
        let coll = Coll::with_config(
            comm,
            P2pConfig {
                slots: 2,
                slot_bytes,
            },
        )
        .unwrap();
        let me = comm.rank();
        let scounts: Vec<usize> = (0..n).map(|d| counts[me][d]).collect();
        let rcounts: Vec<usize> = (0..n).map(|s| counts[s][me]).collect();
        let sdispls: Vec<usize> = scounts
            .iter()
            .scan(0, |a, &c| {
                let d = *a;
                *a += c;
                Some(d)
            })
            .collect();
        let mut rdispls = vec![0; n];
        let mut at = 0;
        for s in 0..n {
            at += gaps[(s + me) % gaps.len()];
            rdispls[s] = at;
            at += rcounts[s];
        }
        let send: Vec<u8> = (0..n)
            .flat_map(|d| (0..scounts[d]).map(move |k| cell(me, d, k)))
            .collect();
        let mut recv = vec![0xEEu8; at + 5];
        coll.alltoallv_bytes(&send, &scounts, &sdispls, &mut recv, &rcounts, &rdispls)
            .unwrap();
        let mut expect = vec![0xEEu8; at + 5];
        for s in 0..n {
            for k in 0..rcounts[s] {
                expect[rdispls[s] + k] = cell(s, me, k);
            }
        }
        assert!(recv == expect, "rank {me}: counts {counts:?}");
    });
}

fn exchange_strategy() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>, usize)> {
    (1usize..=6).prop_flat_map(|n| {
        (
            proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![Just(0usize), 0usize..300, 4000usize..9000],
                    n,
                ),
                n,
            ),
            proptest::collection::vec(0usize..20, 1..4),
            prop_oneof![Just(4096usize), Just(1 << 20)],
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn random_alltoallv_delivers_every_byte_once_loopback((counts, gaps, slot) in exchange_strategy()) {
        random_exchange(Fabric::Loopback, counts, gaps, slot);
    }

    #[test]
    fn random_alltoallv_delivers_every_byte_once_shm((counts, gaps, slot) in exchange_strategy()) {
        random_exchange(Fabric::Shm, counts, gaps, slot);
    }

    #[test]
    fn random_alltoallv_delivers_every_byte_once_tcp((counts, gaps, slot) in exchange_strategy()) {
        random_exchange(Fabric::Tcp, counts, gaps, slot);
    }
}
