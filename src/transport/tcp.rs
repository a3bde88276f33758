//! Adapter of the `xccl-tcp` crate to the transport contract: ranks on any hosts, one
//! authenticated TCP link per pair, writes applied straight into the target window by the
//! peer's progress thread, signals on the same stream (so per-pair ordering holds).

use super::{
    check_peer, check_range, check_range_parts, check_signal, Caps, Cmp, MappedMem, SignalOp,
    Transport, Window, WindowTable,
};
use crate::error::{Error, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xccl_tcp::{Config, Listening, Node, Region};

/// How to build a TCP transport.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// The job secret every rank proves it knows.
    pub secret: Vec<u8>,
    /// Listening address (loopback unless told otherwise).
    pub bind: SocketAddr,
    /// Signal words per rank.
    pub num_signals: usize,
    /// Deadline of setup and collective calls (`register`) and of `flush`.
    pub setup_timeout: Duration,
    /// Idle links get a heartbeat this often.
    pub heartbeat: Duration,
    /// A peer silent this long has failed.
    pub peer_timeout: Duration,
}

impl TcpOptions {
    /// Defaults for `rank` of `world`: loopback, 4096 signals, 60 s setup, heartbeat 200 ms,
    /// peer timeout 3 s.
    pub fn new(rank: usize, world: usize, secret: Vec<u8>) -> Self {
        TcpOptions {
            rank,
            world,
            secret,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            num_signals: 4096,
            setup_timeout: Duration::from_secs(60),
            heartbeat: Duration::from_millis(200),
            peer_timeout: Duration::from_secs(3),
        }
    }

    pub(crate) fn config(&self) -> Config {
        let mut c = Config::new(self.rank, self.world, self.secret.clone());
        c.bind = self.bind;
        c.num_signals = self.num_signals;
        c.heartbeat = self.heartbeat;
        c.peer_timeout = self.peer_timeout;
        c
    }
}

impl From<xccl_tcp::Error> for Error {
    fn from(e: xccl_tcp::Error) -> Self {
        match e {
            xccl_tcp::Error::Io { context, source } => Error::System { context, source },
            xccl_tcp::Error::PeerFailed { rank, .. } => Error::PeerFailed { rank },
            xccl_tcp::Error::Aborted => Error::Aborted,
            xccl_tcp::Error::Timeout(op) => Error::Timeout {
                op,
                waited: Duration::ZERO,
            },
            xccl_tcp::Error::Protocol(m) => Error::ProtocolViolation(m),
            xccl_tcp::Error::Invalid(m) => Error::InvalidArgument(m),
            xccl_tcp::Error::Mismatch(m) => Error::ConfigMismatch(m),
            xccl_tcp::Error::Closed(m) => Error::InvalidUsage(m),
        }
    }
}

/// One rank of a TCP job.
pub struct TcpTransport {
    node: Node,
    /// What this transport was built with, for the groups split from it.
    opts: TcpOptions,
    rank: usize,
    world: usize,
    setup_timeout: Duration,
    next_reg: AtomicU64,
    windows: WindowTable<Arc<Region>>,
}

impl TcpTransport {
    /// `put_signal`; with `hold`, `put_signal_then` (the frame may wait for the next one).
    fn put_signal_held(
        &self,
        peer: usize,
        win: &Window,
        (offset, data): (usize, &[u8]),
        (index, op, value): (usize, SignalOp, u64),
        hold: bool,
    ) -> Result<()> {
        check_peer(peer, self.world)?;
        check_range(win.len(), offset, data.len())?;
        check_signal(index, self.node.num_signals())?;
        let region = self.region(win)?;
        if peer == self.rank {
            self.copy_in(&region, offset, &[data])?;
            return self.signal(peer, index, op, value);
        }
        let signal = Some((index, op == SignalOp::Set, value));
        Ok(self
            .node
            .write_held(peer, win.id(), offset as u64, &[data], signal, hold)?)
    }

    /// Collective: binds, publishes this rank's address through `exchange` (which returns
    /// every rank's, in rank order; a store does it), and connects to every peer.
    pub fn new(
        opts: TcpOptions,
        exchange: &mut dyn FnMut(SocketAddr) -> Result<Vec<SocketAddr>>,
    ) -> Result<Self> {
        let start = Instant::now();
        let listening = Listening::bind(opts.config())?;
        let addrs = exchange(listening.local_addr()?)?;
        Self::finish(opts, listening, &addrs).map_err(|e| e.waited_since(start))
    }

