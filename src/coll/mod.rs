//! Collectives: barrier, allgather, all-to-all, all-to-all-v (MPI-style counts and
//! displacements) and a small all-reduce, over bytes or any `bytemuck::Pod` element type.
//!
//! Each rank writes its block for rank j straight into j's receive ring (one copy onto the
//! wire, page-aligned), j copies it out into the caller's buffer. Blocks larger than a ring
//! slot are pipelined. Every argument is checked before anything is sent, and ranks whose
//! counts disagree get an error, not corrupted data or a hang.
//!
//! ```no_run
//! # fn main() -> xccl::Result<()> {
//! let comm = xccl::Communicator::from_env()?;
//! let coll = xccl::coll::Coll::new(&comm)?;
//! let n = comm.world_size();
//! let send: Vec<u32> = (0..n as u32).collect();
//! let mut recv = vec![0u32; n];
//! coll.alltoall(&send, &mut recv)?; // recv[j] == rank of this process, from every j
//! # Ok(()) }
//! ```

mod exchange;
mod reduce;

pub use exchange::{Exchange, ExchangeView};
pub use reduce::{ReduceOp, Reducible};

use crate::error::{Error, Result};
use crate::p2p::{P2p, P2pConfig};
use crate::Communicator;
use bytemuck::Pod;
use std::sync::atomic::{AtomicU64, Ordering};

const KIND_ALLTOALLV: u64 = 1;
const KIND_ALLGATHER: u64 = 2;
const KIND_ALLREDUCE: u64 = 3;

/// Collective operations over a communicator.
///
/// Every rank adds its rank number into a sum (three ranks as threads over the loopback
/// backend):
///
/// ```
/// use std::time::Duration;
/// use xccl::coll::{Coll, ReduceOp};
/// use xccl::{transport::loopback::Loopback, Communicator};
///
/// let ranks: Vec<_> = Loopback::create(3)?
///     .into_iter()
///     .map(|t| {
///         std::thread::spawn(move || -> xccl::Result<u64> {
///             let comm = Communicator::from_transport(Box::new(t), Duration::from_secs(10))?;
///             let coll = Coll::new(&comm)?;
///             let mut sum = [comm.rank() as u64];
///             coll.allreduce(&mut sum, ReduceOp::Sum)?;
///             coll.close()?;
///             comm.close()?;
///             Ok(sum[0])
///         })
///     })
///     .collect();
/// for r in ranks {
///     assert_eq!(r.join().unwrap()?, 0 + 1 + 2);
/// }
/// # Ok::<(), xccl::Error>(())
/// ```
pub struct Coll<'c> {
    p2p: P2p<'c>,
    epoch: AtomicU64,
}

/// Carves disjoint mutable regions `(offset, len)` out of `buf`, in the order given.
fn carve<'a>(buf: &'a mut [u8], regions: &[(usize, usize)]) -> Result<Vec<&'a mut [u8]>> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].0);
    let mut out: Vec<Option<&'a mut [u8]>> = (0..regions.len()).map(|_| None).collect();
    let mut rest = buf;
    let mut consumed = 0usize;
    for i in order {
        let (off, len) = regions[i];
        if off < consumed {
            if len == 0 {
                out[i] = Some(Default::default());
                continue;
            }
            return Err(Error::InvalidArgument(format!(
                "receive region {i} at offset {off} overlaps another"
            )));
        }
        let tail = std::mem::take(&mut rest);
        let (_, from) = tail.split_at_mut(off - consumed);
        let (region, after) = from.split_at_mut(len);
        out[i] = Some(region);
        rest = after;
        consumed = off + len;
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every region carved"))
        .collect())
}

fn check_layout(
    what: &str,
    buf_len: usize,
    counts: &[usize],
    displs: &[usize],
    n: usize,
) -> Result<()> {
    if counts.len() != n || displs.len() != n {
        return Err(Error::InvalidArgument(format!(
            "{what}: {} counts and {} displacements for {n} ranks",
            counts.len(),
            displs.len()
        )));
    }
    for (j, (&c, &d)) in counts.iter().zip(displs).enumerate() {
        match d.checked_add(c) {
            Some(end) if end <= buf_len => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                "{what}: block {j} (displacement {d}, count {c}) exceeds the buffer of {buf_len}"
            )))
            }
        }
    }
    Ok(())
}

