//! Point-to-point send/recv: tagged messages of any size (u64 lengths), ordered per
//! (source, tag), pipelined in chunks through a ring of slots per ordered pair in the
//! receiver's window, with credit returned through a signal. Blocking calls, vectored calls
//! for paged KV caches, and non-blocking requests inside a [`Scope`].
//!
//! ```no_run
//! # fn main() -> xccl::Result<()> {
//! let comm = xccl::Communicator::from_env()?;
//! let p2p = xccl::p2p::P2p::new(&comm, Default::default())?;
//! let mut buf = vec![0u8; 1 << 20];
//! if comm.rank() == 0 {
//!     p2p.send(1, 7, &buf)?;
//! } else if comm.rank() == 1 {
//!     let n = p2p.recv(0, 7, &mut buf)?;
//!     assert_eq!(n, 1 << 20);
//! }
//! // Both directions at once:
//! let peer = comm.rank() ^ 1;
//! if peer < comm.world_size() {
//!     let out = vec![1u8; 4096];
//!     let mut inp = vec![0u8; 4096];
//!     p2p.scope(|s| {
//!         let r = s.irecv(peer, 1, &mut inp)?;
//!         s.isend(peer, 1, &out)?.wait(comm.deadline())?;
//!         r.wait(comm.deadline())?;
//!         Ok(())
//!     })?;
//! }
//! # Ok(()) }
//! ```

mod engine;
mod matching;
mod request;
mod wait;
mod wire;

pub use engine::P2pConfig;
pub use request::{RecvRequest, Scope, SendRequest};

use crate::error::Result;
use crate::Communicator;
use engine::Engine;
use std::marker::PhantomData;
use std::sync::Mutex;

/// Point-to-point messaging over a communicator. Dropping it (or [`P2p::close`]) gives its
/// window and signal words back; both are collective.
///
/// Rank 0 sends a tagged message to rank 1 (two ranks as threads over the loopback backend):
///
/// ```
/// use std::time::Duration;
/// use xccl::p2p::{P2p, P2pConfig};
/// use xccl::{transport::loopback::Loopback, Communicator};
///
/// let ranks: Vec<_> = Loopback::create(2)?
///     .into_iter()
///     .map(|t| {
///         std::thread::spawn(move || -> xccl::Result<Vec<u8>> {
///             let comm = Communicator::from_transport(Box::new(t), Duration::from_secs(10))?;
///             let p2p = P2p::new(&comm, P2pConfig::default())?; // collective
///             let mut got = vec![0u8; 16];
///             if comm.rank() == 0 {
///                 p2p.send(1, 7, b"hello")?;
///                 got.clear();
///             } else {
///                 let n = p2p.recv(0, 7, &mut got)?; // tag 7 from rank 0
///                 got.truncate(n);
///             }
///             p2p.close()?;
///             comm.close()?;
///             Ok(got)
///         })
///     })
///     .collect();
/// let got: Vec<Vec<u8>> = ranks.into_iter().map(|r| r.join().unwrap()).collect::<Result<_, _>>()?;
/// assert_eq!(got[1], b"hello");
/// # Ok::<(), xccl::Error>(())
/// ```
pub struct P2p<'c> {
    engine: Engine<'c>,
}

impl<'c> P2p<'c> {
    /// Collective: registers the rings (`world × slots × slot_bytes` bytes per rank).
    pub fn new(comm: &'c Communicator, cfg: P2pConfig) -> Result<Self> {
        Ok(P2p {
            engine: Engine::new(comm, cfg)?,
        })
    }

    /// Collective: gives the rings' window and signal words back to the communicator (what
    /// dropping does, with the error). Every message must have been received: with one
    /// under way, the words are retired rather than reused.
    pub fn close(self) -> Result<()> {
        self.engine.close()
    }

    /// The communicator.
    pub fn comm(&self) -> &'c Communicator {
        self.engine.comm
    }

    /// Runs `f` with a scope for non-blocking requests, then waits for every request started
    /// in it (until the communicator's deadline). If `f` or a wait fails, unfinished requests
    /// are cancelled; a half-sent message cannot be, so the communicator is then aborted.
    pub fn scope<'env, F, R>(&'env self, f: F) -> Result<R>
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> Result<R>,
    {
        let scope = Scope {
            engine: &self.engine,
            ids: Mutex::new(Vec::new()),
            _scope: PhantomData,
            _env: PhantomData,
        };
        let result = f(&scope);
        let ids = std::mem::take(&mut *scope.ids.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = self.comm().deadline();
        let mut first_err = result.as_ref().err().map(|_| ());
        let mut wait_err = None;
        if first_err.is_none() {
            for &id in &ids {
                if self.engine.is_live(id) {
                    if let Err(e) = self.engine.wait(id, deadline) {
                        wait_err = Some(e);
                        first_err = Some(());
                        break;
                    }
                }
            }
        }
        if first_err.is_some() {
            self.engine.cancel(&ids);
        }
        match (result, wait_err) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(e)) => Err(e),
            (Ok(r), None) => Ok(r),
        }
    }

    /// Completes one op started by a blocking call; on failure it is cancelled, so the
    /// buffer the caller lends is never referenced after the call returns.
    fn finish(&self, id: engine::OpId) -> Result<u64> {
        let r = self.engine.wait_default(id);
        if r.is_err() {
            self.engine.cancel(&[id]);
        }
        r
    }

    /// Sends `data` to `peer` with `tag`; returns once the data has left.
    pub fn send(&self, peer: usize, tag: u64, data: &[u8]) -> Result<()> {
        if self.engine.send_now(peer, tag, data)? {
            return Ok(());
        }
        let id =
            self.engine
                .post_send(peer, tag, smallvec::smallvec![(data.as_ptr(), data.len())])?;
        self.finish(id).map(|_| ())
    }

    /// Sends the concatenation of `blocks` as one message.
    pub fn sendv(&self, peer: usize, tag: u64, blocks: &[&[u8]]) -> Result<()> {
        self.scope(|s| s.isendv(peer, tag, blocks)?.wait(self.comm().deadline()))
    }

    /// Receives the next message with `tag` from `src` into `buf`; returns its length.
    pub fn recv(&self, src: usize, tag: u64, buf: &mut [u8]) -> Result<usize> {
        if let Some(n) = self.engine.recv_now(src, tag, buf)? {
            return Ok(n);
        }
        let id = self.engine.post_recv(
            src,
            tag,
            smallvec::smallvec![(buf.as_mut_ptr(), buf.len())],
            false,
        )?;
        self.finish(id).map(|n| n as usize)
    }

    /// Receives one message scattered over `blocks` in order; returns its length.
    pub fn recvv(&self, src: usize, tag: u64, blocks: &mut [&mut [u8]]) -> Result<usize> {
        self.scope(|s| {
            let v: Vec<&mut [u8]> = blocks.iter_mut().map(|b| &mut **b).collect();
            s.irecvv(src, tag, v)?.wait(self.comm().deadline())
        })
    }

    /// Sends to `peer` and receives from `src` at the same time; returns the received length.
    pub fn sendrecv(
        &self,
        peer: usize,
        send_tag: u64,
        data: &[u8],
        src: usize,
        recv_tag: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        self.scope(|s| {
            let r = s.irecv(src, recv_tag, buf)?;
            s.isend(peer, send_tag, data)?
                .wait(self.comm().deadline())?;
            r.wait(self.comm().deadline())
        })
    }
}
