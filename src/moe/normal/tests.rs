//! Normal-mode unit tests that need the buffer's internals.

use super::*;
use crate::moe::{Dtype, MoeConfig};
use crate::transport::loopback::Loopback;
use std::time::Duration;

/// Runs `rank` on each of `n` loopback ranks, each on its own thread with its communicator.
fn on_loopback_ranks(n: usize, rank: impl Fn(&Communicator) + Sync) {
    let ranks = Loopback::create(n).unwrap();
    std::thread::scope(|s| {
        for t in ranks {
            let rank = &rank;
            s.spawn(move || {
                let comm =
                    Communicator::from_transport(Box::new(t), Duration::from_secs(20)).unwrap();
                rank(&comm);
                comm.close().unwrap();
            });
        }
    });
}

/// Writes into rank 0's mailbox, as if rank `from` announced call 1 of a dispatch with
/// `words` (row count, where the rows start, map version), and sets its signal.
fn forge_dispatch_announcement(buf: &MoeBuffer<'_>, from: usize, words: [u64; 3]) {
    let mut slot = [0u8; 32];
    (buf.mailbox)
        .post(&buf.paths[0], from, 0, 1, &words, &mut slot)
        .unwrap();
}

/// A rank's own mailbox slot lies in its window, where any peer can write: a peer that
/// forges a count there (it used to make the rank index past the rows it sent itself) changes
/// nothing, as a rank never reads its own slot; each rank receives exactly its own two rows.
#[test]
fn a_forged_count_in_the_own_slot_changes_nothing() {
    on_loopback_ranks(2, |comm| {
        let me = comm.rank();
        let cfg = MoeConfig::new(4, 16, 1, 8, Dtype::F32);
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        if me == 1 {
            // Rank 0's own slot of call 1, as if rank 0 had posted 8 rows to itself.
            forge_dispatch_announcement(&buf, 0, [8, 0, 0]);
        }
        comm.barrier().unwrap();
        // Two tokens, both to this rank's own experts.
        let x: Vec<u8> = (0..2 * 16).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let experts = [2 * me as i64, 2 * me as i64 + 1];
        let view = buf.dispatch(&x, &experts, &[1.0, 1.0]).unwrap();
        let rows = view.rows().unwrap();
        assert_eq!(rows.len(), 2, "rank {me}");
        let reduced: Vec<u8> = rows.iter().flat_map(|r| r.data.to_vec()).collect();
        drop(rows);
        let _ = view;
        let mut out = vec![0u8; x.len()];
        buf.combine(&reduced, &mut out).unwrap();
        assert_eq!(out, x, "rank {me}");
        buf.close().unwrap();
    });
}

/// Zero-copy dispatch over mapped windows: the expert's row is the source's input row itself
/// (no byte of it was copied), and the input is refused until the combine has returned.
#[test]
fn zero_copy_rows_are_read_where_their_source_wrote_them() {
    on_loopback_ranks(2, |comm| {
        let me = comm.rank();
        let mut cfg = MoeConfig::new(2, 16, 1, 4, Dtype::F32);
        cfg.zero_copy_dispatch = true;
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        let rb = 16 * 4;
        // Three tokens, all to the other rank's expert.
        let peer = 1 - me;
        buf.input(3).unwrap().fill(me as u8 + 1);
        let view = buf.dispatch_in_place(&[peer as i64; 3], &[1.0; 3]).unwrap();
        let rows = view.rows().unwrap();
        assert_eq!(rows.len(), 3);
        for row in &rows {
            let b = view.buf;
            let off = b.input_off(row.src_token).unwrap();
            // SAFETY: the peer's input rows, stable until its combine (see the view).
            let there = unsafe { b.paths[peer].rows(off, rb).unwrap() };
            assert_eq!(row.data.as_ptr(), there.as_ptr(), "read in place");
            assert!(row.data.iter().all(|&v| v == peer as u8 + 1));
        }
        let reduced: Vec<u8> = rows.iter().flat_map(|r| r.data.to_vec()).collect();
        drop(rows);
        let _ = view;
        assert!(matches!(buf.input(3), Err(Error::InvalidUsage(_))));
        let mut out = vec![0u8; 3 * rb];
        buf.combine(&reduced, &mut out).unwrap();
        assert!(out.iter().all(|&v| v == me as u8 + 1));
        assert!(buf.input(3).is_ok(), "writable again after the combine");
        buf.close().unwrap();
    });
}

