//! The communicator: builds a transport from the environment or a builder, checks that every
//! rank agrees on the configuration, and offers barrier, deadlines, abort and close.

use crate::bootstrap::{self, store_barrier, Prefixed, RankInfo, Rendezvous, Settings, Store};
use crate::error::{Error, Result};
use crate::signal_pool::SignalPool;
use crate::transport::{loopback::Loopback, Cmp, SignalOp, Transport, Window};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Signal words kept for the barrier's rounds, below the control exchange's words.
const BARRIER_SIGNALS: usize = 64;

/// Signal words at the top of each rank's range kept for the communicator itself: the
/// barrier's rounds, then one control word per source rank.
pub(crate) fn reserved_signals(world: usize) -> usize {
    BARRIER_SIGNALS + world
}

/// Communicators built from the environment by this process, for the store namespace of
/// those built without a name.
static BUILDS: AtomicU64 = AtomicU64::new(0);

/// Which transport a communicator builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Shared memory between processes on one host.
    Shm,
    /// Threads of one process (only a single rank can be built from the environment).
    Loopback,
    /// RDMA-like one-sided memory over TCP, across hosts.
    Tcp,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shm" => Ok(Backend::Shm),
            "loopback" => Ok(Backend::Loopback),
            "tcp" => Ok(Backend::Tcp),
            other => Err(Error::InvalidArgument(format!(
                "backend {other:?} (expected shm, tcp or loopback)"
            ))),
        }
    }
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Shm => "shm",
            Backend::Loopback => "loopback",
            Backend::Tcp => "tcp",
        }
    }
}

/// Builds a [`Communicator`]; every setting left unset comes from the environment.
///
/// ```no_run
/// let comm = xccl::Communicator::builder().build().unwrap(); // rank/world from the launcher
/// comm.barrier().unwrap();
/// ```
#[derive(Default)]
pub struct CommBuilder {
    explicit: Option<(usize, usize)>,
    backend: Option<Backend>,
    timeout: Option<Duration>,
    num_signals: Option<usize>,
    store: Option<Arc<dyn Store>>,
    fingerprint: u64,
    name: Option<String>,
}

