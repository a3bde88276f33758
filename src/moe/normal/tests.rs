//! Normal-mode unit tests that need the buffer's internals.

use super::*;
use crate::moe::{Dtype, MoeConfig};
use crate::transport::{loopback::Loopback, Caps, MappedMem, PathKind, Transport, Window};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A loopback rank whose reads of one window offset see what a hostile peer wrote there
/// (a count of `forged` rows) instead of what this rank stored.
struct Tampered {
    inner: Loopback,
    at: Arc<AtomicUsize>,
    forged: u64,
}

impl Transport for Tampered {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn caps(&self) -> Caps {
        self.inner.caps()
    }
    fn register(&self, len: usize) -> Result<Window> {
        self.inner.register(len)
    }
    fn deregister(&self, win: Window) -> Result<()> {
        self.inner.deregister(win)
    }
    fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
        self.inner.put(peer, win, offset, data)
    }
    fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
        self.inner.get(peer, win, offset, out)
    }
    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        self.inner.signal(peer, index, op, value)
    }
    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64> {
        self.inner.wait(index, cmp, value, deadline)
    }
    fn signal_value(&self, index: usize) -> Result<u64> {
        self.inner.signal_value(index)
    }
    fn flush(&self, peer: usize) -> Result<()> {
        self.inner.flush(peer)
    }
    fn abort(&self) {
        self.inner.abort()
    }
    fn close(&self, deadline: Instant) -> Result<()> {
        self.inner.close(deadline)
    }
    fn local_mem(&self, win: &Window) -> Result<MappedMem> {
        self.inner.local_mem(win)
    }
    fn path_kind(&self, peer: usize) -> Result<PathKind> {
        self.inner.path_kind(peer)
    }
    fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
        self.inner.map_peer(peer, win)
    }
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
