//! A rank's node: the authenticated mesh of TCP links, one progress thread per peer that
//! applies frames straight into registered regions, a heartbeat thread, and the one-sided
//! operations (write, read, signal, flush, wait, abort, close).
//!
//! # Orderly end
//! `Bye` is a half-close: "I will ask nothing more of you" (no write, signal, read, flush or
//! heartbeat follows it; answers to the peer's own earlier reads and flushes still may). A
//! link's writer shuts down once both sides have said goodbye, so each side reads the other's
//! stream to its end and no byte is left unread when the sockets close. [`Node::close`] says
//! goodbye to every peer and returns once every peer's stream has ended after its goodbye,
//! so a rank that closes first keeps applying what slower peers still send it. A stream that
//! ends without a goodbye is a failed peer.

use crate::auth;
use crate::error::{Error, Result};
use crate::frame::{Frame, Kind, FLAG_SET, FLAG_SIGNAL, HDR};
use crate::region::Region;
use crate::signals::{Outcome, SignalSink, Signals};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::io::{IoSlice, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod api;
mod apply;
mod end;
mod health;
mod progress;
mod receive;
mod send;
mod setup;
#[cfg(test)]
mod tests;
mod wait;

use apply::*;
use health::*;
use progress::*;
use receive::*;
use send::*;
pub use setup::Listening;

/// The length a rank announces for a region it could not allocate.
pub const REG_FAILED: u64 = u64::MAX;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct Config {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// The job secret every rank proves it knows (any length; 32 random bytes is usual).
    pub secret: Vec<u8>,
    /// Address to listen on (port 0 picks one). Loopback unless told otherwise.
    pub bind: SocketAddr,
    /// Signal words of this rank.
    pub num_signals: usize,
    /// A link idle this long gets a heartbeat.
    pub heartbeat: Duration,
    /// A peer silent this long has failed.
    pub peer_timeout: Duration,
    /// Largest payload of one frame; larger writes are split.
    pub max_frame: u64,
    /// How long a waiting caller polls the links itself before it sleeps (and leaves the
    /// frames to the progress threads, which block in `poll` until data arrives).
    pub poll: Duration,
}

impl Config {
    /// Defaults: loopback, 4096 signals, heartbeat 200 ms, peer timeout 3 s, 16 MiB frames,
    /// 200 µs of polling by waiting callers.
    pub fn new(rank: usize, world: usize, secret: Vec<u8>) -> Self {
        Config {
            rank,
            world,
            secret,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            num_signals: 4096,
            heartbeat: Duration::from_millis(200),
            peer_timeout: Duration::from_secs(3),
            max_frame: 1 << 20,
            poll: Duration::from_micros(200),
        }
    }
}

struct Pending {
    ptr: *mut u8,
    len: usize,
    done: bool,
}

// SAFETY: the pointer is the buffer of a `read` call that waits (holding no lock) until the
// entry is marked done or removed; it is only written under the pending-map mutex.
unsafe impl Send for Pending {}

struct Shared {
    cfg: Config,
    start: Instant,
    regions: RwLock<HashMap<u64, Arc<Region>>>,
    signals: Signals,
    writers: Vec<Mutex<Option<TcpStream>>>,
    /// Receiving side of each link. Whoever holds the lock reads whole frames: the link's
    /// progress thread, or a caller that is waiting anyway (it polls the links itself, which
    /// saves the wake-up of another thread on every message).
    rx: Vec<Mutex<Option<RxLink>>>,
    closed: Vec<AtomicBool>,
    /// Callers polling the links right now. The progress threads stay out of their way while
    /// there are any: a progress thread woken by every frame would take a core from them.
    pollers: AtomicUsize,
    poll_gate: Mutex<()>,
    poll_cv: Condvar,
    /// Progress threads between their gate check and the end of their `poll`, and the
    /// eventfd in every progress thread's poll set that a caller starting to poll writes to
    /// get them out of the way (else each arriving frame would wake one of them as well).
    in_poll: AtomicUsize,
    kick: OwnedFd,
    /// The kick was written and not yet cleared.
    kicked: AtomicBool,
    last_sent: Vec<AtomicU64>,
    last_recv: Vec<AtomicU64>,
    first_failed: AtomicUsize,
    /// The peer said goodbye: it asks nothing more of this rank.
    departed: Vec<AtomicBool>,
    /// Descriptor of each link's receiving socket (-1 before setup), for the liveness check.
    rx_fd: Vec<std::sync::atomic::AtomicI32>,
    /// `close` (or drop) began: no new operation starts.
    closing: AtomicBool,
    /// This rank's abort was sent to the peer (or the link was shut trying).
    abort_sent: Vec<AtomicBool>,
    /// This rank said goodbye to the peer: it asks nothing more of it.
    bye_sent: Vec<AtomicBool>,
    /// The peer's stream ended after its goodbye: the link is finished.
    finished: Vec<AtomicBool>,
    aborted: AtomicU64,
    stop: AtomicBool,
    regs: Mutex<HashMap<(usize, u64), u64>>,
    pending: Mutex<HashMap<u64, Pending>>,
    flushed: Vec<AtomicU64>,
    changed: Condvar,
    next_req: AtomicU64,
}

impl Shared {
    /// The state of a node with `cfg`, before any link.
    fn new(cfg: Config, sink: Option<Arc<dyn SignalSink>>) -> Result<Self> {
        let n = cfg.world;
        Ok(Shared {
            signals: Signals::new(cfg.num_signals, sink),
            start: Instant::now(),
            regions: RwLock::new(HashMap::new()),
            writers: (0..n).map(|_| Mutex::new(None)).collect(),
            rx: (0..n).map(|_| Mutex::new(None)).collect(),
            closed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            pollers: AtomicUsize::new(0),
            poll_gate: Mutex::new(()),
            poll_cv: Condvar::new(),
            in_poll: AtomicUsize::new(0),
            kick: new_eventfd()?,
            kicked: AtomicBool::new(false),
            last_sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            last_recv: (0..n).map(|_| AtomicU64::new(0)).collect(),
            first_failed: AtomicUsize::new(0),
            departed: (0..n).map(|_| AtomicBool::new(false)).collect(),
            rx_fd: (0..n)
                .map(|_| std::sync::atomic::AtomicI32::new(-1))
                .collect(),
            closing: AtomicBool::new(false),
            abort_sent: (0..n).map(|_| AtomicBool::new(false)).collect(),
            bye_sent: (0..n).map(|_| AtomicBool::new(false)).collect(),
            finished: (0..n).map(|_| AtomicBool::new(false)).collect(),
            aborted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            regs: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            flushed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            changed: Condvar::new(),
            next_req: AtomicU64::new(1),
            cfg,
        })
    }

    /// Region `id`, if registered here.
    fn region(&self, id: u64) -> Option<Arc<Region>> {
        self.regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn notify(&self) {
        self.signals.wake();
        let _g = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    fn fail(&self, peer: usize, detail: &str) {
        if self.departed[peer].load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
            return;
        }
        if self
            .first_failed
            .compare_exchange(0, peer + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::warn!(rank = self.cfg.rank, peer, detail, "xccl-tcp: peer failed");
        }
        self.shutdown_link(peer);
        self.notify();
    }

    /// A writer stalled on a full socket gives up: the node is interrupted or stopping.
    fn must_stop_writing(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.interrupted().is_some()
    }

    /// Sends a heartbeat on `peer`'s link unless another writer has it (then traffic is
    /// flowing, or that writer is the one stalled). A heartbeat the peer does not take in
    /// within the peer timeout means the peer has stopped reading: it has failed.
    fn beat(&self, peer: usize) {
        let Ok(mut guard) = self.writers[peer].try_lock() else {
            return;
        };
        if self.bye_sent[peer].load(Ordering::SeqCst) {
            return;
        }
        let Some(s) = guard.as_mut() else { return };
        let start = Instant::now();
        let stopped = || self.must_stop_writing() || start.elapsed() > self.cfg.peer_timeout;
        match write_all_parts(
            s,
            &Frame::new(Kind::Heartbeat).encode(),
            &[],
            false,
            &stopped,
        ) {
            Ok(()) => self.last_sent[peer].store(self.now_us(), Ordering::Relaxed),
            Err(WriteEnd::Stopped) if !self.must_stop_writing() => {
                drop(guard);
                self.fail(peer, "it takes in nothing (its socket stayed full)");
            }
            Err(WriteEnd::Stopped) => self.shutdown_link(peer),
            Err(WriteEnd::Io(e)) => {
                drop(guard);
                self.fail(peer, &format!("heartbeat failed: {e}"));
            }
        }
    }

    /// Shuts `peer`'s link down in both directions without taking its writer lock, so that a
    /// write blocked on a stopped peer returns at once.
    fn shutdown_link(&self, peer: usize) {
        let fd = self.rx_fd[peer].load(Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: plain syscall on the link's socket, open for the node's life.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    /// Why operations must stop, if they must.
    fn interrupted(&self) -> Option<Error> {
        match self.aborted.load(Ordering::SeqCst) {
            0 => {}
            _ => return Some(Error::Aborted),
        }
        match self.first_failed.load(Ordering::SeqCst) {
            0 => None,
            r => Some(Error::PeerFailed {
                rank: r - 1,
                detail: "link lost".into(),
            }),
        }
    }
}

/// A connected rank.
pub struct Node {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}
