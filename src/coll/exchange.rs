//! One-copy all-to-all(v) into a registered receive window: each rank puts its block for
//! rank j straight from the caller's memory into j's window, at the region reserved for it,
//! then signals; j reads the blocks in place. A rank's block for itself is not copied at all:
//! its view reads it from the send buffer. This is the memory-semantic data path of XCCL: no
//! intermediate ring, no copy-out.
//!
//! The window holds two epochs (even and odd calls), so a call never overwrites blocks a
//! peer may still be reading: a rank can write epoch e+2 only after every peer has sent it
//! epoch e+1, which a peer does only after it stopped reading epoch e (its view of epoch e
//! borrows the exchange, so it has ended before the next call).
//!
//! ```no_run
//! # fn main() -> xccl::Result<()> {
//! let comm = xccl::Communicator::from_env()?;
//! let mut ex = xccl::coll::Exchange::new(&comm, 1 << 20)?; // blocks up to 1 MiB
//! let n = comm.world_size();
//! let send = vec![comm.rank() as u8; n * 100];
//! let counts = vec![100; n];
//! let displs: Vec<usize> = (0..n).map(|j| j * 100).collect();
//! let view = ex.alltoallv(&send, &counts, &displs)?;
//! for src in 0..n {
//!     assert_eq!(view.block(src), &vec![src as u8; 100][..]);
//! }
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::size::Sizer;
use crate::transport::{MappedMem, PeerPath, Stores, Window};
use crate::{Communicator, Lease};

const PAGE: usize = 4096;

/// A one-copy all-to-all(v) with a registered receive window.
///
/// Dropping it (or [`Exchange::close`]) gives its window and signal words back to the
/// communicator; both are collective.
pub struct Exchange<'c> {
    comm: &'c Communicator,
    lease: Lease<'c>,
    max_block: usize,
    region: usize,
    /// Each source's block length, per call.
    mailbox: Mailbox,
    /// This rank's path to each rank's window, by rank, and its own copy.
    paths: Vec<PeerPath<'c>>,
    own: MappedMem,
    epoch: u64,
    /// Bytes received from each source by the last call.
    counts: Vec<usize>,
}

/// The blocks received by one call, read in place from the window.
pub struct ExchangeView<'a> {
    ex: &'a Exchange<'a>,
    parity: usize,
    /// This rank's own block, read in place from the caller's send buffer (never copied).
    own: &'a [u8],
}

impl<'c> Exchange<'c> {
    /// Collective: registers a receive window for blocks of up to `max_block` bytes from each
    /// rank (two epochs: `2 × world × max_block` bytes, page-aligned regions).
    pub fn new(comm: &'c Communicator, max_block: usize) -> Result<Self> {
        let n = comm.world_size();
        let what = format!("an exchange of {n} x {max_block} bytes");
        let size = Sizer::new(&what);
        let region = size.round_up(max_block, PAGE)?.max(PAGE);
        let data = size.mul(&[region, n, 2])?;
        let mailbox = Mailbox::new(&size, data, 1, n, 1)?;
        let lease = comm.lease(
            &what,
            size.add(&[data, size.round_up(mailbox.len(), PAGE)?])?,
            mailbox.signal_count(),
            "exchange",
        )?;
        let mailbox = mailbox.at_signals(lease.signals().start);
        let (paths, own) = lease.views()?;
        Ok(Exchange {
            comm,
            lease,
            max_block,
            region,
            mailbox,
            paths,
            own,
            epoch: 0,
            counts: vec![0; n],
        })
    }

    /// Collective: drains and gives the window and signal words back (what dropping does,
    /// with the error).
    pub fn close(self) -> Result<()> {
        self.lease.close()
    }

    /// Collective, before the first call: starts counting calls after `calls` (tests run
    /// across counter boundaries with it).
    #[doc(hidden)]
    pub fn skip_calls(&mut self, calls: u64) {
        self.epoch += calls;
    }

    fn win(&self) -> &Window {
        self.lease.window()
    }

    /// Largest block per (source, destination).
    pub fn max_block(&self) -> usize {
        self.max_block
    }

    fn data_off(&self, parity: usize, src: usize) -> usize {
        (parity * self.comm.world_size() + src) * self.region
    }