fn scale(v: &[usize], size: usize, what: &str) -> Result<Vec<usize>> {
    v.iter()
        .map(|&x| {
            x.checked_mul(size)
                .ok_or_else(|| Error::InvalidArgument(format!("{what} {x} overflows")))
        })
        .collect()
}

impl<'c> Coll<'c> {
    /// Collective: sets up the receive rings (4 slots of 1 MiB per source).
    pub fn new(comm: &'c Communicator) -> Result<Self> {
        Self::with_config(comm, P2pConfig::default())
    }

    /// Collective: sets up the receive rings with the given sizing.
    pub fn with_config(comm: &'c Communicator, cfg: P2pConfig) -> Result<Self> {
        Ok(Coll {
            p2p: P2p::new(comm, cfg)?,
            epoch: AtomicU64::new(0),
        })
    }

    /// Collective: gives the rings back to the communicator (what dropping does, with the
    /// error).
    pub fn close(self) -> Result<()> {
        self.p2p.close()
    }

    fn comm(&self) -> &'c Communicator {
        self.p2p.comm()
    }

    fn next_tag(&self, kind: u64) -> u64 {
        let e = self.epoch.fetch_add(1, Ordering::Relaxed);
        (kind << 56) | (e & ((1 << 56) - 1))
    }

    /// Blocks until every rank has entered.
    pub fn barrier(&self) -> Result<()> {
        self.comm().barrier()
    }

    /// All-to-all-v over bytes: block j of `send` (`scounts[j]` bytes at `sdispls[j]`) goes to
    /// rank j, which receives it at `rdispls[me]` with `rcounts[me]` bytes. Receive regions
    /// must not overlap. Counts that disagree between sender and receiver are an error.
    pub fn alltoallv_bytes(
        &self,
        send: &[u8],
        scounts: &[usize],
        sdispls: &[usize],
        recv: &mut [u8],
        rcounts: &[usize],
        rdispls: &[usize],
    ) -> Result<()> {
        self.exchange(
            KIND_ALLTOALLV,
            send,
            scounts,
            sdispls,
            recv,
            rcounts,
            rdispls,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        kind: u64,
        send: &[u8],
        scounts: &[usize],
        sdispls: &[usize],
        recv: &mut [u8],
        rcounts: &[usize],
        rdispls: &[usize],
    ) -> Result<()> {
        let comm = self.comm();
        let (me, n) = (comm.rank(), comm.world_size());
        check_layout("send", send.len(), scounts, sdispls, n)?;
        check_layout("receive", recv.len(), rcounts, rdispls, n)?;
        if scounts[me] != rcounts[me] {
            return Err(Error::InvalidArgument(format!(
                "this rank sends itself {} bytes but expects {}",
                scounts[me], rcounts[me]
            )));
        }
        let regions: Vec<(usize, usize)> = rdispls
            .iter()
            .copied()
            .zip(rcounts.iter().copied())
            .collect();
        let mut slices = carve(recv, &regions)?;
        let tag = self.next_tag(kind);
        let own = std::mem::take(&mut slices[me]);
        own.copy_from_slice(&send[sdispls[me]..sdispls[me] + scounts[me]]);
        let deadline = comm.deadline();
        self.p2p.scope(|s| {
            let mut slots: Vec<Option<&mut [u8]>> = slices.into_iter().map(Some).collect();
            let mut recvs = Vec::with_capacity(n);
            for k in 1..n {
                let src = (me + n - k) % n;
                let buf = slots[src].take().expect("each source once");
                recvs.push(s.irecv_exact(src, tag, buf)?);
            }
            let mut sends = Vec::with_capacity(n);
            for k in 1..n {
                let dst = (me + k) % n;
                sends.push(s.isend(dst, tag, &send[sdispls[dst]..sdispls[dst] + scounts[dst]])?);
            }
            // A block that arrives wrong (disagreeing counts, another collective) is an error,
            // but every other block of this collective is still taken off its channel, so the
            // next collective starts clean.
            let mut first = None;
            for r in recvs {
                match r.wait(deadline) {
                    Ok(_) => {}
                    Err(e @ (Error::InvalidArgument(_) | Error::ConfigMismatch(_))) => {
                        first.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            for q in sends {
                q.wait(deadline)?;
            }
            first.map_or(Ok(()), Err)
        })
    }

    /// All-to-all-v over elements: counts and displacements are in elements of `T`.
    pub fn alltoallv<T: Pod>(
        &self,
        send: &[T],
        scounts: &[usize],
        sdispls: &[usize],
        recv: &mut [T],
        rcounts: &[usize],
        rdispls: &[usize],
    ) -> Result<()> {
        let sz = std::mem::size_of::<T>();
        self.alltoallv_bytes(
            bytemuck::cast_slice(send),
            &scale(scounts, sz, "send count")?,
            &scale(sdispls, sz, "send displacement")?,
            bytemuck::cast_slice_mut(recv),
            &scale(rcounts, sz, "receive count")?,
            &scale(rdispls, sz, "receive displacement")?,
        )
    }

    /// All-to-all with equal blocks: `send` and `recv` hold `world` blocks each.
    pub fn alltoall<T: Pod>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.comm().world_size();
        if send.len() != recv.len() || send.len() % n != 0 {
            return Err(Error::InvalidArgument(format!(
                "alltoall: send has {} and receive {} elements; both must be the same multiple of {n}",
                send.len(),
                recv.len()
            )));
        }
        let b = send.len() / n;
        let counts = vec![b; n];
        let displs: Vec<usize> = (0..n).map(|j| j * b).collect();
        self.alltoallv(send, &counts, &displs, recv, &counts, &displs)
    }

    /// Allgather: every rank's `send` block, in rank order, into `recv` (`world × send.len()`).
    pub fn allgather<T: Pod>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.comm().world_size();
        let b = std::mem::size_of_val(send);
        if recv.len() != send.len() * n {
            return Err(Error::InvalidArgument(format!(
                "allgather: receive has {} elements, expected {n} x {}",
                recv.len(),
                send.len()
            )));
        }
        self.gather_bytes(
            KIND_ALLGATHER,
            bytemuck::cast_slice(send),
            bytemuck::cast_slice_mut(recv),
            b,
        )
    }

    /// Every rank's `send` (`block` bytes) into `recv` in rank order (`world × block`).
    fn gather_bytes(&self, kind: u64, send: &[u8], recv: &mut [u8], block: usize) -> Result<()> {
        let n = self.comm().world_size();
        let counts = vec![block; n];
        let zeros = vec![0; n];
        let displs: Vec<usize> = (0..n).map(|j| j * block).collect();
        self.exchange(kind, send, &counts, &zeros, recv, &counts, &displs)
    }

    /// All-reduce of a small vector (statistics): every rank ends with the element-wise
    /// reduction over all ranks, combined in rank order (the same bits on every rank).
    pub fn allreduce<T: Reducible>(&self, data: &mut [T], op: ReduceOp) -> Result<()> {
        let n = self.comm().world_size();
        let mut all = vec![T::zeroed(); data.len() * n];
        let sz = std::mem::size_of_val(data);
        self.gather_bytes(
            KIND_ALLREDUCE,
            bytemuck::cast_slice(data),
            bytemuck::cast_slice_mut(&mut all),
            sz,
        )?;
        let len = data.len();
        for (i, d) in data.iter_mut().enumerate() {
            *d = (1..n).fold(all[i], |acc, r| acc.reduce(all[r * len + i], op));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carve_gives_disjoint_regions_in_request_order() {
        let mut buf: Vec<u8> = (0..10).collect();
        let parts = carve(&mut buf, &[(6, 2), (0, 3), (3, 0), (3, 3)]).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>(),
            vec![vec![6, 7], vec![0, 1, 2], vec![], vec![3, 4, 5]]
        );
        assert!(carve(&mut buf, &[(0, 4), (3, 2)]).is_err());
    }
}
