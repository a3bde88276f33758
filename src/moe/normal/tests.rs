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
