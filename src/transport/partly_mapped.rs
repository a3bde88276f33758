//! A test backend for jobs whose path kinds differ by peer: it wraps another transport and
//! maps only the windows of even ranks, to even ranks, as if the even ranks shared a host
//! and every odd rank sat on a host of its own.

use super::{
    check_peer, Caps, Cmp, GroupExchange, GroupSpec, MappedMem, PathKind, SignalOp, Transport,
    Window,
};
use crate::error::Result;
use std::time::Instant;

/// Another transport, with every path between ranks that are not both even turned into a
/// network path (the inner transport still carries the bytes).
///
/// ```
/// use xccl::transport::{loopback::Loopback, partly_mapped::PartlyMapped, PathKind, Transport};
///
/// let ranks = PartlyMapped::wrap_all(Loopback::create(3).unwrap());
/// assert_eq!(ranks[0].path_kind(2).unwrap(), PathKind::Mapped);
/// assert_eq!(ranks[0].path_kind(1).unwrap(), PathKind::Network);
/// assert_eq!(ranks[1].path_kind(1).unwrap(), PathKind::Network);
/// ```
pub struct PartlyMapped {
    inner: Box<dyn Transport>,
}

impl PartlyMapped {
    /// Wraps one rank.
    pub fn new(inner: Box<dyn Transport>) -> Self {
        PartlyMapped { inner }
    }

    /// Wraps every rank of a job.
    pub fn wrap_all<T: Transport + 'static>(ranks: Vec<T>) -> Vec<Box<dyn Transport>> {
        ranks
            .into_iter()
            .map(|t| Box::new(PartlyMapped::new(Box::new(t))) as Box<dyn Transport>)
            .collect()
    }

    /// Whether this rank maps `peer`: both even, and the inner transport maps it.
    fn maps(&self, peer: usize) -> Result<bool> {
        check_peer(peer, self.inner.world_size())?;
        Ok(self.inner.rank() % 2 == 0
            && peer % 2 == 0
            && self.inner.path_kind(peer)? == PathKind::Mapped)
    }
}

impl Transport for PartlyMapped {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn caps(&self) -> Caps {
        Caps {
            backend: "partly-mapped",
            ..self.inner.caps()
        }
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
    fn put_vectored(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<()> {
        self.inner.put_vectored(peer, win, offset, parts)
    }
    fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
        self.inner.get(peer, win, offset, out)
    }
    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        self.inner.signal(peer, index, op, value)
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
        self.inner
            .put_signal(peer, win, offset, data, index, op, value)
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
    fn split(
        &self,
        group: &GroupSpec,
        exchange: &mut GroupExchange<'_>,
    ) -> Result<Box<dyn Transport>> {
        Ok(Box::new(PartlyMapped::new(
            self.inner.split(group, exchange)?,
        )))
    }
    fn local_mem(&self, win: &Window) -> Result<MappedMem> {
        self.inner.local_mem(win)
    }
    fn path_kind(&self, peer: usize) -> Result<PathKind> {
        Ok(match self.maps(peer)? {
            true => PathKind::Mapped,
            false => PathKind::Network,
        })
    }
    fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
        match self.maps(peer)? {
            true => self.inner.map_peer(peer, win),
            false => Ok(None),
        }
    }
    fn arrivals(&self) -> Option<u64> {
        self.inner.arrivals()
    }
    fn wait_arrivals(&self, seen: u64, deadline: Instant) -> Result<u64> {
        self.inner.wait_arrivals(seen, deadline)
    }
}