impl CommBuilder {
    /// Sets rank and world size explicitly (overrides launcher variables).
    pub fn rank(mut self, rank: usize, world: usize) -> Self {
        self.explicit = Some((rank, world));
        self
    }
    /// Chooses the backend (else `XCCL_BACKEND`, else shm).
    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = Some(b);
        self
    }
    /// Deadline of every wait and of setup (else `XCCL_TIMEOUT_MS`, else 60 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }
    /// Signal words per rank (else `XCCL_NUM_SIGNALS`, else 4096).
    pub fn num_signals(mut self, n: usize) -> Self {
        self.num_signals = Some(n);
        self
    }
    /// Uses this rendezvous store instead of one from the environment.
    pub fn store(mut self, s: Arc<dyn Store>) -> Self {
        self.store = Some(s);
        self
    }
    /// A hash of the caller's own configuration (buffer sizes, model shape...): ranks whose
    /// fingerprints differ fail setup with `ConfigMismatch`.
    pub fn fingerprint(mut self, f: u64) -> Self {
        self.fingerprint = f;
        self
    }

    /// Names the communicator's namespace in the rendezvous store (letters, digits, `-`,
    /// `_`). Without a name, the n-th communicator this process builds from the environment
    /// uses namespace `n`, which pairs it with the n-th of every other rank: enough when
    /// communicators are built one after another. Communicators built at the same time from
    /// several threads need names, the same on every rank.
    ///
    /// ```no_run
    /// use xccl::Communicator;
    /// let (a, b) = std::thread::scope(|s| {
    ///     let a = s.spawn(|| Communicator::builder().name("experts").build());
    ///     let b = s.spawn(|| Communicator::builder().name("kv").build());
    ///     (a.join().unwrap(), b.join().unwrap())
    /// });
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Collective: connects every rank. Fails the same way on every rank when they disagree
    /// on world size, library version, signal count, backend or fingerprint. Can be called
    /// again after the communicator it built is dropped, or meanwhile (see
    /// [`CommBuilder::name`]): each communicator sets up in its own namespace of the store.
    pub fn build(self) -> Result<Communicator> {
        let start = Instant::now();
        self.connect().map_err(|e| e.waited_since(start))
    }

    fn connect(self) -> Result<Communicator> {
        let settings = Settings::from_env()?;
        let info = bootstrap::detect(self.explicit)?;
        let timeout = self.timeout.unwrap_or(settings.timeout);
        let deadline = Instant::now() + timeout;
        let backend = match self.backend {
            Some(b) => b,
            None => settings.backend.as_deref().unwrap_or("shm").parse()?,
        };
        if backend == Backend::Shm && settings.shm_disable {
            return Err(Error::InvalidUsage(
                "XCCL_SHM_DISABLE is set and no other backend was chosen".into(),
            ));
        }
        let num_signals = self.num_signals.or(settings.num_signals).unwrap_or(4096);
        let reserved = reserved_signals(info.world_size);
        if num_signals <= reserved {
            return Err(Error::InvalidArgument(format!(
                "num_signals {num_signals} must exceed {reserved} ({BARRIER_SIGNALS} for the \
                 barrier and one per rank for the control exchange)"
            )));
        }
        let name = match self.name {
            Some(n)
                if !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                format!("n-{n}")
            }
            Some(n) => {
                return Err(Error::InvalidArgument(format!(
                    "communicator name {n:?}: use letters, digits, '-' and '_'"
                )))
            }
            None => format!("g-{}", BUILDS.fetch_add(1, Ordering::Relaxed)),
        };
        let rdv = match self.store {
            Some(s) => Rendezvous::from_store(s),
            None => Rendezvous::from_env(&info, &settings, deadline)?,
        };
        let ns = Prefixed::new(rdv.store.clone(), format!("xccl/{name}"));
        let store: &dyn Store = &ns;
        let config = format!(
            "version={} world={} backend={} signals={} fingerprint={:#x}",
            env!("CARGO_PKG_VERSION"),
            info.world_size,
            backend.name(),
            num_signals,
            self.fingerprint
        );
        let job_id = agree(store, &info, &config, deadline)?;
        tracing::debug!(rank = info.rank, world = info.world_size, source = info.source, %job_id, "xccl init");

        let transport: Box<dyn Transport> = match backend {
            Backend::Loopback => {
                if info.world_size != 1 {
                    return Err(Error::InvalidUsage(
                        "loopback ranks are threads of one process: build them with \
                         Loopback::create and Communicator::from_transport"
                            .into(),
                    ));
                }
                let t = Loopback::create_with(1, num_signals, timeout)?;
                Box::new(t.into_iter().next().expect("one rank"))
            }
            #[cfg(feature = "shm")]
            Backend::Shm => {
                use crate::transport::shm::{ShmOptions, ShmTransport};
                if info.local_size != info.world_size {
                    return Err(Error::InvalidUsage(format!(
                        "the shm backend needs every rank on one host ({} of {} are local)",
                        info.local_size, info.world_size
                    )));
                }
                let mut opts = ShmOptions::new(job_id, info.rank, info.world_size);
                opts.num_signals = num_signals;
                opts.setup_timeout = timeout;
                let world = info.world_size;
                Box::new(ShmTransport::new(opts, &mut || {
                    store_barrier(store, "mesh", world, deadline)
                })?)
            }
            #[cfg(not(feature = "shm"))]
            Backend::Shm => return Err(Error::Unsupported("built without the shm feature".into())),
            #[cfg(feature = "tcp")]
            Backend::Tcp => Box::new(tcp_from_env(
                store,
                &info,
                &settings,
                num_signals,
                timeout,
                deadline,
            )?),
            #[cfg(not(feature = "tcp"))]
            Backend::Tcp => return Err(Error::Unsupported("built without the tcp feature".into())),
        };
        store_barrier(store, "ready", info.world_size, deadline)?;
        rdv.finish(&ns, info.rank, info.world_size, deadline)?;
        Communicator::with_info(transport, info, timeout)
    }
}

