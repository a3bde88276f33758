//! The memory-semantic transport contract: symmetric windows, one-sided put/get, monotonic
//! signals with deadlines, flush and abort; plus the backends that implement it.
//!
//! # Ordering
//! A signal from rank `a` to rank `b` is observed only after every earlier put from `a` to `b`
//! (per-pair ordering, like an RDMA reliable connection). Remote data becomes visible only
//! through a signal: wait for the signal, then read the window.
//!
//! # Signals
//! Each rank owns `caps().num_signals` 64-bit words. They are monotonic counters: never reset;
//! a waiter waits for `>= expected` and each use advances its expectation, so a stale signal is
//! harmless and there are no reset races.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use xccl::transport::{loopback::Loopback, Cmp, SignalOp, Transport};
//!
//! let ranks = Loopback::create(2).unwrap();
//! std::thread::scope(|s| {
//!     for t in &ranks {
//!         s.spawn(move || {
//!             let win = t.register(64).unwrap();
//!             let deadline = Instant::now() + Duration::from_secs(10);
//!             if t.rank() == 0 {
//!                 t.put_signal(1, &win, 0, b"hello", 0, SignalOp::Add, 1).unwrap();
//!             } else {
//!                 t.wait(0, Cmp::Ge, 1, deadline).unwrap();
//!                 let mut got = [0u8; 5];
//!                 t.read_local(&win, 0, &mut got).unwrap();
//!                 assert_eq!(&got, b"hello");
//!             }
//!         });
//!     }
//! });
//! ```

pub mod conformance;
mod doorbell;
#[cfg(test)]
mod doorbell_model;
mod forward;
#[cfg(all(feature = "shm", feature = "tcp"))]
pub mod hybrid;
pub mod loopback;
mod mem;
pub mod partly_mapped;
mod path;
#[cfg(feature = "shm")]
pub mod shm;
#[cfg(feature = "tcp")]
pub mod tcp;
mod window;

pub use doorbell::{Armed, Doorbell};
pub use mem::MappedMem;
pub use path::{PathKind, PeerPath, Stores};
pub use window::{check_peer, check_range, check_range_parts, check_signal, Window, WindowTable};

use crate::error::Result;
use std::time::Instant;

/// How a signal operation updates the peer's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOp {
    /// Store the value.
    Set,
    /// Add the value (wrapping).
    Add,
}

/// Comparison a wait checks: `current <cmp> value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `current == value`
    Eq,
    /// `current != value`
    Ne,
    /// `current > value`
    Gt,
    /// `current >= value` (the usual one for monotonic counters)
    Ge,
    /// `current < value`
    Lt,
    /// `current <= value`
    Le,
}

impl Cmp {
    /// Whether `current <self> value` holds.
    pub fn holds(self, current: u64, value: u64) -> bool {
        match self {
            Cmp::Eq => current == value,
            Cmp::Ne => current != value,
            Cmp::Gt => current > value,
            Cmp::Ge => current >= value,
            Cmp::Lt => current < value,
            Cmp::Le => current <= value,
        }
    }
}

/// What a backend supports, so callers choose instead of failing at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Backend name (`loopback`, `shm`, ...).
    pub backend: &'static str,
    /// Signal words per rank.
    pub num_signals: usize,
    /// Largest window `register` accepts ([`crate::Communicator::lease`] refuses larger ones
    /// up front, naming the object).
    pub max_window_len: usize,
}

/// One group of a split (see [`crate::Communicator::split`]): which ranks of the parent
/// transport form it and in what order, and what every member agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// The group's ranks as parent ranks, by new rank.
    pub members: Vec<usize>,
    /// This rank's place in `members`.
    pub rank: usize,
    /// 128 random bits chosen by the group's first member: names the group wherever a
    /// backend needs a name (shared-memory job id, derived secret).
    pub id: [u64; 2],
}

/// The all-gather a backend's [`Transport::split`] may call once: it gives two words and
/// gets every member's, by new rank.
pub type GroupExchange<'a> = dyn FnMut([u64; 2]) -> Result<Vec<[u64; 2]>> + 'a;

