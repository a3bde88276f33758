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
use crate::signals::{Outcome, Signals};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The length a rank announces for a region it could not allocate.
pub const REG_FAILED: u64 = u64::MAX;

/// How a signal updates its word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOp {
    /// Store the value.
    Set,
    /// Add the value.
    Add,
}

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
        match write_all_parts(s, &Frame::new(Kind::Heartbeat).encode(), &[], &stopped) {
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

    fn send(&self, peer: usize, f: &Frame, payload: &[u8]) -> Result<()> {
        self.send_parts(peer, f, &[payload])
    }

    /// Sends one frame whose payload is `parts`, end to end.
    fn send_parts(&self, peer: usize, f: &Frame, parts: &[&[u8]]) -> Result<()> {
        if let Some(e) = self.interrupted() {
            return Err(e);
        }
        let hdr = f.encode();
        let mut guard = self.writers[peer].lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the writer lock, which `say_bye` holds while it sends the goodbye:
        // no request can slip in behind it.
        if !matches!(f.kind, Kind::ReadResp | Kind::FlushAck)
            && self.bye_sent[peer].load(Ordering::SeqCst)
        {
            return Err(Error::Closed(format!(
                "rank {} has said goodbye to rank {peer}",
                self.cfg.rank
            )));
        }
        let Some(s) = guard.as_mut() else {
            return Err(Error::Invalid(format!("no link to rank {peer}")));
        };
        let stopped = || self.must_stop_writing();
        let r = match parts {
            [payload] => write_all_vectored(s, &hdr, payload, &stopped),
            _ => write_all_parts(s, &hdr, parts, &stopped),
        };
        if r.is_ok() && self.aborted.load(Ordering::SeqCst) != 0 {
            // `abort` found this link busy: the peer still has to hear of it.
            self.send_abort(peer, s);
        }
        drop(guard);
        match r {
            Ok(()) => {
                self.last_sent[peer].store(self.now_us(), Ordering::Relaxed);
                Ok(())
            }
            Err(WriteEnd::Stopped) => {
                // Part of a frame may have gone out: nothing can follow it on this stream.
                self.shutdown_link(peer);
                Err(self.interrupted().unwrap_or(Error::Aborted))
            }
            Err(WriteEnd::Io(e)) => {
                self.fail(peer, &format!("send failed: {e}"));
                Err(Error::PeerFailed {
                    rank: peer,
                    detail: e.to_string(),
                })
            }
        }
    }

    /// Tells `peer` of the abort, once, on its (locked) writer; gives up at the first stall
    /// (the link is then shut, which the peer sees as well).
    fn send_abort(&self, peer: usize, s: &mut TcpStream) {
        if self.abort_sent[peer].swap(true, Ordering::SeqCst) {
            return;
        }
        let hdr = Frame::new(Kind::Abort).encode();
        if write_all_parts(s, &hdr, &[], &|| true).is_err() {
            self.shutdown_link(peer);
        }
    }
}

/// Why a frame could not be written whole.
enum WriteEnd {
    /// The socket failed.
    Io(std::io::Error),
    /// The node was interrupted (abort, a failed peer) while the socket was full.
    Stopped,
}

/// How long one blocking write may wait on a full socket before the writer looks at whether
/// it was interrupted (the send timeout of every link).
const WRITE_SLICE: Duration = Duration::from_millis(50);

/// Runs one write; a write the send timeout cut short is tried again unless `stopped()`.
fn retrying(
    mut write: impl FnMut() -> std::io::Result<usize>,
    stopped: &dyn Fn() -> bool,
) -> std::result::Result<usize, WriteEnd> {
    loop {
        match write() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                if stopped() {
                    return Err(WriteEnd::Stopped);
                }
            }
            Err(e) => return Err(WriteEnd::Io(e)),
            Ok(0) => return Err(WriteEnd::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => return Ok(n),
        }
    }
}