/// Builds the TCP transport: the secret from `XCCL_JOB_SECRET` (what `xccl-run` gives its
/// ranks), else, when every rank is on this host, one rank 0 hands over outside the store
/// ([`bootstrap::local_secret`]); a job across hosts without a secret is refused. A listener
/// on `XCCL_SOCKET_IFNAME`'s address or loopback; every rank's address exchanged through the
/// store (addresses are not secret: links authenticate with the secret).
#[cfg(feature = "tcp")]
fn tcp_from_env(
    store: &dyn Store,
    info: &RankInfo,
    settings: &Settings,
    num_signals: usize,
    timeout: Duration,
    deadline: Instant,
) -> Result<crate::transport::tcp::TcpTransport> {
    use crate::transport::tcp::{TcpOptions, TcpTransport};
    let (secret, _held) = match settings.secret() {
        Some(s) => (s.to_vec(), None),
        None if info.local_size == info.world_size => {
            bootstrap::local_secret::share(store, info.rank, deadline)?
        }
        None => {
            return Err(Error::InvalidUsage(format!(
                "a TCP job across hosts ({} of {} ranks on this one) needs XCCL_JOB_SECRET, \
                 the same unguessable value on every rank (xccl-run sets it; with mpirun pass \
                 -x XCCL_JOB_SECRET)",
                info.local_size, info.world_size
            )))
        }
    };
    let mut opts = TcpOptions::new(info.rank, info.world_size, secret);
    if let Some(ifname) = &settings.socket_ifname {
        let ip = bootstrap::interface_ipv4(ifname)?;
        opts.bind = std::net::SocketAddr::from((ip, 0));
    }
    opts.num_signals = num_signals;
    opts.setup_timeout = timeout;
    if let Some(h) = settings.tcp_heartbeat {
        opts.heartbeat = h;
    }
    if let Some(t) = settings.tcp_peer_timeout {
        opts.peer_timeout = t;
    }
    let (rank, world) = (info.rank, info.world_size);
    TcpTransport::new(opts, &mut |addr| {
        store.set(&format!("tcp/addr/{rank}"), addr.to_string().as_bytes())?;
        (0..world)
            .map(|r| {
                let v = store.get(&format!("tcp/addr/{r}"), deadline)?;
                String::from_utf8_lossy(&v).parse().map_err(|_| {
                    Error::ProtocolViolation(format!("rank {r} published a bad address"))
                })
            })
            .collect()
    })
}

/// Checks every rank's configuration line against rank 0's and returns the job id rank 0
/// chose. Any disagreement fails every rank with the same `ConfigMismatch`.
fn agree(store: &dyn Store, info: &RankInfo, config: &str, deadline: Instant) -> Result<String> {
    store.set(&format!("cfg/{}", info.rank), config.as_bytes())?;
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    if info.rank == 0 {
        let mut problems = Vec::new();
        for r in 1..info.world_size {
            let theirs = text(store.get(&format!("cfg/{r}"), deadline)?);
            if theirs != config {
                problems.push(format!("rank {r} has [{theirs}]"));
            }
        }
        let verdict = if problems.is_empty() {
            format!("ok {}", bootstrap::random_job_id())
        } else {
            format!("rank 0 has [{config}], {}", problems.join(", "))
        };
        store.set("verdict", verdict.as_bytes())?;
    } else {
        let zero = text(store.get("cfg/0", deadline)?);
        if zero != config {
            return Err(Error::ConfigMismatch(format!(
                "rank 0 has [{zero}], rank {} has [{config}]",
                info.rank
            )));
        }
    }
    let verdict = text(store.get("verdict", deadline)?);
    match verdict.strip_prefix("ok ") {
        Some(job) => Ok(job.to_string()),
        None => Err(Error::ConfigMismatch(verdict)),
    }
}

/// A connected group of ranks: owns the transport, the default deadline, the barrier, the
/// signal words objects reserve, and a small control window for agreement between ranks.
///
/// Collective calls on one communicator (building objects on it, `barrier`, `split`, closing
/// objects) are made from one thread at a time, in the same order on every rank.
pub struct Communicator {
    pub(crate) transport: Box<dyn Transport>,
    info: RankInfo,
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

impl Communicator {
    /// A builder; see [`CommBuilder`].
    pub fn builder() -> CommBuilder {
        CommBuilder::default()
    }

    /// Builds everything from the environment (launcher variables and `XCCL_*`).
    pub fn from_env() -> Result<Self> {
        Self::builder().build()
    }

    /// Wraps an already connected transport (for example one of a loopback fabric).
    pub fn from_transport(transport: Box<dyn Transport>, timeout: Duration) -> Result<Self> {
        let (rank, world) = (transport.rank(), transport.world_size());
        if transport.caps().num_signals <= reserved_signals(world) {
            return Err(Error::InvalidArgument(format!(
                "transport has {} signals; a communicator of {world} ranks keeps {}",
                transport.caps().num_signals,
                reserved_signals(world)
            )));
        }
        let info = RankInfo {
            rank,
            world_size: world,
            local_rank: rank,
            local_size: world,
            source: "explicit",
        };
        Self::with_info(transport, info, timeout)
    }

    pub(crate) fn with_info(
        transport: Box<dyn Transport>,
        info: RankInfo,
        timeout: Duration,
    ) -> Result<Self> {
        let num_signals = transport.caps().num_signals;
        let barrier_base = num_signals - reserved_signals(info.world_size);
        Ok(Communicator {
            transport,
            info,
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
