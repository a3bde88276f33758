//! Per-peer data paths: how this rank's bytes reach one peer's copy of a window, chosen from
//! what the backend says about that peer (mapped memory or the network), with the copy
//! kernels, the one-word publish and the read-only row views the algorithms use.

use super::{MappedMem, SignalOp, Transport, Window};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// How this rank reaches a peer's windows; see [`Transport::path_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// The peer's windows are mapped into this process: puts are copies, a word can be
    /// published and observed, rows can be read in place.
    Mapped,
    /// Bytes travel over the network through the transport's puts and signals.
    Network,
}

/// Which stores a put into a mapped window uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    /// Ordinary stores: the data passes through this core's caches.
    Cached,
    /// Non-temporal stores where the CPU has them: for bulk data another core reads next
    /// (no read for ownership, the writer's working set stays cached). Over the network the
    /// same as `Cached`.
    Streaming,
}

/// This rank's path to one peer's copy of one window.
///
/// Every method checks its range; the bytes it puts are visible to the peer once it has
/// observed a later signal or published word from this path (streaming stores included: the
/// path fences them before it signals or publishes).
///
/// ```
/// use xccl::transport::{loopback::Loopback, PathKind, SignalOp, Stores, Transport, Cmp};
/// use std::time::{Duration, Instant};
///
/// let ranks = Loopback::create(2).unwrap();
/// std::thread::scope(|s| {
///     for t in &ranks {
///         s.spawn(move || {
///             let t: &dyn Transport = t;
///             let win = t.register(4096).unwrap();
///             if t.rank() == 0 {
///                 let path = t.path(1, &win).unwrap();
///                 assert_eq!(path.kind(), PathKind::Mapped);
///                 path.put(0, &[7; 512], Stores::Streaming).unwrap();
///                 path.signal(0, SignalOp::Add, 1).unwrap();
///             } else {
///                 t.wait(0, Cmp::Ge, 1, Instant::now() + Duration::from_secs(10)).unwrap();
///                 let mut got = [0u8; 512];
///                 t.read_local(&win, 0, &mut got).unwrap();
///                 assert_eq!(got, [7; 512]);
///             }
///         });
///     }
/// });
/// ```
pub struct PeerPath<'t> {
    t: &'t dyn Transport,
    peer: usize,
    win: Window,
    mem: Option<MappedMem>,
    /// Streaming stores were issued and not yet fenced.
    streamed: AtomicBool,
}

impl<'t> PeerPath<'t> {
    /// The path to `peer`'s copy of `win` (see [`Transport::path`]).
    pub(crate) fn new(t: &'t dyn Transport, peer: usize, win: &Window) -> Result<Self> {
        super::check_peer(peer, t.world_size())?;
        let mem = match t.path_kind(peer)? {
            PathKind::Mapped => Some(t.map_peer(peer, win)?.ok_or_else(|| {
                Error::InvalidUsage(format!(
                    "the {} backend says rank {peer} is mapped but maps no window of it",
                    t.caps().backend
                ))
            })?),
            PathKind::Network => None,
        };
        if let Some(m) = &mem {
            if m.len() != win.len() {
                return Err(Error::InvalidUsage(format!(
                    "rank {peer}'s mapping of window #{} has {} bytes, the window {}",
                    win.id(),
                    m.len(),
                    win.len()
                )));
            }
        }
        Ok(PeerPath {
            t,
            peer,
            win: *win,
            mem,
            streamed: AtomicBool::new(false),
        })
    }

    /// The peer this path leads to.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// Mapped or network.
    pub fn kind(&self) -> PathKind {
        match self.mem {
            Some(_) => PathKind::Mapped,
            None => PathKind::Network,
        }
    }

    /// True for a mapped path.
    pub fn is_mapped(&self) -> bool {
        self.mem.is_some()
    }

    /// Writes `data` at `offset` of the peer's copy.
    pub fn put(&self, offset: usize, data: &[u8], stores: Stores) -> Result<()> {
        match (&self.mem, stores) {
            (Some(m), Stores::Cached) => m.write(offset, data),
            (Some(m), Stores::Streaming) => {
                m.write_streaming(offset, data)?;
                // Relaxed: only this path's own later fence reads it, on the thread that
                // publishes (callers publish from the thread that put, or after a lock).
                self.streamed.store(true, Ordering::Relaxed);
                Ok(())
            }
            (None, _) => self.t.put(self.peer, &self.win, offset, data),
        }
    }