    fn finish(opts: TcpOptions, listening: Listening, addrs: &[SocketAddr]) -> Result<Self> {
        let node = listening.connect(addrs, Instant::now() + opts.setup_timeout)?;
        Ok(TcpTransport {
            node,
            opts: opts.clone(),
            rank: opts.rank,
            world: opts.world,
            setup_timeout: opts.setup_timeout,
            next_reg: AtomicU64::new(1),
            windows: WindowTable::new(),
        })
    }

    fn region(&self, win: &Window) -> Result<Arc<Region>> {
        self.windows.get(win)
    }

    /// A put to this rank itself: `parts` end to end into `region` from `offset` (checked
    /// by the caller), while the caller's Arc keeps the region alive.
    fn copy_in(&self, region: &Region, offset: usize, parts: &[&[u8]]) -> Result<()> {
        self.node.check_open()?;
        let mut at = offset;
        for part in parts {
            // SAFETY: the whole range lies in the region (checked against the window); a part
            // may be a slice of this very window, so the overlap-safe copy.
            unsafe { crate::copy::copy_any(region.as_ptr().add(at), part.as_ptr(), part.len()) };
            at += part.len();
        }
        Ok(())
    }
}

/// The secret of a group split from a job: keyed by the job's secret, so only its members
/// can derive it, and different for every group.
pub(crate) fn group_secret(secret: &[u8], id: [u64; 2]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("any key length");
    m.update(b"xccl split group");
    m.update(&id[0].to_le_bytes());
    m.update(&id[1].to_le_bytes());
    m.finalize().into_bytes().to_vec()
}

/// A listening address as the word a split's exchange carries (IPv4 address and port; the
/// family, 4, goes in the second word).
pub(crate) fn address_word(addr: SocketAddr) -> Result<u64> {
    let SocketAddr::V4(v4) = addr else {
        return Err(Error::Unsupported(format!(
            "split: listening on {addr}; only IPv4 addresses are exchanged"
        )));
    };
    Ok(u64::from(u32::from(*v4.ip())) | (u64::from(v4.port()) << 32))
}

/// Every member's address from the words of a split's exchange, by rank; anything else
/// than an IPv4 address word is refused.
pub(crate) fn decode_addresses(words: Vec<[u64; 2]>) -> Result<Vec<SocketAddr>> {
    words
        .into_iter()
        .map(|[w, family]| match family {
            4 => Ok(SocketAddr::from((
                std::net::Ipv4Addr::from(w as u32),
                (w >> 32) as u16,
            ))),
            _ => Err(Error::ProtocolViolation("split: a bad address".into())),
        })
        .collect()
}

/// A node's result, its timeout told as the time waited since `start`.
fn timed(start: Instant, r: xccl_tcp::Result<u64>) -> Result<u64> {
    r.map_err(|e| Error::from(e).waited_since(start))
}

/// Builds `world` TCP ranks as threads of this process, linked over loopback with a fresh
/// secret: for tests and in-process benchmarks.
pub fn in_process(world: usize, num_signals: usize) -> Result<Vec<TcpTransport>> {
    in_process_with(world, num_signals, Duration::from_secs(60))
}

/// [`in_process`] whose collective calls and setup give up after `setup_timeout`.
pub fn in_process_with(
    world: usize,
    num_signals: usize,
    setup_timeout: Duration,
) -> Result<Vec<TcpTransport>> {
    let mut secret = vec![0u8; 32];
    crate::bootstrap::fill_random(&mut secret);
    let mut listening = Vec::with_capacity(world);
    let mut addrs = Vec::with_capacity(world);
    for rank in 0..world {
        let mut o = TcpOptions::new(rank, world, secret.clone());
        o.num_signals = num_signals;
        o.setup_timeout = setup_timeout;
        let l = Listening::bind(o.config())?;
        addrs.push(l.local_addr()?);
        listening.push((o, l));
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = listening
            .into_iter()
            .map(|(o, l)| {
                let addrs = &addrs;
                s.spawn(move || TcpTransport::finish(o, l, addrs))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("setup thread panicked"))
            .collect()
    })
}

