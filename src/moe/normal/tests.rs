//! Normal-mode unit tests that need the buffer's internals.

use super::*;
use crate::moe::{Dtype, MoeConfig};
use crate::transport::{loopback::Loopback, Transport, Window};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A loopback rank whose reads of one window offset see what a hostile peer wrote there
/// (a count of `forged` rows) instead of what this rank stored.
struct Tampered {
    inner: Loopback,
    at: Arc<AtomicUsize>,
    forged: u64,
}

impl Transport for Tampered {
    crate::forward_transport!(inner; rank, world_size, caps, register, deregister, put, get,
        signal, wait, signal_value, flush, abort, close, local_mem, path_kind, map_peer);
    fn put_signal(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        data: &[u8],
        index: usize,
        op: SignalOp,
        value: u64,
    ) -> Result<()> {
        // A mailbox slot (the call number, then the count) landing in this rank's own
        // slot carries the forged count instead.
        let mut data = data.to_vec();
        if peer == self.rank() && offset == self.at.load(Ordering::SeqCst) && data.len() >= 16 {
            data[8..16].copy_from_slice(&self.forged.to_le_bytes());
        }
        self.inner
            .put_signal(peer, win, offset, &data, index, op, value)
    }
}

/// A peer that writes a larger row count into a rank's own announcement slot makes that
/// rank's dispatch fail with a protocol error (it used to index past the rows it sent).
#[test]
fn a_forged_count_in_the_own_slot_is_a_protocol_error() {
    let at = Arc::new(AtomicUsize::new(usize::MAX));
    let ranks: Vec<Box<dyn Transport>> = Loopback::create(2)
        .unwrap()
        .into_iter()
        .map(|inner| {
            let forged = if inner.rank() == 0 { 8 } else { 0 };
            Box::new(Tampered {
                inner,
                at: at.clone(),
                forged,
            }) as Box<dyn Transport>
        })
        .collect();
    let results: Vec<Result<usize>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|t| {
                let at = at.clone();
                s.spawn(move || -> Result<usize> {
                    let comm = Communicator::from_transport(t, Duration::from_secs(20))?;
                    let me = comm.rank();
                    let cfg = MoeConfig::new(4, 16, 1, 8, Dtype::F32);
                    let mut buf = MoeBuffer::new(&comm, cfg)?;
                    if me == 0 {
                        // Epoch 1, dispatch counts, this rank's own slot.
                        at.store(buf.mailbox.slot_off(1, 0, 0), Ordering::SeqCst);
                    }
                    comm.barrier()?;
                    // Two tokens, both to this rank's own experts.
                    let x = vec![0u8; 2 * 16 * 4];
                    let experts = [2 * me as i64, 2 * me as i64 + 1];
                    let r = buf.dispatch(&x, &experts, &[1.0, 1.0]);
                    let rows = r.and_then(|view| view.rows().map(|rows| rows.len()));
                    if me == 0 {
                        comm.abort(); // the peer must not wait for a combine
                    }
                    rows
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    match &results[0] {
        Err(Error::ProtocolViolation(m)) => assert!(m.contains("own announcement"), "{m}"),
        other => panic!("rank 0: {other:?}"),
    }
}

/// Zero-copy dispatch over mapped windows: the expert's row is the source's input row itself
/// (no byte of it was copied), and the input is refused until the combine has returned.
#[test]
fn zero_copy_rows_are_read_where_their_source_wrote_them() {
    let ranks = Loopback::create(2).unwrap();
    std::thread::scope(|s| {
        for t in ranks {
            s.spawn(move || {
                let comm =
                    Communicator::from_transport(Box::new(t), Duration::from_secs(20)).unwrap();
                let me = comm.rank();
                let mut cfg = MoeConfig::new(2, 16, 1, 4, Dtype::F32);
                cfg.zero_copy_dispatch = true;
                let mut buf = MoeBuffer::new(&comm, cfg).unwrap();
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
                comm.close().unwrap();
            });
        }
    });
}