impl Shared {
    /// Tells `peer` that this rank asks nothing more of it; shuts the writer down if the peer
    /// said the same already. Idempotent.
    fn say_bye(&self, peer: usize) {
        let mut guard = self.writers[peer].lock().unwrap_or_else(|p| p.into_inner());
        if self.bye_sent[peer].swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(s) = guard.as_mut() {
            let hdr = Frame::new(Kind::Bye).encode();
            let stopped = || self.must_stop_writing();
            if write_all_parts(s, &hdr, &[], &stopped).is_err() {
                self.shutdown_link(peer);
            }
            // SeqCst pair with `peer_said_bye`: the goodbye flag is stored there before the
            // writer lock is taken, so one of the two sees both goodbyes and shuts down.
            if self.departed[peer].load(Ordering::SeqCst) {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }

    /// The peer's goodbye arrived: it asks nothing more of this rank.
    fn peer_said_bye(&self, peer: usize) {
        self.departed[peer].store(true, Ordering::SeqCst);
        let guard = self.writers[peer].lock().unwrap_or_else(|p| p.into_inner());
        if self.bye_sent[peer].load(Ordering::SeqCst) {
            if let Some(s) = guard.as_ref() {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
        drop(guard);
        self.notify();
    }

    /// The peer's stream ended after its goodbye: nothing more will come from it.
    fn link_finished(&self, peer: usize) {
        self.finished[peer].store(true, Ordering::SeqCst);
        self.closed[peer].store(true, Ordering::SeqCst);
        self.notify();
    }
}

/// Writes a header and its payload (`stopped` as in [`retrying`]).
fn write_all_vectored(
    s: &mut TcpStream,
    hdr: &[u8],
    payload: &[u8],
    stopped: &dyn Fn() -> bool,
) -> std::result::Result<(), WriteEnd> {
    if payload.len() <= 256 {
        // A small frame goes out in one plain write (cheaper than a two-part writev).
        let mut one = [0u8; HDR + 256];
        one[..hdr.len()].copy_from_slice(hdr);
        one[hdr.len()..hdr.len() + payload.len()].copy_from_slice(payload);
        return write_all_parts(s, &one[..hdr.len() + payload.len()], &[], stopped);
    }
    let total = hdr.len() + payload.len();
    let mut done = 0;
    while done < total {
        done += if done < hdr.len() {
            retrying(
                || s.write_vectored(&[IoSlice::new(&hdr[done..]), IoSlice::new(payload)]),
                stopped,
            )?
        } else {
            retrying(|| s.write(&payload[done - hdr.len()..]), stopped)?
        };
    }
    Ok(())
}

/// Writes the header and then every part, however the socket splits the writes
/// (`stopped` as in [`retrying`]).
fn write_all_parts(
    s: &mut TcpStream,
    hdr: &[u8],
    parts: &[&[u8]],
    stopped: &dyn Fn() -> bool,
) -> std::result::Result<(), WriteEnd> {
    let mut slices: SmallVec<[IoSlice; 8]> = std::iter::once(hdr)
        .chain(parts.iter().copied())
        .filter(|p| !p.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = retrying(|| s.write_vectored(rest), stopped)?;
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Consecutive byte ranges of a list of parts, taken front to back.
struct Pieces<'a> {
    parts: &'a [&'a [u8]],
    /// Bytes of `parts[0]` already taken.
    at: usize,
}

impl<'a> Pieces<'a> {
    fn new(parts: &'a [&'a [u8]]) -> Self {
        Pieces { parts, at: 0 }
    }

    /// The next `len` bytes (fewer if the parts run out), as slices of the parts.
    fn take(&mut self, mut len: usize) -> SmallVec<[&'a [u8]; 4]> {
        let mut out = SmallVec::new();
        while len > 0 {
            let Some((first, rest)) = self.parts.split_first() else {
                break;
            };
            let piece = &first[self.at..];
            let n = piece.len().min(len);
            out.push(&piece[..n]);
            len -= n;
            self.at += n;
            if self.at == first.len() {
                self.parts = rest;
                self.at = 0;
            }
        }
        out
    }
}

/// A node whose listener is bound but whose links are not up yet.
pub struct Listening {
    cfg: Config,
    listener: TcpListener,
}

impl Listening {
    /// Binds the listener (publish [`Listening::local_addr`] to the peers).
    pub fn bind(cfg: Config) -> Result<Self> {
        if cfg.rank >= cfg.world || cfg.num_signals == 0 || cfg.secret.is_empty() {
            return Err(Error::Invalid(format!(
                "rank {} of {}, {} signals, secret of {} bytes",
                cfg.rank,
                cfg.world,
                cfg.num_signals,
                cfg.secret.len()
            )));
        }
        let listener = TcpListener::bind(cfg.bind)
            .map_err(|e| Error::io(format!("binding {}", cfg.bind), e))?;
        Ok(Listening { cfg, listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))
    }

    /// Collective: connects to every peer (`addrs[r]` is rank r's listener; this rank's
    /// entry is ignored), authenticating each link, and starts the progress threads.
    pub fn connect(self, addrs: &[SocketAddr], deadline: Instant) -> Result<Node> {
        let cfg = self.cfg.clone();
        let (me, n) = (cfg.rank, cfg.world);
        if addrs.len() != n {
            return Err(Error::Invalid(format!(
                "{} addresses for {n} ranks",
                addrs.len()
            )));
        }
        let shared = Arc::new(Shared {
            signals: Signals::new(cfg.num_signals),
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
        });
        let mut threads = Vec::new();
        // Acceptor: authenticates every incoming connection; links of the mesh go to setup,
        // anything else (duplicates, late or rogue clients) is refused.
        let (tx, rx) = mpsc::channel::<(usize, TcpStream)>();
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("listener", e))?;
        let acc_shared = shared.clone();
        let listener = self.listener;
        threads.push(
            std::thread::Builder::new()
                .name(format!("xccl-tcp-accept-{me}"))
                .spawn(move || accept_loop(listener, acc_shared, tx))
                .map_err(|e| Error::io("spawning the acceptor", e))?,
        );
        let mut links: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        for (peer, link) in links.iter_mut().enumerate().take(me) {
            *link = Some(connect_to(&shared.cfg, peer, addrs[peer], deadline)?);
        }
        let mut missing = n - me - 1;
        while missing > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((peer, s)) if peer > me && links[peer].is_none() => {
                    links[peer] = Some(s);
                    missing -= 1;
                }
                Ok(_) => {}
                Err(_) => {
                    shared.stop.store(true, Ordering::SeqCst);
                    return Err(Error::Timeout(format!(
                        "rank {me} waiting for {missing} higher ranks to connect"
                    )));
                }
            }
        }
        drop(rx); // later connections are refused
        for (peer, link) in links.into_iter().enumerate() {
            let Some(s) = link else { continue };
            let _ = s.set_nodelay(true);
            let reader = s.try_clone().map_err(|e| Error::io("cloning a link", e))?;
            let _ = reader.set_read_timeout(Some(shared.cfg.heartbeat));
            // Blocked writes wake this often to see whether they were interrupted.
            s.set_write_timeout(Some(WRITE_SLICE))
                .map_err(|e| Error::io("send timeout of a link", e))?;
            *shared.writers[peer]
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(s);
            shared.rx_fd[peer].store(reader.as_raw_fd(), Ordering::Relaxed);
            *shared.rx[peer].lock().unwrap_or_else(|p| p.into_inner()) = Some(RxLink::new(reader));
            shared.last_recv[peer].store(shared.now_us(), Ordering::Relaxed);
            let sh = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("xccl-tcp-{me}<{peer}"))
                    .spawn(move || progress(sh, peer))
                    .map_err(|e| Error::io("spawning a progress thread", e))?,
            );
        }
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("xccl-tcp-beat-{me}"))
                .spawn(move || heartbeat(sh))
                .map_err(|e| Error::io("spawning the heartbeat", e))?,
        );
        Ok(Node { shared, threads })
    }
}