impl Transport for TcpTransport {
    fn split(
        &self,
        group: &super::GroupSpec,
        exchange: &mut super::GroupExchange<'_>,
    ) -> Result<Box<dyn Transport>> {
        self.node.check_open()?;
        let mut opts = self.opts.clone();
        opts.rank = group.rank;
        opts.world = group.members.len();
        opts.secret = group_secret(&self.opts.secret, group.id);
        let t = TcpTransport::new(opts, &mut |addr| {
            decode_addresses(exchange([address_word(addr)?, 4])?)
        })?;
        Ok(Box::new(t))
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn caps(&self) -> Caps {
        Caps {
            backend: "tcp",
            num_signals: self.node.num_signals(),
            max_window_len: isize::MAX as usize,
        }
    }

    fn register(&self, len: usize) -> Result<Window> {
        if self.node.is_aborted() {
            return Err(Error::Aborted);
        }
        let id = self.next_reg.fetch_add(1, Ordering::Relaxed);
        // On failure the node has told the peers (they fail too); nothing to wait for.
        let region = self.node.register(id, len)?;
        let start = Instant::now();
        let lens = self
            .node
            .peers_registered(id, len, start + self.setup_timeout)
            .map_err(|e| Error::from(e).waited_since(start))?;
        if let Some(rank) = lens.iter().position(|&l| l == xccl_tcp::REG_FAILED) {
            self.node.deregister(id);
            return Err(Error::System {
                context: format!("register #{id}: rank {rank} could not allocate its region"),
                source: std::io::Error::other("the window exists on no rank"),
            });
        }
        if lens.iter().any(|&l| l != len as u64) {
            self.node.deregister(id);
            return Err(Error::ConfigMismatch(format!(
                "register #{id}: ranks asked for window sizes {lens:?}"
            )));
        }
        Ok(self.windows.insert(id, len, region))
    }

    fn deregister(&self, win: Window) -> Result<()> {
        self.windows.remove(win)?;
        self.node.deregister(win.id());
        Ok(())
    }

    fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
        check_peer(peer, self.world)?;
        check_range(win.len(), offset, data.len())?;
        let region = self.region(win)?;
        if peer == self.rank {
            return self.copy_in(&region, offset, &[data]);
        }
        Ok(self.node.write(peer, win.id(), offset as u64, data, None)?)
    }

    fn put_vectored(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<()> {
        check_peer(peer, self.world)?;
        check_range_parts(win.len(), offset, parts)?;
        let region = self.region(win)?;
        if peer == self.rank {
            return self.copy_in(&region, offset, parts);
        }
        Ok(self
            .node
            .write_parts(peer, win.id(), offset as u64, parts, None)?)
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
        self.put_signal_held(peer, win, (offset, data), (index, op, value), false)
    }

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
        self.put_signal_held(peer, win, (offset, data), (index, op, value), true)
    }

    fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
        check_peer(peer, self.world)?;
        check_range(win.len(), offset, out.len())?;
        let region = self.region(win)?;
        if peer == self.rank {
            // SAFETY: the range was checked against the window, whose region `region` keeps
            // alive; `out` may be a slice of this very window, so the overlap-safe copy.
            unsafe {
                crate::copy::copy_any(out.as_mut_ptr(), region.as_ptr().add(offset), out.len())
            };
            return Ok(());
        }
        let start = Instant::now();
        self.node
            .read(
                peer,
                win.id(),
                offset as u64,
                out,
                start + self.setup_timeout,
            )
            .map_err(|e| Error::from(e).waited_since(start))
    }

    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        check_peer(peer, self.world)?;
        check_signal(index, self.node.num_signals())?;
        Ok(self.node.signal(peer, index, op == SignalOp::Set, value)?)
    }

    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64> {
        check_signal(index, self.node.num_signals())?;
        let start = Instant::now();
        timed(
            start,
            self.node.wait(index, |v| cmp.holds(v, value), deadline),
        )
    }

    fn arrivals(&self) -> Option<u64> {
        Some(self.node.arrivals())
    }

    fn wait_arrivals(&self, seen: u64, deadline: Instant) -> Result<u64> {
        timed(Instant::now(), self.node.wait_arrivals(seen, deadline))
    }

    fn signal_value(&self, index: usize) -> Result<u64> {
        check_signal(index, self.node.num_signals())?;
        Ok(self.node.signal_value(index)?)
    }

    fn flush(&self, peer: usize) -> Result<()> {
        check_peer(peer, self.world)?;
        let start = Instant::now();
        self.node
            .flush(peer, start + self.setup_timeout)
            .map_err(|e| Error::from(e).waited_since(start))
    }

    fn abort(&self) {
        self.node.abort();
    }

    fn close(&self, deadline: Instant) -> Result<()> {
        timed(Instant::now(), self.node.close(deadline).map(|()| 0)).map(|_| ())
    }

    fn local_mem(&self, win: &Window) -> Result<MappedMem> {
        let region = self.region(win)?;
        // SAFETY: the region is `win.len()` bytes and lives while the Arc does.
        Ok(unsafe { MappedMem::new(region.as_ptr(), win.len(), region) })
    }
}