    /// Writes `parts` end to end from `offset` (one transfer over the network).
    pub fn put_vectored(&self, offset: usize, parts: &[&[u8]]) -> Result<()> {
        match &self.mem {
            Some(m) => {
                super::check_range_parts(m.len(), offset, parts)?;
                let mut at = offset;
                for p in parts {
                    m.write(at, p)?;
                    at += p.len();
                }
                Ok(())
            }
            None => self.t.put_vectored(self.peer, &self.win, offset, parts),
        }
    }

    /// Completes streaming stores before whatever publishes them.
    fn fence_streamed(&self) {
        // A plain load first: most publishes follow no streaming store, and a swap would be
        // a locked instruction on every signal.
        if self.streamed.load(Ordering::Relaxed) {
            self.streamed.store(false, Ordering::Relaxed);
            // Partner of the streaming stores in `put`: they complete before the publishing
            // Release store (a signal or `publish`) that follows.
            crate::copy::store_fence();
        }
    }

    /// Updates the peer's signal word `index`, after everything put on this path.
    pub fn signal(&self, index: usize, op: SignalOp, value: u64) -> Result<()> {
        self.fence_streamed();
        self.t.signal(self.peer, index, op, value)
    }

    /// `put` (cached) and `signal` in one call (one frame over the network).
    pub fn put_signal(
        &self,
        offset: usize,
        data: &[u8],
        index: usize,
        op: SignalOp,
        value: u64,
    ) -> Result<()> {
        self.fence_streamed();
        self.t
            .put_signal(self.peer, &self.win, offset, data, index, op, value)
    }

    /// [`PeerPath::put_signal`] followed at once by another operation on this path (see
    /// [`Transport::put_signal_then`]).
    pub fn put_signal_then(
        &self,
        offset: usize,
        data: &[u8],
        index: usize,
        op: SignalOp,
        value: u64,
    ) -> Result<()> {
        self.fence_streamed();
        self.t
            .put_signal_then(self.peer, &self.win, offset, data, index, op, value)
    }

    /// Stores one word at `offset` (8-byte aligned) of the peer's copy after everything put
    /// on this path. On a mapped path it is a Release store a peer can poll with
    /// [`MappedMem::observe`] (SYNC POINT: partner of that Acquire load); over the network
    /// it is a put, visible after a later signal like any other.
    pub fn publish(&self, offset: usize, value: u64) -> Result<()> {
        match &self.mem {
            Some(m) => {
                self.fence_streamed();
                m.publish(offset, value)
            }
            None => self
                .t
                .put(self.peer, &self.win, offset, &value.to_le_bytes()),
        }
    }

    /// Mapped paths: a read-only view of `len` bytes at `offset` of the peer's copy (rows read
    /// in place instead of being sent). `InvalidUsage` over the network.
    ///
    /// # Safety
    /// The peer must not write the range while the slice lives: it announced the range (a
    /// signal the caller waited for) and, by the caller's protocol, rewrites it only after
    /// this rank tells it so.
    pub unsafe fn rows(&self, offset: usize, len: usize) -> Result<&[u8]> {
        match &self.mem {
            // SAFETY: the caller's promise, as above; `slice` checks the range.
            Some(m) => unsafe { m.slice(offset, len) },
            None => Err(Error::InvalidUsage(format!(
                "rank {}'s window is reached over the network: its rows cannot be read in place",
                self.peer
            ))),
        }
    }

    /// The mapped copy itself, for the transport's own protocols (the doorbell).
    pub(crate) fn mem(&self) -> Option<&MappedMem> {
        self.mem.as_ref()
    }
}

impl dyn Transport + '_ {
    /// This rank's path to `peer`'s copy of `win`: mapped where [`Transport::path_kind`] says
    /// so, else through the network.
    pub fn path(&self, peer: usize, win: &Window) -> Result<PeerPath<'_>> {
        PeerPath::new(self, peer, win)
    }

    /// The paths to every rank's copy of `win`, by rank.
    pub fn paths(&self, win: &Window) -> Result<Vec<PeerPath<'_>>> {
        (0..self.world_size()).map(|r| self.path(r, win)).collect()
    }

    /// Whether every other rank's windows are mapped here. Path kinds group ranks as hosts
    /// group processes (see [`Transport::path_kind`]), so this is the same on every rank.
    pub fn maps_every_peer(&self) -> Result<bool> {
        for r in (0..self.world_size()).filter(|&r| r != self.rank()) {
            if self.path_kind(r)? == PathKind::Network {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