fn connect_to(cfg: &Config, peer: usize, addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(2);
    loop {
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| Error::io(format!("connecting to rank {peer} at {addr}"), e))
            .and_then(|mut s| {
                let _ = s.set_nodelay(true);
                auth::connect(
                    &mut s,
                    &cfg.secret,
                    cfg.rank as u32,
                    cfg.world as u32,
                    peer as u32,
                )?;
                Ok(s)
            });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e @ Error::Protocol(_)) => return Err(e),
            Err(e) if Instant::now() + backoff >= deadline => return Err(e),
            Err(_) => {
                std::thread::sleep(backoff); // retry pacing while the peer starts listening
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Handshakes in progress at once beyond which new connections are closed unread.
fn handshake_limit(world: usize) -> usize {
    (2 * world).max(16)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tx: mpsc::Sender<(usize, TcpStream)>) {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let limit = handshake_limit(shared.cfg.world);
    let mut backoff = Duration::from_millis(5);
    // Handshake threads, joined before the loop returns (each ends by the handshake's own
    // deadline), so the node leaves no thread behind.
    let mut auth_threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        // Ended handshakes are joined as they go (their stacks go with them).
        let mut i = 0;
        while i < auth_threads.len() {
            if auth_threads[i].is_finished() {
                let _ = auth_threads.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
        match listener.accept() {
            Ok((s, from)) => {
                backoff = Duration::from_millis(5);
                if handshakes.fetch_add(1, Ordering::SeqCst) >= limit {
                    handshakes.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(rank = shared.cfg.rank, %from, "xccl-tcp: too many handshakes at once; connection closed");
                    continue; // dropping `s` closes it
                }
                let (sh, tx, busy) = (shared.clone(), tx.clone(), handshakes.clone());
                let spawned = std::thread::Builder::new().name("xccl-tcp-auth".into()).spawn(move || {
                    let mut s = s;
                    let _ = s.set_nonblocking(false);
                    let cfg = &sh.cfg;
                    let r = auth::accept(&mut s, &cfg.secret, cfg.rank as u32, cfg.world as u32);
                    busy.fetch_sub(1, Ordering::SeqCst);
                    match r {
                        Ok(peer) => {
                            if tx.send((peer as usize, s)).is_err() {
                                tracing::warn!(rank = cfg.rank, %from, peer, "xccl-tcp: refused a late connection");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(rank = cfg.rank, %from, error = %e, "xccl-tcp: refused a connection");
                        }
                    }
                });
                match spawned {
                    Ok(h) => auth_threads.push(h),
                    Err(_) => {
                        handshakes.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; a 50 ms timeout bounds how late `stop` is seen.
                unsafe { libc::poll(&mut p, 1, 50) };
            }
            Err(e) => {
                // Out of descriptors or memory: the connection stays queued, so retrying at
                // once would spin. Back off, and say so.
                tracing::warn!(rank = shared.cfg.rank, error = %e, "xccl-tcp: accept failed; backing off");
                std::thread::sleep(backoff); // pacing of retries after an error
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
    for h in auth_threads {
        let _ = h.join();
    }
}

enum ReadEnd {
    Eof,
    Err(std::io::Error),
}

/// Reads exactly `buf.len()` bytes. Bytes do not count as liveness (whole frames do, in `drain`), but a read that gets no byte for the peer
/// timeout, or whose peer was declared failed meanwhile, gives up.
fn read_exact_timed(
    s: &mut TcpStream,
    buf: &mut [u8],
    sh: &Shared,
) -> std::result::Result<(), ReadEnd> {
    let mut got = 0;
    // Poll without blocking first (bytes of a frame in flight arrive within microseconds;
    // sleeping in `read` and being woken costs far more on a virtual machine), then block.
    let mut spin_since: Option<Instant> = None;
    let mut last_byte = Instant::now();
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: reads at most `rest.len()` bytes into the live buffer.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                rest.as_mut_ptr() as *mut libc::c_void,
                rest.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            got += n as usize;
            spin_since = None;
            last_byte = Instant::now();
            continue;
        }
        if n == 0 {
            return Err(ReadEnd::Eof);
        }
        let since = *spin_since.get_or_insert_with(Instant::now);
        if since.elapsed() < READ_SPIN {
            std::hint::spin_loop();
            continue;
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadEnd::Eof),
            Ok(k) => {
                got += k;
                last_byte = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last_byte.elapsed() > sh.cfg.peer_timeout || sh.stop.load(Ordering::SeqCst) {
                    return Err(ReadEnd::Err(e));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadEnd::Err(e)),
        }
    }
    Ok(())
}

/// How long a reader polls a link without blocking before it sleeps in `read`.
const READ_SPIN: Duration = Duration::from_micros(100);

/// Receiving side of a link: the socket and a staging buffer. Small frames (header and
/// payload) arrive with one `recv`; a payload larger than what the staging buffer holds is
/// read from the socket straight into its region.
struct RxLink {
    s: TcpStream,
    scratch: Vec<u8>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

const STAGING: usize = 64 << 10;

impl RxLink {
    fn new(s: TcpStream) -> Self {
        RxLink {
            s,
            scratch: Vec::new(),
            buf: vec![0u8; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads whatever is waiting into the staging buffer without blocking. `Ok(false)` when
    /// nothing was there.
    fn fill_nonblocking(&mut self) -> std::result::Result<bool, ReadEnd> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = &mut self.buf[self.end..];
        // SAFETY: reads at most `room.len()` bytes into the live staging buffer.
        let n = unsafe {
            libc::recv(
                self.s.as_raw_fd(),
                room.as_mut_ptr() as *mut libc::c_void,
                room.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Err(ReadEnd::Eof),
            n if n > 0 => {
                self.end += n as usize;
                Ok(true)
            }
            _ => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(false),
                    _ => Err(ReadEnd::Err(e)),
                }
            }
        }
    }

    /// Whether `f` (its header at the front of the staging buffer) has arrived whole: its
    /// payload is staged or waiting in the socket.
    fn whole(&self, f: &Frame) -> bool {
        let payload = match f.kind {
            Kind::Write | Kind::ReadResp => f.len as usize,
            _ => 0,
        };
        let staged = self.end - self.start - HDR;
        if staged >= payload {
            return true;
        }
        let mut waiting: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; the socket is open while the link lives.
        let rc = unsafe { libc::ioctl(self.s.as_raw_fd(), libc::FIONREAD, &mut waiting) };
        rc == 0 && staged + waiting.max(0) as usize >= payload
    }

    /// Fills `dst` from the staging buffer, then (blocking) from the socket.
    fn read_into(&mut self, dst: &mut [u8], sh: &Shared) -> Result<()> {
        let have = (self.end - self.start).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        if have < dst.len() {
            read_exact_timed(&mut self.s, &mut dst[have..], sh).map_err(|e| match e {
                ReadEnd::Err(e) => Error::io("reading a payload", e),
                _ => Error::Protocol("link closed inside a frame".into()),
            })?;
        }
        Ok(())
    }
}

/// Reads and applies every frame already waiting on `peer`'s link. `false` once the link is
/// finished (its stream ended, or it failed). With `may_block` false (a caller that polls the
/// links while it waits), a frame not yet whole is left for the progress thread: a caller
/// never blocks inside a frame past its own deadline.
fn drain(sh: &Shared, peer: usize, link: &mut RxLink, may_block: bool) -> bool {
    let fail = |why: String| {
        sh.fail(peer, &why);
        sh.closed[peer].store(true, Ordering::SeqCst);
        false
    };
    // The end of a stream after the peer's goodbye is the orderly end of the link.
    let ended = |why: String| {
        if sh.departed[peer].load(Ordering::SeqCst) {
            sh.link_finished(peer);
            false
        } else {
            fail(why)
        }
    };
    loop {
        if link.end - link.start < HDR {
            match link.fill_nonblocking() {
                Ok(true) => continue,
                Ok(false) if link.end == link.start || !may_block => return true,
                Ok(false) => {
                    // Part of a header is here: the rest is on its way; wait for it.
                    let mut hdr = [0u8; HDR];
                    if let Err(e) = link.read_into(&mut hdr, sh) {
                        return fail(e.to_string());
                    }
                    link.buf[..HDR].copy_from_slice(&hdr);
                    link.start = 0;
                    link.end = HDR;
                }
                Err(ReadEnd::Eof) => return ended("connection closed".into()),
                Err(ReadEnd::Err(e)) => return ended(format!("connection error: {e}")),
            }
        }
        let mut hdr = [0u8; HDR];
        hdr.copy_from_slice(&link.buf[link.start..link.start + HDR]);
        let frame = match Frame::decode(&hdr, sh.cfg.max_frame) {
            Ok(f) => f,
            Err(e) => return fail(e.to_string()),
        };
        if !may_block && !link.whole(&frame) {
            return true;
        }
        link.start += HDR;
        match apply(sh, peer, link, &frame) {
            Ok(()) => {
                // A whole frame: the peer is alive.
                sh.last_recv[peer].store(sh.now_us(), Ordering::Relaxed);
                // Staging empty: return rather than spend another system call to learn that
                // nothing more is there (the caller polls again anyway).
                if link.start == link.end {
                    return true;
                }
            }
            Err(e) => return fail(e.to_string()),
        }
    }
}

/// Marks a caller as polling the links for as long as it lives.
struct Polling<'a>(&'a Shared);

impl<'a> Polling<'a> {
    fn new(sh: &'a Shared) -> Self {
        // SeqCst with its partner in `progress` (`in_poll` raised, then `pollers` read): either
        // the progress thread sees this caller and keeps out of `poll`, or this caller sees
        // the thread about to poll and kicks it out.
        if sh.pollers.fetch_add(1, Ordering::SeqCst) == 0 && sh.in_poll.load(Ordering::SeqCst) > 0 {
            sh.kicked.store(true, Ordering::SeqCst);
            eventfd_add(&sh.kick);
        }
        Polling(sh)
    }
}

impl Polling<'_> {
    /// Stops polling and hands the links back to the progress threads at once (before the
    /// caller goes to sleep and relies on them).
    fn hand_back(self) {
        let sh = self.0;
        drop(self);
        if sh.pollers.load(Ordering::SeqCst) == 0 {
            let _g = sh.poll_gate.lock().unwrap_or_else(|p| p.into_inner());
            sh.poll_cv.notify_all();
        }
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        // No wake-up here: a caller that got what it waited for will likely poll again soon;
        // the progress threads look again within a millisecond anyway. The last poller out
        // rearms the kick.
        if self.0.pollers.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.kicked.swap(false, Ordering::SeqCst)
        {
            eventfd_clear(&self.0.kick);
        }
    }
}

fn new_eventfd() -> Result<OwnedFd> {
    // SAFETY: plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("eventfd", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn eventfd_add(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd (non-blocking; a full counter
    // only means it is readable already).
    let _ = unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

fn eventfd_clear(fd: &OwnedFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from an eventfd (non-blocking; nothing to read
    // means it is clear already).
    let _ = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// Drains every link nobody else is reading right now (for callers that wait anyway).
fn try_progress_all(sh: &Shared) {
    for peer in 0..sh.cfg.world {
        if peer == sh.cfg.rank || sh.closed[peer].load(Ordering::Relaxed) {
            continue;
        }
        if let Ok(mut g) = sh.rx[peer].try_lock() {
            if let Some(link) = g.as_mut() {
                // A finished link stays in place (marked closed) so that its descriptor
                // lives as long as the node: the liveness check may still look at it.
                drain(sh, peer, link, false);
            }
        }
    }
}

/// The progress thread of one link: sleeps in `poll` until frames arrive and applies them
/// (unless a waiting caller already did), until the link ends.
fn progress(sh: Arc<Shared>, peer: usize) {
    let fd = match sh.rx[peer]
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        Some(l) => l.s.as_raw_fd(),
        None => return,
    };
    let slice = sh
        .cfg
        .heartbeat
        .min(Duration::from_millis(50))
        .as_millis()
        .max(1) as i32;
    loop {
        if sh.stop.load(Ordering::SeqCst) || sh.closed[peer].load(Ordering::SeqCst) {
            return;
        }
        // Partner of `Polling::new`: raised before `pollers` is read.
        sh.in_poll.fetch_add(1, Ordering::SeqCst);
        if sh.pollers.load(Ordering::SeqCst) > 0 {
            sh.in_poll.fetch_sub(1, Ordering::SeqCst);
            let mut g = sh.poll_gate.lock().unwrap_or_else(|p| p.into_inner());
            while sh.pollers.load(Ordering::SeqCst) > 0 && !sh.stop.load(Ordering::SeqCst) {
                g = sh
                    .poll_cv
                    .wait_timeout(g, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            continue;
        }
        let mut p = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sh.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; the link's descriptor and the eventfd stay open for the
        // node's life (links are never dropped before the node).
        let rc = unsafe { libc::poll(p.as_mut_ptr(), 2, slice) };
        sh.in_poll.fetch_sub(1, Ordering::SeqCst);
        // When kicked (a caller polls now), the link is left to the caller.
        if rc > 0 && p[0].revents != 0 && sh.pollers.load(Ordering::SeqCst) == 0 {
            let mut g = sh.rx[peer].lock().unwrap_or_else(|p| p.into_inner());
            if let Some(link) = g.as_mut() {
                if !drain(&sh, peer, link, true) {
                    return;
                }
            }
        }
    }
}

/// Applies one frame (a goodbye too: the link is read on to the end of its stream).
fn apply(sh: &Shared, peer: usize, link: &mut RxLink, f: &Frame) -> Result<()> {
    let signal = |idx: u64, set: bool, v: u64| -> Result<()> {
        if idx >= sh.signals.len() as u64 {
            return Err(Error::Protocol(format!(
                "signal index {idx} of {}",
                sh.signals.len()
            )));
        }
        sh.signals.apply(idx as usize, set, v);
        Ok(())
    };
    match f.kind {
        Kind::Write => {
            let region = sh.region(f.region);
            match region {
                Some(r) => {
                    r.check(f.offset, f.len)?;
                    // SAFETY: the range was checked against the region, which the Arc keeps
                    // alive; peers write a region only under the protocol's rules.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            r.as_ptr().add(f.offset as usize),
                            f.len as usize,
                        )
                    };
                    link.read_into(dst, sh)?;
                }
                None => {
                    // A region this rank has deregistered: drain the bytes, keep the link.
                    let mut scratch = std::mem::take(&mut link.scratch);
                    scratch.resize(f.len as usize, 0);
                    let r = link.read_into(&mut scratch, sh);
                    link.scratch = scratch;
                    r?;
                }
            }
            if f.flags & FLAG_SIGNAL != 0 {
                signal(f.a, f.flags & FLAG_SET != 0, f.b)?;
            }
        }
        Kind::Signal => signal(f.a, f.flags & FLAG_SET != 0, f.b)?,
        Kind::ReadReq => {
            let region = sh.region(f.region);
            let r = region
                .ok_or_else(|| Error::Protocol(format!("read of unknown region {}", f.region)))?;
            r.check(f.offset, f.len)?;
            if f.len > sh.cfg.max_frame {
                return Err(Error::Protocol(format!(
                    "read of {} bytes exceeds the frame cap",
                    f.len
                )));
            }
            // SAFETY: range checked; a raw view of region memory for the duration of the send.
            let src = unsafe {
                std::slice::from_raw_parts(r.as_ptr().add(f.offset as usize), f.len as usize)
            };
            let mut resp = Frame::new(Kind::ReadResp);
            resp.len = f.len;
            resp.a = f.a;
            sh.send(peer, &resp, src)?;
        }
        Kind::ReadResp => {
            let mut pending = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get_mut(&f.a) {
                Some(p) if p.len as u64 == f.len => {
                    // SAFETY: the reader waits until `done` (or removes the entry, which it
                    // cannot while we hold the lock), so the buffer is live and exclusive.
                    let dst = unsafe { std::slice::from_raw_parts_mut(p.ptr, p.len) };
                    link.read_into(dst, sh)?;
                    p.done = true;
                    sh.changed.notify_all();
                }
                Some(p) => {
                    return Err(Error::Protocol(format!(
                        "read answer of {} bytes for a {}-byte read",
                        f.len, p.len
                    )))
                }
                None => {
                    drop(pending);
                    let mut scratch = std::mem::take(&mut link.scratch);
                    scratch.resize(f.len as usize, 0);
                    let r = link.read_into(&mut scratch, sh);
                    link.scratch = scratch;
                    r?;
                }
            }
        }
        Kind::Flush => {
            let mut ack = Frame::new(Kind::FlushAck);
            ack.a = f.a;
            sh.send(peer, &ack, &[])?;
        }
        Kind::FlushAck => {
            sh.flushed[peer].fetch_max(f.a, Ordering::SeqCst);
            sh.notify();
        }
        Kind::Heartbeat => {}
        Kind::Abort => {
            let _ =
                sh.aborted
                    .compare_exchange(0, peer as u64 + 1, Ordering::SeqCst, Ordering::SeqCst);
            sh.notify();
        }
        Kind::Reg => {
            sh.regs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((peer, f.region), f.len);
            sh.notify();
        }
        Kind::Bye => sh.peer_said_bye(peer),
    }
    Ok(())
}

/// Sends heartbeats on links idle for `heartbeat` and declares silent peers failed. Silence is
/// counted only while this rank itself runs and only when nothing from the peer waits unread:
/// a live peer is never declared dead because this rank was starved of the CPU.
fn heartbeat(sh: Arc<Shared>) {
    let every = sh.cfg.heartbeat;
    let tick = every / 2;
    let mut last_tick = sh.now_us();
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick); // the heartbeat's own pace
        let now = sh.now_us();
        if Duration::from_micros(now.saturating_sub(last_tick)) > sh.cfg.peer_timeout / 2 {
            // This thread did not run for a long while: the machine is overloaded, and what
            // the peers sent meanwhile may not have been read yet. Start counting again.
            for t in &sh.last_recv {
                t.fetch_max(now, Ordering::Relaxed);
            }
        }
        for peer in (0..sh.cfg.world).filter(|&p| p != sh.cfg.rank) {
            sh.check_silence(peer, now);
            let idle = now.saturating_sub(sh.last_sent[peer].load(Ordering::Relaxed));
            if Duration::from_micros(idle) >= every {
                sh.beat(peer);
            }
        }
        last_tick = sh.now_us();
    }
}

impl Shared {
    /// Declares `peer` failed if it has been silent past the peer timeout (a peer that said
    /// goodbye sends nothing more and is not watched).
    fn check_silence(&self, peer: usize, now: u64) {
        if self.departed[peer].load(Ordering::SeqCst) || self.closed[peer].load(Ordering::SeqCst) {
            return;
        }
        let silent = now.saturating_sub(self.last_recv[peer].load(Ordering::Relaxed));
        if Duration::from_micros(silent) <= self.cfg.peer_timeout {
            return;
        }
        if self.unread_bytes(peer) > 0 {
            // The peer did send; this rank has not read it yet.
            self.last_recv[peer].fetch_max(now, Ordering::Relaxed);
            return;
        }
        self.fail(peer, &format!("silent for {} ms", silent / 1000));
    }

    /// Bytes from `peer` waiting in the socket, unread.
    fn unread_bytes(&self, peer: usize) -> usize {
        let fd = self.rx_fd[peer].load(Ordering::Relaxed);
        if fd < 0 {
            return 0;
        }
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; `fd` is the link's socket, open for the node's life.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        if rc == 0 {
            n.max(0) as usize
        } else {
            0
        }
    }
}

/// A connected rank.
pub struct Node {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Node {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.shared.cfg.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.shared.cfg.world
    }

    /// Signal words of this rank.
    pub fn num_signals(&self) -> usize {
        self.shared.signals.len()
    }

    fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.num_signals() {
            return Err(Error::Invalid(format!(
                "signal index {index} >= {}",
                self.num_signals()
            )));
        }
        Ok(())
    }

    /// Fails once the node is interrupted (abort, failed peer) or closed: what every operation
    /// checks first, also those that stay inside this rank.
    pub fn check_open(&self) -> Result<()> {
        if let Some(e) = self.shared.interrupted() {
            return Err(e);
        }
        if self.shared.closing.load(Ordering::SeqCst) {
            return Err(Error::Closed(format!(
                "rank {} has closed its node",
                self.rank()
            )));
        }
        Ok(())
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.world() {
            return Err(Error::Invalid(format!(
                "peer rank {peer} >= world size {}",
                self.world()
            )));
        }
        self.check_open()?;
        // A peer that said goodbye still applies what this rank sends until this rank says
        // goodbye too; one whose stream has ended is gone.
        if peer != self.rank() && self.shared.finished[peer].load(Ordering::SeqCst) {
            return Err(Error::PeerFailed {
                rank: peer,
                detail: "it left the job".into(),
            });
        }
        Ok(())
    }

    fn region(&self, id: u64) -> Result<Arc<Region>> {
        self.shared
            .region(id)
            .ok_or_else(|| Error::Invalid(format!("region {id} is not registered")))
    }

    /// Registers region `id` of `len` bytes here and announces it to every peer. When the
    /// memory cannot be had, the peers are told so ([`REG_FAILED`] as the length) before the
    /// error returns, so that they fail too instead of waiting.
    pub fn register(&self, id: u64, len: usize) -> Result<Arc<Region>> {
        let region = Region::new(len).map(Arc::new);
        let mut f = Frame::new(Kind::Reg);
        f.region = id;
        f.len = if region.is_ok() {
            len as u64
        } else {
            REG_FAILED
        };
        if let Ok(r) = &region {
            self.shared
                .regions
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, r.clone());
        }
        for peer in (0..self.world()).filter(|&p| p != self.rank()) {
            self.shared.send(peer, &f, &[])?;
        }
        region
    }

    /// Waits until every peer has announced region `id`; returns each rank's length.
    pub fn peers_registered(&self, id: u64, len: usize, deadline: Instant) -> Result<Vec<u64>> {
        let me = self.rank();
        let mut regs = self.shared.regs.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let all = (0..self.world()).all(|p| p == me || regs.contains_key(&(p, id)));
            if all {
                return Ok((0..self.world())
                    .map(|p| {
                        if p == me {
                            len as u64
                        } else {
                            regs.remove(&(p, id)).expect("present")
                        }
                    })
                    .collect());
            }
            if let Some(e) = self.shared.interrupted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "waiting for every rank to register region {id}"
                )));
            }
            let g = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            drop(regs);
            let _ = self
                .shared
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(20)));
            regs = self.shared.regs.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Drops this rank's region `id` (later writes to it are drained and ignored).
    pub fn deregister(&self, id: u64) -> bool {
        self.shared
            .regions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .is_some()
    }

    /// One-sided write of `data` into `peer`'s region `id` at `offset`, then, if given, a
    /// signal that the peer observes after the data.
    pub fn write(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        data: &[u8],
        signal: Option<(usize, SignalOp, u64)>,
    ) -> Result<()> {
        self.write_parts(peer, id, offset, &[data], signal)
    }

    /// [`Node::write`] of `parts` laid end to end from `offset`: the pieces go out together,
    /// in frames of at most `max_frame` bytes, without being copied into one buffer first.
    pub fn write_parts(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        parts: &[&[u8]],
        signal: Option<(usize, SignalOp, u64)>,
    ) -> Result<()> {
        self.check_peer(peer)?;
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if peer == self.rank() {
            let r = self.region(id)?;
            r.check(offset, total)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let mut at = offset as usize;
            for part in parts {
                // SAFETY: the whole range was checked; `part` may alias the region, so an
                // overlap-safe copy.
                unsafe { std::ptr::copy(part.as_ptr(), r.as_ptr().add(at), part.len()) };
                at += part.len();
            }
            if let Some((i, op, v)) = signal {
                self.signal(peer, i, op, v)?;
            }
            return Ok(());
        }
        let cap = self.shared.cfg.max_frame.max(1);
        let mut pieces = Pieces::new(parts);
        let mut sent = 0u64;
        loop {
            let len = (total - sent).min(cap);
            let mut f = Frame::new(Kind::Write);
            f.region = id;
            f.offset = offset + sent;
            f.len = len;
            sent += len;
            if sent == total {
                if let Some((i, op, v)) = signal {
                    f.flags = FLAG_SIGNAL | if op == SignalOp::Set { FLAG_SET } else { 0 };
                    f.a = i as u64;
                    f.b = v;
                }
            }
            self.shared
                .send_parts(peer, &f, &pieces.take(len as usize))?;
            if sent == total {
                return Ok(());
            }
        }
    }

    /// Updates signal word `index` of `peer`.
    pub fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        self.check_peer(peer)?;
        self.check_index(index)?;
        if peer == self.rank() {
            self.shared.signals.apply(index, op == SignalOp::Set, value);
            return Ok(());
        }
        let mut f = Frame::new(Kind::Signal);
        f.flags = if op == SignalOp::Set { FLAG_SET } else { 0 };
        f.a = index as u64;
        f.b = value;
        self.shared.send(peer, &f, &[])
    }

    /// One-sided read of `out.len()` bytes of `peer`'s region `id` at `offset`.
    pub fn read(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        out: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.check_peer(peer)?;
        if peer == self.rank() {
            let r = self.region(id)?;
            r.check(offset, out.len() as u64)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            // SAFETY: range checked; `out` may alias the region, so an overlap-safe copy.
            unsafe { std::ptr::copy(r.as_ptr().add(offset as usize), out.as_mut_ptr(), out.len()) };
            return Ok(());
        }
        let cap = self.shared.cfg.max_frame.max(1) as usize;
        for (k, chunk) in out.chunks_mut(cap).enumerate() {
            let req = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending.insert(
                req,
                Pending {
                    ptr: chunk.as_mut_ptr(),
                    len: chunk.len(),
                    done: false,
                },
            );
            drop(pending);
            let mut f = Frame::new(Kind::ReadReq);
            f.region = id;
            f.offset = offset + (k * cap) as u64;
            f.len = chunk.len() as u64;
            f.a = req;
            // A failed send is already `PeerFailed`: a get from a dead peer says so.
            let sent = self.shared.send(peer, &f, &[]);
            let result = sent.and_then(|()| {
                self.await_done(
                    |p| p.get(&req).is_some_and(|p| p.done),
                    deadline,
                    || format!("reading {} bytes from rank {peer}", chunk.len()),
                )
            });
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req);
            result?;
        }
        Ok(())
    }

    /// Returns once every earlier write to `peer` has been applied there.
    pub fn flush(&self, peer: usize, deadline: Instant) -> Result<()> {
        self.check_peer(peer)?;
        if peer == self.rank() {
            return Ok(());
        }
        let req = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
        let mut f = Frame::new(Kind::Flush);
        f.a = req;
        self.shared.send(peer, &f, &[])?;
        self.await_done(
            |_| self.shared.flushed[peer].load(Ordering::SeqCst) >= req,
            deadline,
            || format!("flushing rank {peer}"),
        )
    }

    /// Polls the links, then sleeps on the progress threads' notifications, until `done`
    /// (checked under the pending-read lock) holds, the node is interrupted, or `deadline`.
    fn await_done(
        &self,
        done: impl Fn(&HashMap<u64, Pending>) -> bool,
        deadline: Instant,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let locked = || {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        self.poll_until(|| done(&locked()));
        let mut g = locked();
        loop {
            if done(&g) {
                return Ok(());
            }
            if let Some(e) = self.shared.interrupted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(what()));
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Polls the links in this thread until `done` holds or the polling budget is spent.
    fn poll_until(&self, done: impl Fn() -> bool) {
        let _polling = Polling::new(&self.shared);
        let start = Instant::now();
        while !done()
            && self.shared.interrupted().is_none()
            && start.elapsed() < self.shared.cfg.poll
        {
            try_progress_all(&self.shared);
        }
    }

    /// Current value of this rank's signal word `index`.
    pub fn signal_value(&self, index: usize) -> Result<u64> {
        self.check_index(index)?;
        Ok(self.shared.signals.load(index))
    }

    /// Waits until `pred(value)` holds for signal word `index`.
    pub fn wait(&self, index: usize, pred: impl Fn(u64) -> bool, deadline: Instant) -> Result<u64> {
        self.check_index(index)?;
        self.wait_word(index, pred, deadline)
    }

    /// How many signals this rank has applied (its peers' and its own), ever.
    pub fn arrivals(&self) -> u64 {
        self.shared.signals.load(self.shared.signals.arrivals())
    }

    /// Waits until more than `seen` signals have been applied here.
    pub fn wait_arrivals(&self, seen: u64, deadline: Instant) -> Result<u64> {
        self.wait_word(self.shared.signals.arrivals(), |v| v > seen, deadline)
    }

    fn wait_word(
        &self,
        index: usize,
        pred: impl Fn(u64) -> bool,
        deadline: Instant,
    ) -> Result<u64> {
        if let Some(e) = self.shared.interrupted() {
            return Err(e);
        }
        // Poll the links in this thread for a while (no wake-up of another thread on the
        // critical path), then sleep while the progress threads apply what arrives.
        let start = Instant::now();
        let mut n = 0u32;
        let polling = Polling::new(&self.shared);
        loop {
            let v = self.shared.signals.load(index);
            if pred(v) {
                return Ok(v);
            }
            try_progress_all(&self.shared);
            n += 1;
            if n % 16 == 0 {
                if let Some(e) = self.shared.interrupted() {
                    return Err(e);
                }
                let now = Instant::now();
                if now >= deadline || now - start >= self.shared.cfg.poll {
                    break;
                }
            }
        }
        polling.hand_back();
        match self
            .shared
            .signals
            .wait_until(index, pred, deadline, Duration::ZERO, || {
                self.shared.interrupted()
            }) {
            Outcome::Ready(v) => Ok(v),
            Outcome::Interrupted(e) => Err(e),
            Outcome::TimedOut(v) => Err(Error::Timeout(format!(
                "waiting on signal {index} (last seen {v})"
            ))),
        }
    }

    /// Fails every pending and future operation here and on the peers with `Aborted`.
    pub fn abort(&self) {
        let _ = self.shared.aborted.compare_exchange(
            0,
            self.rank() as u64 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        // Waiters here learn of it at once; then each peer, on links nobody is writing to
        // (a busy writer sends it after its frame, or gives up if its peer does not read).
        self.shared.notify();
        for peer in (0..self.world()).filter(|&p| p != self.rank()) {
            if let Ok(mut g) = self.shared.writers[peer].try_lock() {
                if let Some(s) = g.as_mut() {
                    self.shared.send_abort(peer, s);
                }
            }
        }
        self.shared.notify();
    }

    /// Whether abort was called here or by a peer.
    pub fn is_aborted(&self) -> bool {
        self.shared.aborted.load(Ordering::SeqCst) != 0
    }
}

impl Node {
    /// Collective orderly end: says goodbye to every peer (this rank asks nothing more of
    /// anyone), keeps applying what peers still send, and returns once every peer has said
    /// goodbye and its stream has ended. Fails with `PeerFailed` if a peer died first,
    /// `Aborted` after an abort, `Timeout` at `deadline`. Later operations fail with
    /// [`Error::Closed`]. Idempotent.
    pub fn close(&self, deadline: Instant) -> Result<()> {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        let others = || (0..self.world()).filter(|&p| p != self.rank());
        for peer in others() {
            sh.say_bye(peer);
        }
        let mut g = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let waiting: Vec<usize> = others()
                .filter(|&p| !sh.finished[p].load(Ordering::SeqCst))
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if let Some(e) = sh.interrupted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "closing: ranks {waiting:?} have not closed"
                )));
            }
            // `link_finished` and `fail` notify under this lock.
            g = sh
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Node {
    /// Without [`Node::close`], says goodbye and leaves at once: peers still sending to this
    /// rank then see it as gone.
    fn drop(&mut self) {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        for peer in (0..sh.cfg.world).filter(|&p| p != sh.cfg.rank) {
            sh.say_bye(peer);
        }
        sh.stop.store(true, Ordering::SeqCst);
        {
            let _g = sh.poll_gate.lock().unwrap_or_else(|p| p.into_inner());
            sh.poll_cv.notify_all();
        }
        for w in &sh.writers {
            if let Some(s) = w.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` on its own thread and fails the test if it has not finished in 30 s (the
    /// hangs these tests look for must fail them, not stall the suite).
    fn watchdog(body: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            body();
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => h.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(p) = h.join() {
                    std::panic::resume_unwind(p)
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung for 30 s"),
        }
    }

    /// Rank 0 as a real node; rank 1 played by hand over an authenticated socket.
    fn node_and_raw_peer(peer_timeout: Duration) -> (Node, TcpStream) {
        let (node, raw, _) = node_raw_peer_and_addr(peer_timeout);
        (node, raw)
    }

    /// As `node_and_raw_peer`, with the node's listening address.
    fn node_raw_peer_and_addr(peer_timeout: Duration) -> (Node, TcpStream, SocketAddr) {
        let secret = b"stalled peer test secret".to_vec();
        let mut cfg = Config::new(0, 2, secret.clone());
        cfg.peer_timeout = peer_timeout;
        cfg.heartbeat = Duration::from_millis(100);
        let listening = Listening::bind(cfg).unwrap();
        let addr = listening.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let peer = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            auth::connect(&mut s, &secret, 1, 2, 0).unwrap();
            s
        });
        let node = listening.connect(&[addr, addr], deadline).unwrap();
        (node, peer.join().unwrap(), addr)
    }

    /// Threads of this process whose name starts with `prefix`.
    fn threads_named(prefix: &str) -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with(prefix))
            .count()
    }

    /// A client that drips its hello a byte at a time is cut off once the whole handshake's
    /// deadline passes, however short each gap; many silent clients at once hold at most a
    /// bounded number of handshake threads; the job's own link keeps working throughout.
    #[test]
    fn slow_and_many_unauthenticated_clients_are_bounded() {
        watchdog(|| {
            let (node, mut raw, addr) = node_raw_peer_and_addr(Duration::from_secs(60));
            let mut drip = TcpStream::connect(addr).unwrap();
            let start = Instant::now();
            let cut = loop {
                if drip.write_all(&[0x48]).is_err() {
                    break start.elapsed();
                }
                let mut b = [0u8; 1];
                drip.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                match drip.read(&mut b) {
                    Ok(0) => break start.elapsed(),
                    Ok(_) => panic!("the server answered a partial hello"),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break start.elapsed(),
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "a drip of bytes kept the handshake open"
                );
            };
            assert!(
                cut < auth::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
                "cut after {cut:?}"
            );
            let before = threads_named("xccl-tcp-auth");
            let silent: Vec<TcpStream> = (0..100)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            let mut most = 0;
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                most = most.max(threads_named("xccl-tcp-auth"));
                std::thread::sleep(Duration::from_millis(10)); // sampling, not syncing
            }
            assert!(
                most <= before + handshake_limit(2),
                "{most} handshake threads for 100 silent clients"
            );
            drop(silent);
            // The job's link still works: a signal from the raw peer lands.
            let mut f = Frame::new(Kind::Signal);
            f.a = 3;
            f.b = 1;
            raw.write_all(&f.encode()).unwrap();
            node.wait(3, |v| v == 1, Instant::now() + Duration::from_secs(5))
                .unwrap();
        });
    }

    /// A peer that stops in the middle of a frame: a caller's wait still ends at its own
    /// deadline (it must not block inside the frame), and the peer is declared failed within
    /// the peer timeout (bytes of a frame that never completes are not liveness).
    #[test]
    fn a_sender_stopped_mid_frame_neither_stalls_waits_nor_stays_alive() {
        watchdog(|| {
            let peer_timeout = Duration::from_millis(1500);
            let (node, mut raw) = node_and_raw_peer(peer_timeout);
            node.register(1, 1 << 20).unwrap();
            let mut f = Frame::new(Kind::Write);
            f.region = 1;
            f.len = 1 << 20;
            f.flags = FLAG_SIGNAL;
            f.a = 0;
            f.b = 1;
            raw.write_all(&f.encode()).unwrap();
            raw.write_all(&[7u8; 1000]).unwrap(); // and nothing more: stopped mid-frame
            let stopped_at = Instant::now();
            let wait = Duration::from_millis(300);
            let r = node.wait(0, |v| v >= 1, Instant::now() + wait);
            let took = stopped_at.elapsed();
            assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
            assert!(
                took < wait + Duration::from_millis(500),
                "a {wait:?} wait took {took:?}"
            );
            // Then the peer is failed, within the peer timeout (plus a heartbeat's slack).
            let r = node.wait(0, |v| v >= 1, Instant::now() + Duration::from_secs(20));
            let took = stopped_at.elapsed();
            assert!(matches!(r, Err(Error::PeerFailed { rank: 1, .. })), "{r:?}");
            assert!(
                took < peer_timeout + Duration::from_secs(1),
                "failed after {took:?} with a {peer_timeout:?} peer timeout"
            );
            drop(raw);
        });
    }

    /// A peer that stops reading: a write streaming to it ends with `PeerFailed` once the peer
    /// has been silent for the peer timeout, and `abort` from another thread returns at once
    /// while that write is blocked.
    #[test]
    fn a_write_blocked_on_a_peer_that_stopped_reading_ends() {
        watchdog(|| {
            let peer_timeout = Duration::from_millis(1500);
            let (node, raw) = node_and_raw_peer(peer_timeout);
            let data = vec![1u8; 1 << 20];
            let start = Instant::now();
            let r = loop {
                // The raw peer reads nothing: the socket fills, then the write blocks.
                if let Err(e) = node.write(1, 1, 0, &data, None) {
                    break e;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "writes never blocked"
                );
            };
            let took = start.elapsed();
            assert!(matches!(r, Error::PeerFailed { rank: 1, .. }), "{r:?}");
            assert!(
                took < peer_timeout + Duration::from_secs(2),
                "ended after {took:?}"
            );
            drop(raw);
        });
    }

    #[test]
    fn abort_returns_while_a_write_is_blocked() {
        watchdog(|| {
            let (node, raw) = node_and_raw_peer(Duration::from_secs(60));
            let node = Arc::new(node);
            let writer = {
                let node = node.clone();
                std::thread::spawn(move || {
                    let data = vec![1u8; 1 << 20];
                    loop {
                        if let Err(e) = node.write(1, 1, 0, &data, None) {
                            return (e, Instant::now());
                        }
                    }
                })
            };
            // Wait until the writer is stuck: the node's last successful send stops moving.
            let mut last = node.shared.last_sent[1].load(Ordering::Relaxed);
            let mut still = Instant::now();
            while still.elapsed() < Duration::from_millis(500) {
                std::thread::sleep(Duration::from_millis(20)); // sampling a counter, not syncing
                let now = node.shared.last_sent[1].load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    still = Instant::now();
                }
            }
            let before = Instant::now();
            node.abort();
            let abort_took = before.elapsed();
            let (e, ended) = writer.join().unwrap();
            assert!(
                abort_took < Duration::from_millis(500),
                "abort took {abort_took:?}"
            );
            assert!(matches!(e, Error::Aborted), "{e:?}");
            let write_took = ended.duration_since(before);
            assert!(
                write_took < Duration::from_secs(1),
                "the write ended {write_took:?} after abort"
            );
            drop(raw);
        });
    }
}