/// A dispatch announced through another map version (a peer that missed a `set_map`) is
/// refused with `ConfigMismatch`, never read: rank 1 forges its announcement of call 1 with
/// version 7 while rank 0's map has version 0.
#[test]
fn a_stale_map_version_is_refused() {
    on_loopback_ranks(2, |comm| {
        let me = comm.rank();
        let cfg = MoeConfig::new(4, 16, 1, 8, Dtype::F32);
        let mut buf = MoeBuffer::new(comm, cfg).unwrap();
        if me == 1 {
            forge_dispatch_announcement(&buf, 1, [0, 0, 7]);
            comm.barrier().unwrap();
            // As rank 0's, this buffer ends with a call under way: neither drains.
            buf.lease.enter();
            return;
        }
        let x = vec![0u8; 16 * 4];
        match buf.dispatch(&x, &[0], &[1.0]) {
            Err(Error::ConfigMismatch(m)) => assert!(m.contains("version 7"), "{m}"),
            other => panic!("a stale version gave {:?}", other.map(|_| ())),
        }
        comm.barrier().unwrap();
    });
}

/// Two-level routing: a source that relays a record naming an expert on its own host (not
/// the gateway's) is refused by the gateway (`ProtocolViolation`), never forwarded.
#[cfg(all(feature = "shm", feature = "tcp"))]
#[test]
fn a_relayed_record_for_another_host_is_refused() {
    use crate::moe::record::TokenRecord;
    use crate::moe::TwoLevel;
    let host_of = [0, 1];
    let ranks = crate::transport::hybrid::in_process(&host_of, 256).unwrap();
    std::thread::scope(|s| {
        for t in ranks {
            s.spawn(move || {
                let timeout = Duration::from_secs(20);
                let comm =
                    Communicator::from_transport_on_hosts(Box::new(t), &host_of, timeout).unwrap();
                // Experts 0, 1 on rank 0 (host 0); 2, 3 on rank 1 (host 1).
                let mut cfg = MoeConfig::new(4, 16, 1, 8, Dtype::F32);
                cfg.two_level = TwoLevel::On;
                let mut buf = MoeBuffer::new(&comm, cfg).unwrap();
                assert!(buf.two_level());
                if comm.rank() == 0 {
                    // Call 1's first relayed record, for expert 0: this rank's own.
                    let mut rec = vec![0u8; buf.wire_rec()];
                    TokenRecord::write(&mut rec, 1, 0, [(0i64, 1.0f32)].into_iter(), None);
                    buf.paths[1]
                        .put(buf.relay_off(buf.gateways(), 1, 0, 0), &rec, Stores::Cached)
                        .unwrap();
                    let mut slot = [0u8; 32];
                    let words = [1, 0, buf.routing.map.version()];
                    (buf.mailbox)
                        .post(&buf.paths[1], 0, 2, 1, &words, &mut slot)
                        .unwrap();
                    buf.relay_progress(1, 1).unwrap();
                    // Not before rank 1 has its error: it enters the barrier only then (and
                    // may abort before this rank sees the barrier end).
                    let _ = comm.barrier();
                } else {
                    match buf.dispatch(&[], &[], &[]) {
                        Err(Error::ProtocolViolation(m)) => {
                            assert!(m.contains("not on this host"), "{m}")
                        }
                        other => panic!("expected ProtocolViolation, got {:?}", other.map(|_| ())),
                    }
                    let _ = comm.barrier();
                }
                comm.abort();
            });
        }
    });
}