    /// Collective: sends block j (`scounts[j]` bytes at `sdispls[j]` of `send`) to rank j and
    /// returns the blocks this rank received, by source. Receivers learn each block's length
    /// from its sender (MoE dispatch does not know it in advance).
    pub fn alltoallv<'a>(
        &'a mut self,
        send: &'a [u8],
        scounts: &[usize],
        sdispls: &[usize],
    ) -> Result<ExchangeView<'a>> {
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        if scounts.len() != n || sdispls.len() != n {
            return Err(Error::InvalidArgument(format!(
                "{} counts and {} displacements for {n} ranks",
                scounts.len(),
                sdispls.len()
            )));
        }
        for (j, (&c, &d)) in scounts.iter().zip(sdispls).enumerate() {
            if c > self.max_block {
                return Err(Error::InvalidArgument(format!(
                    "block {j} has {c} bytes, more than the exchange's maximum of {}",
                    self.max_block
                )));
            }
            if d.checked_add(c).is_none_or(|end| end > send.len()) {
                return Err(Error::InvalidArgument(format!(
                    "block {j} (displacement {d}, count {c}) exceeds the send buffer of {}",
                    send.len()
                )));
            }
        }
        self.epoch += 1;
        let epoch = self.epoch;
        let parity = (epoch % 2) as usize;
        let t = self.comm.transport();
        self.lease.enter();
        // Put to every rank, starting with the next one so that not everyone hits rank 0 first.
        // Not to itself: its own block is read in place from `send`.
        for k in 1..n {
            let dst = (me + k) % n;
            let block = &send[sdispls[dst]..sdispls[dst] + scounts[dst]];
            let path = &self.paths[dst];
            path.put(self.data_off(parity, me), block, Stores::Cached)?;
            let mut slot = [0u8; 16];
            // The count and the signal that publishes both travel together (one frame on tcp).
            self.mailbox
                .post(path, me, 0, epoch, &[block.len() as u64], &mut slot)?;
        }
        let deadline = self.comm.deadline();
        for src in 0..n {
            if src == me {
                self.counts[me] = scounts[me];
                continue;
            }
            let c = self
                .mailbox
                .collect(t, &self.own, 0, src, epoch, deadline)?[0];
            if c > self.max_block as u64 {
                return Err(Error::ProtocolViolation(format!(
                    "rank {src} announced {c} bytes during call {epoch}, more than the {} a \
                     block holds",
                    self.max_block
                )));
            }
            self.counts[src] = c as usize;
        }
        let own = &send[sdispls[me]..sdispls[me] + scounts[me]];
        self.lease.leave();
        Ok(ExchangeView {
            ex: self,
            parity,
            own,
        })
    }
}

impl ExchangeView<'_> {
    /// The block received from `src`, in place in the window.
    pub fn block(&self, src: usize) -> &[u8] {
        if src == self.ex.comm.rank() {
            return self.own;
        }
        let off = self.ex.data_off(self.parity, src);
        // SAFETY: `src`'s block was announced by the signal we waited for; nobody writes this
        // epoch's region again before this view (which borrows the exchange) is dropped and the
        // next-but-one call starts (see the module docs). The length was checked against the
        // region when the count was read.
        unsafe {
            self.ex
                .comm
                .transport()
                .local_slice(self.ex.win(), off, self.ex.counts[src])
        }
        .expect("checked region")
    }

    /// Bytes received from each source.
    pub fn counts(&self) -> &[usize] {
        &self.ex.counts
    }

    /// Checks the received counts against what the caller expected (`ConfigMismatch` naming
    /// the first disagreeing source).
    pub fn expect_counts(&self, expected: &[usize]) -> Result<()> {
        let counts = &self.ex.counts;
        match counts.iter().zip(expected).position(|(a, b)| a != b) {
            None if expected.len() == counts.len() => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "{} expected counts for {} ranks",
                expected.len(),
                counts.len()
            ))),
            Some(s) => Err(Error::ConfigMismatch(format!(
                "rank {s} sent {} bytes where {} were expected",
                counts[s], expected[s]
            ))),
        }
    }
}
