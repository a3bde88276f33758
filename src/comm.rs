//! The communicator: a connected group of ranks over one transport, with its barrier,
//! deadlines, signal words, control window, abort and close (built by `builder.rs`).

use crate::bootstrap::{Hosts, RankInfo};
use crate::builder::CommBuilder;
use crate::error::{Error, Result};
use crate::signal_pool::SignalPool;
use crate::transport::{Cmp, SignalOp, Transport, Window};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Signal words kept for the barrier's rounds, below the control exchange's words.
pub(crate) const BARRIER_SIGNALS: usize = 64;

/// Signal words at the top of each rank's range kept for the communicator itself: the
/// barrier's rounds, then one control word per source rank.
pub(crate) fn reserved_signals(world: usize) -> usize {
    BARRIER_SIGNALS + world
}

/// A connected group of ranks: owns the transport, the default deadline, the barrier, the
/// signal words objects reserve, and a small control window for agreement between ranks.
///
/// Collective calls on one communicator (building objects on it, `barrier`, `split`, closing
/// objects) are made from one thread at a time, in the same order on every rank.
///
/// A launched program builds it with [`Communicator::from_env`]; here two ranks run as
/// threads of one process over the loopback backend:
///
/// ```
/// use std::time::Duration;
/// use xccl::{transport::loopback::Loopback, Communicator};
///
/// let ranks: Vec<_> = Loopback::create(2)?
///     .into_iter()
///     .map(|t| {
///         std::thread::spawn(move || -> xccl::Result<(usize, usize)> {
///             let comm = Communicator::from_transport(Box::new(t), Duration::from_secs(10))?;
///             comm.barrier()?; // every rank is here
///             let who = (comm.rank(), comm.world_size());
///             comm.close()?; // collective: returns once every rank has closed
///             Ok(who)
///         })
///     })
///     .collect();
/// for (i, rank) in ranks.into_iter().enumerate() {
///     assert_eq!(rank.join().unwrap()?, (i, 2));
/// }
/// # Ok::<(), xccl::Error>(())
/// ```
pub struct Communicator {
    pub(crate) transport: Box<dyn Transport>,
    info: RankInfo,
    /// The host of every rank.
    hosts: Hosts,
    timeout: Duration,
    barrier_base: usize,
    barrier_epoch: AtomicU64,
    /// The control window: two calls' worth of one slot per source (see `control`),
    /// registered by the first control exchange (collective calls come in the same order on
    /// every rank, so every rank registers it at the same point).
    ctl: Mutex<Option<Window>>,
    pub(crate) ctl_epoch: AtomicU64,
    signals: Mutex<SignalPool>,
    /// Splits made so far (they are collective, so every rank counts the same).
    pub(crate) splits: AtomicU64,
    closed: AtomicBool,
}

/// Hosts as a transport's paths show them to this rank: the peers it maps share its host;
/// each other rank counts as a host of its own unless the transport maps every peer.
fn hosts_from_paths(t: &dyn Transport) -> Result<Hosts> {
    let (me, n) = (t.rank(), t.world_size());
    let mut ids = Vec::with_capacity(n);
    for p in 0..n {
        let mapped = p == me || t.path_kind(p)? == crate::transport::PathKind::Mapped;
        ids.push(if mapped { me } else { p }.to_string());
    }
    Ok(Hosts::from_ids(&ids))
}

impl Communicator {
    /// A builder; see [`CommBuilder`].
    pub fn builder() -> CommBuilder {
        CommBuilder::default()
    }

    /// Builds everything from the environment (launcher variables and `XCCL_*`).
    pub fn from_env() -> Result<Self> {
        Self::builder().build()
    }

    /// Wraps an already connected transport (for example one of a loopback fabric). The
    /// ranks it maps count as this rank's host, every other rank as a host of its own (see
    /// [`Communicator::from_transport_on_hosts`] to name the hosts).
    pub fn from_transport(transport: Box<dyn Transport>, timeout: Duration) -> Result<Self> {
        let hosts = hosts_from_paths(&*transport)?;
        Self::from_transport_with(transport, hosts, timeout)
    }

    /// Wraps an already connected transport whose rank r runs on host `host_of[r]` (hosts
    /// numbered from 0 by their lowest rank), checked against the transport: every peer it
    /// maps must share this rank's host.
    ///
    /// ```
    /// use std::time::Duration;
    /// use xccl::transport::hybrid;
    /// // Four ranks as threads, two emulated hosts of two.
    /// let host_of = [0, 0, 1, 1];
    /// let ranks = hybrid::in_process(&host_of, 4096)?;
    /// std::thread::scope(|s| {
    ///     for t in ranks {
    ///         s.spawn(move || {
    ///             let timeout = Duration::from_secs(30);
    ///             let t = Box::new(t);
    ///             let comm = xccl::Communicator::from_transport_on_hosts(t, &host_of, timeout);
    ///             let comm = comm.expect("a communicator");
    ///             assert_eq!(comm.hosts().host_of(2), 1);
    ///             comm.close().expect("closed"); // collective: every rank at once
    ///         });
    ///     }
    /// });
    /// # Ok::<(), xccl::Error>(())
    /// ```
    pub fn from_transport_on_hosts(
        transport: Box<dyn Transport>,
        host_of: &[usize],
        timeout: Duration,
    ) -> Result<Self> {
        let (me, world) = (transport.rank(), transport.world_size());
        if host_of.len() != world {
            return Err(Error::InvalidArgument(format!(
                "{} hosts named for {world} ranks",
                host_of.len()
            )));
        }
        let hosts = Hosts::from_table(host_of.to_vec())?;
        for p in (0..world).filter(|&p| p != me) {
            let mapped = transport.path_kind(p)? == crate::transport::PathKind::Mapped;
            if mapped && !hosts.same_host(p, me) {
                return Err(Error::ConfigMismatch(format!(
                    "rank {me} maps rank {p}'s memory, yet the hosts name them on hosts {} and {}",
                    host_of[me], host_of[p]
                )));
            }
        }
        Self::from_transport_with(transport, hosts, timeout)
    }

