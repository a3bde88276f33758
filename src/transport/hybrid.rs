//! The hybrid backend, for jobs across hosts: peers on this rank's host through shared memory,
//! the others through the TCP node, within one transport. One window registration is one
//! shared-memory segment per rank, which the node also exposes as its region, so bytes that
//! arrive over the network land where local peers read them; the node applies the signals it
//! receives to the shared-memory signal words, so a waiter waits on one word whoever sets it.

use super::shm::ShmTransport;
use super::tcp::TcpOptions;
use super::{
    check_peer, check_range, check_range_parts, check_signal, Caps, Cmp, MappedMem, PathKind,
    SignalOp, Transport, Window, WindowTable,
};
use crate::error::{Error, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use xccl_tcp::{Listening, Node, Region};

/// Checks of a waited word before a wait starts polling the TCP links (a few hundred
/// nanoseconds: what a local peer's signal takes to arrive when it is on its way).
const LOCAL_SPINS: u32 = 256;

/// One rank of a job whose ranks share memory host by host and reach other hosts over TCP.
///
/// ```
/// use std::time::{Duration, Instant};
/// use xccl::transport::{hybrid, Cmp, PathKind, SignalOp, Transport};
///
/// // Two emulated hosts of two ranks each.
/// let ranks = hybrid::in_process(&[0, 0, 1, 1], 64).unwrap();
/// assert_eq!(ranks[0].path_kind(1).unwrap(), PathKind::Mapped);
/// assert_eq!(ranks[0].path_kind(2).unwrap(), PathKind::Network);
/// std::thread::scope(|s| {
///     for t in &ranks {
///         s.spawn(move || {
///             let win = t.register(64).unwrap();
///             let deadline = Instant::now() + Duration::from_secs(10);
///             if t.rank() != 0 {
///                 // Ranks 1 (same host) and 2, 3 (the other host) write their own byte.
///                 t.put_signal(0, &win, t.rank(), &[t.rank() as u8], 0, SignalOp::Add, 1)
///                     .unwrap();
///             } else {
///                 t.wait(0, Cmp::Ge, 3, deadline).unwrap();
///                 let mut got = [0u8; 4];
///                 t.read_local(&win, 0, &mut got).unwrap();
///                 assert_eq!(got, [0, 1, 2, 3]);
///             }
///             t.close(deadline).unwrap();
///         });
///     }
/// });
/// ```
pub struct HybridTransport {
    rank: usize,
    world: usize,
    /// Each rank's index among this host's ranks, for the ranks on this host.
    local_index: Vec<Option<usize>>,
    /// This host's ranks by local index (the shared-memory transport's numbering).
    local_ranks: Vec<usize>,
    /// Names this host among the job's: its lowest rank.
    host_tag: usize,
    shm: ShmTransport,
    node: Node,
    /// What the node was built with, for the groups split from this transport.
    opts: TcpOptions,
    setup_timeout: Duration,
    next_reg: AtomicU64,
    /// Each window's shared-memory registration (the node's region has the window's id).
    windows: WindowTable<Window>,
}

/// Where a peer is reached.
enum Via {
    /// Through shared memory, as this rank of the host's shared-memory transport.
    Local(usize),
    /// Through the TCP node.
    Net,
}

impl HybridTransport {
    /// `put_signal`; with `hold`, `put_signal_then` (over the network the frame may wait for
    /// the next one).
    fn put_signal_held(
        &self,
        peer: usize,
        win: &Window,
        (offset, data): (usize, &[u8]),
        (index, op, value): (usize, SignalOp, u64),
        hold: bool,
    ) -> Result<()> {
        check_range(win.len(), offset, data.len())?;
        check_signal(index, self.opts.num_signals)?;
        match self.via(peer)? {
            Via::Local(l) => self
                .shm
                .put_signal(l, &self.shm_window(win)?, offset, data, index, op, value)
                .map_err(|e| self.global(e)),
            Via::Net => {
                self.shm_window(win)?;
                let signal = Some((index, op == SignalOp::Set, value));
                Ok(self
                    .node
                    .write_held(peer, win.id(), offset as u64, &[data], signal, hold)?)
            }
        }
    }

    /// Collective over the whole job: `shm` connects this host's ranks (`local_ranks`, their
    /// global ranks by local index, this rank among them); the TCP node is built from `opts`
    /// over every rank, `exchange` publishing this rank's listening address and returning
    /// every rank's, by rank (a store does it).
    pub fn new(
        shm: ShmTransport,
        local_ranks: &[usize],
        opts: TcpOptions,
        exchange: &mut dyn FnMut(SocketAddr) -> Result<Vec<SocketAddr>>,
    ) -> Result<Self> {
        let start = Instant::now();
        check_layout(&shm, local_ranks, &opts)?;
        let listening = Listening::bind(opts.config())?;
        let addrs = exchange(listening.local_addr()?)?;
        Self::finish(shm, local_ranks, opts, listening, &addrs).map_err(|e| e.waited_since(start))
    }

    /// Connects the node (its signals landing in `shm`'s words) and assembles the rank.
    fn finish(
        shm: ShmTransport,
        local_ranks: &[usize],
        opts: TcpOptions,
        listening: Listening,
        addrs: &[SocketAddr],
    ) -> Result<Self> {
        check_layout(&shm, local_ranks, &opts)?;
        let node = listening
            .with_signal_sink(shm.signal_sink())
            .connect(addrs, Instant::now() + opts.setup_timeout)?;
        let mut local_index = vec![None; opts.world];
        for (l, &r) in local_ranks.iter().enumerate() {
            local_index[r] = Some(l);
        }
        Ok(HybridTransport {
            rank: opts.rank,
            world: opts.world,
            local_index,
            local_ranks: local_ranks.to_vec(),
            host_tag: local_ranks[0],
            shm,
            node,
            setup_timeout: opts.setup_timeout,
            opts,
            next_reg: AtomicU64::new(1),
            windows: WindowTable::new(),
        })
    }

    /// An error of the shared-memory side with the rank it names in this job's numbering
    /// (the shared-memory transport numbers this host's ranks from 0).
    fn global(&self, e: Error) -> Error {
        match e {
            Error::PeerFailed { rank } => Error::PeerFailed {
                rank: self.local_ranks.get(rank).copied().unwrap_or(rank),
            },
            other => other,
        }
    }

    /// How `peer` (checked) is reached.
    fn route(&self, peer: usize) -> Result<Via> {
        check_peer(peer, self.world)?;
        Ok(match self.local_index[peer] {
            Some(l) => Via::Local(l),
            None => Via::Net,
        })
    }

    /// How `peer` is reached, for an operation: refused once either side has seen a failure
    /// or an abort (a peer's death may reach this rank through one side first; from then on
    /// every path answers the same).
    fn via(&self, peer: usize) -> Result<Via> {
        let via = self.route(peer)?;
        if let Some(e) = self
            .node_interruption()
            .or_else(|| self.shm.interruption().map(|e| self.global(e)))
        {
            return Err(e);
        }
        Ok(via)
    }

    /// The shared-memory registration of `win` (checked against this transport's table).
    fn shm_window(&self, win: &Window) -> Result<Window> {
        self.windows.get(win)
    }

    /// Why every operation must stop, as the node sees it (an abort, a failed peer).
    fn node_interruption(&self) -> Option<Error> {
        self.node.check_open().err().map(Error::from)
    }

    /// `register`: the shared-memory segment (all-or-none on this host), then the node's
    /// region over it (all-or-none across hosts: a host that could not map fails everywhere,
    /// sizes that differ anywhere are a `ConfigMismatch` everywhere).
    fn register_window(&self, len: usize) -> Result<Window> {
        if let Some(e) = self.node_interruption() {
            return Err(e);
        }
        let id = self.next_reg.fetch_add(1, Ordering::Relaxed);
        let local = self.shm.register(len).map_err(|e| self.global(e));
        let registered = self.node.register_with(id, len, |len| match &local {
            Ok(w) => {
                let mem = self.shm.local_mem(w).map_err(|e| {
                    xccl_tcp::Error::Invalid(format!("mapping window #{id} here: {e}"))
                })?;
                let ptr = mem.ptr_at(0, len).map_err(|e| {
                    xccl_tcp::Error::Invalid(format!("window #{id} mapped short: {e}"))
                })?;
                // SAFETY: `mem` keeps this rank's segment of the window mapped (`len` bytes
                // from `ptr`, checked just above) until the region drops; peers write it only
                // under the transport's rules (data is defined after its signal).
                Ok(unsafe { Region::borrowed(ptr, len, Box::new(mem)) })
            }
            // The peers are told: a disagreement on this host shows as one in the lengths
            // announced, anything else as a failed registration; either fails them too.
            Err(Error::ConfigMismatch(m)) => Err(xccl_tcp::Error::Mismatch(m.clone())),
            Err(_) => Err(xccl_tcp::Error::Invalid(format!(
                "window #{id}: no shared-memory segment"
            ))),
        });
        let start = Instant::now();
        let lens = self
            .node
            .peers_registered(id, len, start + self.setup_timeout)
            .map_err(|e| Error::from(e).waited_since(start));
        let undo = || {
            self.node.deregister(id);
            if let Ok(w) = &local {
                let _ = self.shm.deregister(*w);
            }
        };
        let failed = match (&local, registered, lens) {
            (Err(_), _, _) => None,
            (Ok(_), Err(e), _) => Some(Error::from(e)),
            (Ok(_), Ok(_), Err(e)) => Some(e),
            (Ok(_), Ok(_), Ok(lens)) => {
                if let Some(rank) = lens.iter().position(|&l| l == xccl_tcp::REG_FAILED) {
                    Some(Error::System {
                        context: format!("register #{id}: rank {rank} could not map its segment"),
                        source: std::io::Error::other("the window exists on no rank"),
                    })
                } else if lens.iter().any(|&l| l != len as u64) {
                    Some(Error::ConfigMismatch(format!(
                        "register #{id}: ranks asked for window sizes {lens:?}"
                    )))
                } else {
                    None
                }
            }
        };
        if let Some(e) = failed {
            undo();
            return Err(e);
        }
        // This host's own failure, once every peer's announcement was taken in.
        let shm_win = local?;
        Ok(self.windows.insert(id, len, shm_win))
    }
}

/// Checks that `local_ranks` (this host's ranks, ascending, this rank among them) and `opts`
/// describe the same rank as `shm`, with as many signal words.
fn check_layout(shm: &ShmTransport, local_ranks: &[usize], opts: &TcpOptions) -> Result<()> {
    let me_local = local_ranks.iter().position(|&r| r == opts.rank);
    let ascending = local_ranks.windows(2).all(|w| w[0] < w[1]);
    if me_local != Some(shm.rank())
        || local_ranks.len() != shm.world_size()
        || !ascending
        || local_ranks.iter().any(|&r| r >= opts.world)
    {
        return Err(Error::InvalidArgument(format!(
            "hybrid rank {} of {}: this host's ranks {local_ranks:?} do not match its \
             shared-memory rank {} of {}",
            opts.rank,
            opts.world,
            shm.rank(),
            shm.world_size()
        )));
    }
    if opts.num_signals != shm.caps().num_signals {
        return Err(Error::InvalidArgument(format!(
            "hybrid: {} signal words over TCP, {} in shared memory",
            opts.num_signals,
            shm.caps().num_signals
        )));
    }
    Ok(())
}

/// The busy threads a rank's TCP node adds to its host's load, for the shared-memory wait
/// policy: its progress applies what other hosts send (one busy thread while data flows).
pub(crate) fn node_load(hosts: usize) -> usize {
    usize::from(hosts > 1)
}

/// Builds a hybrid job in this process, rank r on emulated host `host_of[r]`: each host's
/// ranks share memory (as threads), every rank has its TCP node over loopback. For tests and
/// in-process benchmarks.
pub fn in_process(host_of: &[usize], num_signals: usize) -> Result<Vec<HybridTransport>> {
    in_process_with(host_of, num_signals, Duration::from_secs(60))
}

/// [`in_process`] whose collective calls and setup give up after `setup_timeout`.
pub fn in_process_with(
    host_of: &[usize],
    num_signals: usize,
    setup_timeout: Duration,
) -> Result<Vec<HybridTransport>> {
    let world = host_of.len();
    let mut secret = vec![0u8; 32];
    crate::bootstrap::fill_random(&mut secret);
    let hosts = host_of.iter().max().map_or(0, |h| h + 1);
    let mut shm: Vec<Option<ShmTransport>> = (0..world).map(|_| None).collect();
    let mut local_ranks: Vec<Vec<usize>> = vec![Vec::new(); hosts];
    for (h, ranks) in local_ranks.iter_mut().enumerate() {
        *ranks = (0..world).filter(|&r| host_of[r] == h).collect();
        if ranks.is_empty() {
            continue;
        }
        let made = super::shm::in_process_with(ranks.len(), num_signals, setup_timeout)?;
        for (t, &r) in made.into_iter().zip(ranks.iter()) {
            shm[r] = Some(t);
        }
    }
    let mut pending = Vec::with_capacity(world);
    let mut addrs = Vec::with_capacity(world);
    for (rank, t) in shm.into_iter().enumerate() {
        let t = t.expect("every rank is on a host");
        let mut opts = TcpOptions::new(rank, world, secret.clone());
        opts.num_signals = num_signals;
        opts.setup_timeout = setup_timeout;
        let locals = &local_ranks[host_of[rank]];
        let listening = Listening::bind(opts.config())?;
        addrs.push(listening.local_addr()?);
        pending.push((t, locals, opts, listening));
    }
    std::thread::scope(|s| {
        let hs: Vec<_> = pending
            .into_iter()
            .map(|(t, locals, opts, listening)| {
                let addrs = &addrs;
                s.spawn(move || HybridTransport::finish(t, locals, opts, listening, addrs))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("setup thread panicked"))
            .collect()
    })
}

impl Transport for HybridTransport {
    /// The group's ranks on this host share memory among themselves (a shared-memory job
    /// named by the group and this host), and every member gets a TCP node keyed by a secret
    /// derived from the job's; the one exchange carries the nodes' addresses and serves as the
    /// shared-memory setup's barrier.
    fn split(
        &self,
        group: &super::GroupSpec,
        exchange: &mut super::GroupExchange<'_>,
    ) -> Result<Box<dyn Transport>> {
        use super::shm::ShmOptions;
        self.node.check_open()?;
        let local_ranks: Vec<usize> = (0..group.members.len())
            .filter(|&g| self.local_index[group.members[g]].is_some())
            .collect();
        let me_local = local_ranks
            .iter()
            .position(|&g| g == group.rank)
            .ok_or_else(|| Error::InvalidArgument("split: this rank is not a member".into()))?;
        let mut opts = self.opts.clone();
        opts.rank = group.rank;
        opts.world = group.members.len();
        opts.secret = super::tcp::group_secret(&self.opts.secret, group.id);
        let listening = Listening::bind(opts.config())?;
        let word = super::tcp::address_word(listening.local_addr()?)?;
        let mut addrs = None;
        let job = format!(
            "s{:016x}{:016x}-h{}",
            group.id[0], group.id[1], self.host_tag
        );
        let mut shm_opts = ShmOptions::new(job, me_local, local_ranks.len());
        shm_opts.num_signals = self.opts.num_signals;
        shm_opts.setup_timeout = self.setup_timeout;
        shm_opts.other_load = node_load(1 + usize::from(local_ranks.len() < opts.world));
        // Mesh setup calls its barrier exactly once, after its own listener is bound.
        let shm = ShmTransport::new(shm_opts, &mut || {
            addrs = Some(exchange([word, 4])?);
            Ok(())
        })?;
        let addrs = super::tcp::decode_addresses(addrs.unwrap_or_default())?;
        Ok(Box::new(HybridTransport::finish(
            shm,
            &local_ranks,
            opts,
            listening,
            &addrs,
        )?))
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn caps(&self) -> Caps {
        Caps {
            backend: "hybrid",
            num_signals: self.shm.caps().num_signals,
            max_window_len: self.shm.caps().max_window_len,
        }
    }

    fn register(&self, len: usize) -> Result<Window> {
        let start = Instant::now();
        self.register_window(len).map_err(|e| e.waited_since(start))
    }

    fn deregister(&self, win: Window) -> Result<()> {
        let shm_win = self.windows.remove(win)?;
        self.node.deregister(win.id());
        self.shm.deregister(shm_win)
    }

    fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
        check_range(win.len(), offset, data.len())?;
        match self.via(peer)? {
            Via::Local(l) => self
                .shm
                .put(l, &self.shm_window(win)?, offset, data)
                .map_err(|e| self.global(e)),
            Via::Net => {
                self.shm_window(win)?;
                Ok(self.node.write(peer, win.id(), offset as u64, data, None)?)
            }
        }
    }

    fn put_vectored(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<()> {
        check_range_parts(win.len(), offset, parts)?;
        match self.via(peer)? {
            Via::Local(l) => self
                .shm
                .put_vectored(l, &self.shm_window(win)?, offset, parts)
                .map_err(|e| self.global(e)),
            Via::Net => {
                self.shm_window(win)?;
                Ok(self
                    .node
                    .write_parts(peer, win.id(), offset as u64, parts, None)?)
            }
        }
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
        check_range(win.len(), offset, out.len())?;
        match self.via(peer)? {
            Via::Local(l) => self
                .shm
                .get(l, &self.shm_window(win)?, offset, out)
                .map_err(|e| self.global(e)),
            Via::Net => {
                self.shm_window(win)?;
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
        }
    }

    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        check_signal(index, self.opts.num_signals)?;
        match self.via(peer)? {
            Via::Local(l) => self
                .shm
                .signal(l, index, op, value)
                .map_err(|e| self.global(e)),
            Via::Net => Ok(self.node.signal(peer, index, op == SignalOp::Set, value)?),
        }
    }

    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64> {
        // One word, set by local peers directly and by the node for remote ones. First this
        // thread polls the links itself (what arrives is applied here, without waking a
        // progress thread), then it sleeps on the word; a failure either side sees ends it.
        // A short spin first: a local peer's signal needs no system call to be seen.
        for _ in 0..LOCAL_SPINS {
            let v = self.shm.signal_value(index)?;
            if cmp.holds(v, value) {
                return Ok(v);
            }
            std::hint::spin_loop();
        }
        let polled = self.node.poll_for(|| {
            let v = self.shm.signal_value(index).ok()?;
            cmp.holds(v, value).then_some(v)
        })?;
        match polled {
            Some(v) => Ok(v),
            None => self
                .shm
                .wait_or(index, cmp, value, deadline, &|| self.node_interruption())
                // The node's errors name ranks as the job does; the shared-memory side's
                // are renumbered.
                .map_err(|e| self.node_interruption().unwrap_or_else(|| self.global(e))),
        }
    }

    fn signal_value(&self, index: usize) -> Result<u64> {
        self.shm.signal_value(index)
    }

    fn flush(&self, peer: usize) -> Result<()> {
        match self.via(peer)? {
            Via::Local(l) => self.shm.flush(l).map_err(|e| self.global(e)),
            Via::Net => {
                let start = Instant::now();
                self.node
                    .flush(peer, start + self.setup_timeout)
                    .map_err(|e| Error::from(e).waited_since(start))
            }
        }
    }

    fn abort(&self) {
        // Local peers see the flag in their signal segments; the others get the node's frame.
        self.shm.abort();
        self.node.abort();
    }

    fn close(&self, deadline: Instant) -> Result<()> {
        // This host's ranks first (each only waits for the others to begin closing), then the
        // whole job over the node; both always run, so the transport is closed either way.
        let local = self.shm.close(deadline).map_err(|e| self.global(e));
        let start = Instant::now();
        let net = self
            .node
            .close(deadline)
            .map_err(|e| Error::from(e).waited_since(start));
        local.and(net)
    }

    fn local_mem(&self, win: &Window) -> Result<MappedMem> {
        self.shm.local_mem(&self.shm_window(win)?)
    }

    fn path_kind(&self, peer: usize) -> Result<PathKind> {
        Ok(match self.route(peer)? {
            Via::Local(_) => PathKind::Mapped,
            Via::Net => PathKind::Network,
        })
    }

    fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
        match self.route(peer)? {
            Via::Local(l) => self.shm.map_peer(l, &self.shm_window(win)?),
            Via::Net => {
                self.shm_window(win)?;
                Ok(None)
            }
        }
    }
}
