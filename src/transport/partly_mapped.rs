//! A test backend for jobs whose path kinds differ by peer: it wraps another transport and
//! maps only the windows of even ranks, to even ranks, as if the even ranks shared a host
//! and every odd rank sat on a host of its own.

use super::{check_peer, Caps, GroupExchange, GroupSpec, MappedMem, PathKind, Transport, Window};
use crate::error::Result;

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
    crate::forward_transport!(inner; rank, world_size, register, deregister, put, put_vectored,
        get, signal, put_signal, put_signal_then, wait, signal_value, flush, abort, close, local_mem, arrivals,
        wait_arrivals);
    fn caps(&self) -> Caps {
        Caps {
            backend: "partly-mapped",
            ..self.inner.caps()
        }
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
}