    fn from_transport_with(
        transport: Box<dyn Transport>,
        hosts: Hosts,
        timeout: Duration,
    ) -> Result<Self> {
        let (rank, world) = (transport.rank(), transport.world_size());
        if transport.caps().num_signals <= reserved_signals(world) {
            return Err(Error::InvalidArgument(format!(
                "transport has {} signals; a communicator of {world} ranks keeps {}",
                transport.caps().num_signals,
                reserved_signals(world)
            )));
        }
        let (local_rank, local_size) = hosts.local(rank);
        let info = RankInfo {
            rank,
            world_size: world,
            local_rank,
            local_size,
            source: "explicit",
            launcher_local: None,
        };
        Self::with_info(transport, info, hosts, timeout)
    }

    pub(crate) fn with_info(
        transport: Box<dyn Transport>,
        info: RankInfo,
        hosts: Hosts,
        timeout: Duration,
    ) -> Result<Self> {
        let num_signals = transport.caps().num_signals;
        let barrier_base = num_signals - reserved_signals(info.world_size);
        Ok(Communicator {
            transport,
            info,
            hosts,
            timeout,
            barrier_base,
            barrier_epoch: AtomicU64::new(0),
            ctl: Mutex::new(None),
            ctl_epoch: AtomicU64::new(0),
            signals: Mutex::new(SignalPool::new(barrier_base)),
            splits: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.info.rank
    }
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.info.world_size
    }
    /// Identity details (local rank, where it came from).
    pub fn info(&self) -> &RankInfo {
        &self.info
    }

    /// The host of every rank (from `XCCL_HOST_ID` or the machine's identity; for a
    /// communicator made from a transport, from which peers it maps).
    pub fn hosts(&self) -> &Hosts {
        &self.hosts
    }
    /// The transport, for algorithms and direct one-sided use.
    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }
    /// The default timeout of waits.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// A deadline `timeout()` from now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Collective: registers a window of `len` bytes on every rank. The caller deregisters it
    /// (`transport().deregister`); objects that should give it back by themselves take a
    /// [`crate::Lease`] instead.
    pub fn register(&self, len: usize) -> Result<Window> {
        self.transport.register(len)
    }

    /// Signal words reserved right now by objects on this communicator (those retired after
    /// an end that could not be agreed included). Goes back to its starting value once every
    /// object is closed or dropped.
    pub fn signals_in_use(&self) -> usize {
        self.pool().in_use()
    }

    pub(crate) fn pool(&self) -> std::sync::MutexGuard<'_, SignalPool> {
        self.signals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The control window, registered on first use.
    pub(crate) fn control_window(&self) -> Result<Window> {
        let mut ctl = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
        match *ctl {
            Some(w) => Ok(w),
            None => {
                let w = self
                    .transport
                    .register(crate::control::window_len(self.world_size()))?;
                *ctl = Some(w);
                Ok(w)
            }
        }
    }

    /// The first of the control exchange's words (one per source rank).
    pub(crate) fn control_signals(&self) -> usize {
        self.barrier_base + BARRIER_SIGNALS
    }

    /// Blocks until every rank has entered the barrier (dissemination: ⌈log2 P⌉ rounds of
    /// one signal each). Call from one thread at a time.
    pub fn barrier(&self) -> Result<()> {
        let n = self.world_size();
        let epoch = self.barrier_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let deadline = self.deadline();
        let mut dist = 1;
        let mut round = 0;
        while dist < n {
            let to = (self.rank() + dist) % n;
            self.transport
                .signal(to, self.barrier_base + round, SignalOp::Add, 1)?;
            self.transport
                .wait(self.barrier_base + round, Cmp::Ge, epoch, deadline)?;
            dist *= 2;
            round += 1;
        }
        Ok(())
    }

    /// From any thread: fails every pending and future wait here and on the peers with
    /// `Aborted`.
    pub fn abort(&self) {
        self.transport.abort();
    }

    /// Collective orderly end, bounded by [`Communicator::deadline`]: this rank addresses
    /// nothing more to any peer, keeps receiving what slower peers still send it, and returns
    /// once every rank has closed. Ranks may reach it at different times; one that finishes
    /// early never makes a slower peer's work fail. Fails with `PeerFailed` (a peer died or
    /// left without closing), `Aborted` or `Timeout`; the communicator is closed either way
    /// and later calls fail with `InvalidUsage`. Idempotent: a second call returns `Ok`.
    /// Dropping a communicator closes it the same way (and logs a failure). Objects built on
    /// it borrow it, so they are closed or dropped first.
    ///
    /// ```no_run
    /// let comm = xccl::Communicator::from_env()?;
    /// // ... work ...
    /// comm.close()?; // every rank reaches this; none leaves before the others are done
    /// # Ok::<(), xccl::Error>(())
    /// ```
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.transport.close(self.deadline())
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(rank = self.rank(), error = %e, "xccl: closing the communicator");
        }
    }
}
