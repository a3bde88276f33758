//! The communicator: builds a transport from the environment or a builder, checks that every
//! rank agrees on the configuration, and offers barrier, deadlines and abort.

use crate::bootstrap::{self, store_barrier, RankInfo, Rendezvous, Settings, Store};
use crate::error::{Error, Result};
use crate::transport::{loopback::Loopback, Cmp, SignalOp, Transport, Window};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Signal words at the top of each rank's range kept for the communicator's own barrier.
const BARRIER_SIGNALS: usize = 64;

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

    /// Collective: connects every rank. Fails the same way on every rank when they disagree
    /// on world size, library version, signal count, backend or fingerprint.
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
        if num_signals <= BARRIER_SIGNALS {
            return Err(Error::InvalidArgument(format!(
                "num_signals {num_signals} must exceed {BARRIER_SIGNALS}"
            )));
        }
        let rdv = match self.store {
            Some(s) => Rendezvous::from_store(s),
            None => Rendezvous::from_env(&info, &settings, deadline)?,
        };
        let store = rdv.store.clone();
        let config = format!(
            "version={} world={} backend={} signals={} fingerprint={:#x}",
            env!("CARGO_PKG_VERSION"),
            info.world_size,
            backend.name(),
            num_signals,
            self.fingerprint
        );
        let job_id = agree(&*store, &info, &config, deadline)?;
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
                    store_barrier(&*store, "xccl/mesh", world, deadline)
                })?)
            }
            #[cfg(not(feature = "shm"))]
            Backend::Shm => return Err(Error::Unsupported("built without the shm feature".into())),
            #[cfg(feature = "tcp")]
            Backend::Tcp => Box::new(tcp_from_env(
                &*store,
                &info,
                &settings,
                num_signals,
                timeout,
                deadline,
            )?),
            #[cfg(not(feature = "tcp"))]
            Backend::Tcp => return Err(Error::Unsupported("built without the tcp feature".into())),
        };
        store_barrier(&*store, "xccl/ready", info.world_size, deadline)?;
        rdv.finish(info.rank, info.world_size, deadline)?;
        Ok(Communicator::with_info(transport, info, timeout))
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
        store.set(
            &format!("xccl/tcp/addr/{rank}"),
            addr.to_string().as_bytes(),
        )?;
        (0..world)
            .map(|r| {
                let v = store.get(&format!("xccl/tcp/addr/{r}"), deadline)?;
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
    store.set(&format!("xccl/cfg/{}", info.rank), config.as_bytes())?;
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    if info.rank == 0 {
        let mut problems = Vec::new();
        for r in 1..info.world_size {
            let theirs = text(store.get(&format!("xccl/cfg/{r}"), deadline)?);
            if theirs != config {
                problems.push(format!("rank {r} has [{theirs}]"));
            }
        }
        let verdict = if problems.is_empty() {
            format!("ok {}", bootstrap::random_job_id())
        } else {
            format!("rank 0 has [{config}], {}", problems.join(", "))
        };
        store.set("xccl/verdict", verdict.as_bytes())?;
    } else {
        let zero = text(store.get("xccl/cfg/0", deadline)?);
        if zero != config {
            return Err(Error::ConfigMismatch(format!(
                "rank 0 has [{zero}], rank {} has [{config}]",
                info.rank
            )));
        }
    }
    let verdict = text(store.get("xccl/verdict", deadline)?);
    match verdict.strip_prefix("ok ") {
        Some(job) => Ok(job.to_string()),
        None => Err(Error::ConfigMismatch(verdict)),
    }
}

/// A connected group of ranks: owns the transport, the default deadline and the barrier.
pub struct Communicator {
    transport: Box<dyn Transport>,
    info: RankInfo,
    timeout: Duration,
    barrier_base: usize,
    barrier_epoch: AtomicU64,
    next_signal: AtomicUsize,
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
        if transport.caps().num_signals <= BARRIER_SIGNALS {
            return Err(Error::InvalidArgument(
                "transport has too few signals for a communicator".into(),
            ));
        }
        let (rank, world) = (transport.rank(), transport.world_size());
        let info = RankInfo {
            rank,
            world_size: world,
            local_rank: rank,
            local_size: world,
            source: "explicit",
        };
        Ok(Self::with_info(transport, info, timeout))
    }

    fn with_info(transport: Box<dyn Transport>, info: RankInfo, timeout: Duration) -> Self {
        let barrier_base = transport.caps().num_signals - BARRIER_SIGNALS;
        Communicator {
            transport,
            info,
            timeout,
            barrier_base,
            barrier_epoch: AtomicU64::new(0),
            next_signal: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
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

    /// Collective: registers a window of `len` bytes on every rank.
    pub fn register(&self, len: usize) -> Result<Window> {
        self.transport.register(len)
    }

    /// Collective (same order on every rank): reserves `n` signal words for the caller and
    /// returns the first index. They are below the communicator's own barrier words.
    pub fn alloc_signals(&self, n: usize) -> Result<usize> {
        let start = self.next_signal.fetch_add(n, Ordering::Relaxed);
        match start.checked_add(n) {
            Some(end) if end <= self.barrier_base => Ok(start),
            _ => {
                self.next_signal.fetch_sub(n, Ordering::Relaxed);
                Err(Error::InvalidArgument(format!(
                    "cannot reserve {n} more signals ({start} of {} in use)",
                    self.barrier_base
                )))
            }
        }
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
    /// Dropping a communicator closes it the same way (and logs a failure).
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