/// A memory-semantic transport: the contract every backend implements and every algorithm
/// is generic over. Object safe, so a communicator can hold `Box<dyn Transport>`.
///
/// Every method that takes a peer, window, offset, length or signal index checks it first
/// and returns [`crate::Error::InvalidArgument`] without touching anything.
pub trait Transport: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// What the backend supports.
    fn caps(&self) -> Caps;

    /// Collective: every rank calls it with the same `len`, in the same order as its other
    /// `register` calls, and gets a window of that size on every rank (symmetric). Disagreeing
    /// sizes give [`crate::Error::ConfigMismatch`] on every rank. Memory starts zeroed.
    fn register(&self, len: usize) -> Result<Window>;

    /// Releases this rank's handle on a window. Call it on every rank; memory is freed once
    /// no rank maps it any more.
    fn deregister(&self, win: Window) -> Result<()>;

    /// One-sided write of `data` into `peer`'s copy of `win` at `offset`. When it returns,
    /// `data` may be reused; the peer sees the bytes once it has observed a later signal.
    fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()>;

    /// `put` of `parts` laid end to end from `offset`: scattered pieces (a record's header and
    /// its row) land as one contiguous range, sent as one transfer where the backend can (one
    /// frame over tcp, no staging copy). The whole range is checked before anything is sent.
    fn put_vectored(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<()> {
        check_peer(peer, self.world_size())?;
        check_range_parts(win.len(), offset, parts)?;
        let mut at = offset;
        for part in parts {
            self.put(peer, win, at, part)?;
            at += part.len();
        }
        Ok(())
    }

    /// One-sided read of `out.len()` bytes from `peer`'s copy of `win` at `offset`.
    fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()>;

    /// Updates signal word `index` of `peer`. Observed only after every earlier put from this
    /// rank to `peer`.
    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()>;

    /// `put` followed by `signal`, possibly fused by the backend.
    #[allow(clippy::too_many_arguments)]
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
        self.put(peer, win, offset, data)?;
        self.signal(peer, index, op, value)
    }

    /// `put_signal` that this rank follows at once with another operation to `peer` (and
    /// does follow, without waiting in between): a network backend may hold it back to send
    /// both in one transfer.
    #[allow(clippy::too_many_arguments)]
    fn put_signal_then(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        data: &[u8],
        index: usize,
        op: SignalOp,
        value: u64,
    ) -> Result<()> {
        self.put_signal(peer, win, offset, data, index, op, value)
    }

    /// Waits until this rank's signal word `index` satisfies `cmp value`, and returns the
    /// word's value then. Fails with `Timeout` at `deadline`, `Aborted` after `abort()` here
    /// or on a peer, `PeerFailed` once a peer has died.
    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64>;

    /// Current value of this rank's signal word `index`, without waiting.
    fn signal_value(&self, index: usize) -> Result<u64>;

    /// Returns once every earlier put from this rank to `peer` is complete in `peer`'s memory.
    fn flush(&self, peer: usize) -> Result<()>;

    /// From any thread: every pending and future wait on this rank and on its peers returns
    /// `Err(Aborted)`. Idempotent.
    fn abort(&self);

    /// Collective orderly end. This rank addresses nothing more to any peer; peers may still
    /// put into and signal this rank until they close too, and what they send is applied.
    /// Returns once every peer has closed, so a rank that finishes early never makes a slower
    /// peer's legal work fail. Fails with `PeerFailed` when a peer died or left without
    /// closing, `Aborted` after an abort, `Timeout` at `deadline`; the transport is closed on
    /// this rank either way, and every later operation fails with `InvalidUsage`.
    /// Idempotent. Dropping a transport without closing it is leaving: peers that still
    /// address it, or wait for it, get `PeerFailed`.
    fn close(&self, deadline: Instant) -> Result<()>;

    /// Collective over the members of `group`: builds a new transport of the same backend
    /// and settings among them, independent of this one (its own windows, signals, links).
    /// Calls `exchange` at most once (an all-gather among the members, which also serves as
    /// a barrier). Backends that cannot do it return `Unsupported`.
    fn split(
        &self,
        group: &GroupSpec,
        exchange: &mut GroupExchange<'_>,
    ) -> Result<Box<dyn Transport>> {
        let _ = (group, exchange);
        Err(crate::Error::Unsupported(format!(
            "the {} backend cannot split",
            self.caps().backend
        )))
    }

    /// This rank's own copy of `win`, kept in memory while the returned value lives.
    /// Backends implement this; users go through the checked accessors below.
    fn local_mem(&self, win: &Window) -> Result<MappedMem>;

    /// How this rank reaches `peer`: [`PathKind::Mapped`] when `peer`'s windows are mapped
    /// into this process (shared memory, threads), like `nvshmem_ptr`, else
    /// [`PathKind::Network`]. Fixed for the transport's life. Between distinct ranks it groups
    /// them as hosts group processes: symmetric (a maps b exactly when b maps a) and
    /// transitive, so whether a rank maps every other is the same answer on every rank. The
    /// default: the network.
    fn path_kind(&self, peer: usize) -> Result<PathKind> {
        check_peer(peer, self.world_size())?;
        Ok(PathKind::Network)
    }

    /// For backends: `peer`'s copy of `win` as mapped here, `Some` exactly when
    /// [`Transport::path_kind`] says `Mapped`. Algorithms use [`PeerPath`]
    /// (`transport.path(peer, win)`), which is built on this.
    fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
        check_peer(peer, self.world_size())?;
        let _ = win;
        Ok(None)
    }

    /// Backends that apply their peers' signals in this process (tcp) count every signal
    /// applied here, whoever sent it and by whatever path: the count so far. `None` where
    /// peers update signal words directly (mapped memory). [`Doorbell`] waits on it.
    fn arrivals(&self) -> Option<u64> {
        None
    }

    /// Waits until more than `seen` signals have been applied here (see
    /// [`Transport::arrivals`]), or the deadline passes (`Timeout`).
    fn wait_arrivals(&self, seen: u64, deadline: Instant) -> Result<u64> {
        let _ = (seen, deadline);
        Err(crate::Error::InvalidUsage(format!(
            "the {} backend keeps no arrival count",
            self.caps().backend
        )))
    }

    /// Copies bytes out of this rank's own copy of `win`.
    fn read_local(&self, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
        check_range(win.len(), offset, out.len())?;
        // A raw copy tolerates concurrent remote writers (the value is then unspecified,
        // which the contract allows: data is defined only after the signal).
        self.local_mem(win)?.read(offset, out)
    }

    /// Copies bytes into this rank's own copy of `win`.
    fn write_local(&self, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
        check_range(win.len(), offset, data.len())?;
        // `data` may be a slice of this very window: `write` copies overlap-safely.
        self.local_mem(win)?.write(offset, data)
    }

    /// A bounds-checked view of this rank's own copy of `win`, without copying.
    ///
    /// # Safety
    /// No peer may write `offset..offset+len` while the slice lives. That holds after waiting
    /// for the signal that announced the data and before signalling the writer that the range
    /// may be reused. The window must not be deregistered while the slice lives.
    unsafe fn local_slice(&self, win: &Window, offset: usize, len: usize) -> Result<&[u8]> {
        check_range(win.len(), offset, len)?;
        let p = self.local_mem(win)?.ptr_at(offset, len)?;
        // SAFETY: range checked; the caller upholds the no-concurrent-writer rule above and
        // keeps the window registered (so its memory mapped) while the slice lives.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// A bounds-checked mutable view of this rank's own copy of `win`.
    ///
    /// # Safety
    /// As [`Transport::local_slice`], and no other reference to the range may exist.
    #[allow(clippy::mut_from_ref)]
    unsafe fn local_slice_mut(&self, win: &Window, offset: usize, len: usize) -> Result<&mut [u8]> {
        check_range(win.len(), offset, len)?;
        let p = self.local_mem(win)?.ptr_at(offset, len)?;
        // SAFETY: range checked; exclusivity and registration are the caller's promise.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }
}
