//! Building a communicator: the builder and its settings (backend, timeout, signal words,
//! store, name), the configuration every rank must agree on, and the transport it makes.

use crate::bootstrap::{self, store_barrier, Prefixed, RankInfo, Rendezvous, Settings, Store};
use crate::comm::{reserved_signals, BARRIER_SIGNALS};
use crate::error::{Error, Result};
use crate::transport::{loopback::Loopback, Transport};
use crate::Communicator;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Shared memory between the ranks of each host, TCP between hosts.
    Hybrid,
    /// Chosen once the hosts are known: shm when every rank is on one host, hybrid when the
    /// job spans hosts (tcp instead of either when `XCCL_SHM_DISABLE` is set). The default.
    Auto,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "shm" => Ok(Backend::Shm),
            "loopback" => Ok(Backend::Loopback),
            "tcp" => Ok(Backend::Tcp),
            "hybrid" => Ok(Backend::Hybrid),
            "auto" => Ok(Backend::Auto),
            other => Err(Error::InvalidArgument(format!(
                "backend {other:?} (expected auto, shm, tcp, hybrid or loopback)"
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
            Backend::Hybrid => "hybrid",
            Backend::Auto => "auto",
        }
    }

    /// `Auto` made concrete for a job on `hosts` hosts; any other backend as it is.
    fn resolve(self, hosts: usize, shm_disable: bool) -> Backend {
        match self {
            Backend::Auto if shm_disable => Backend::Tcp,
            Backend::Auto if hosts > 1 => Backend::Hybrid,
            Backend::Auto => Backend::Shm,
            other => other,
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
    /// Chooses the backend (else `XCCL_BACKEND`, else [`Backend::Auto`]).
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
            None => settings.backend.as_deref().unwrap_or("auto").parse()?,
        };
        if matches!(backend, Backend::Shm | Backend::Hybrid) && settings.shm_disable {
            return Err(Error::InvalidUsage(format!(
                "XCCL_SHM_DISABLE is set and the {} backend was chosen",
                backend.name()
            )));
        }
        let num_signals = self.num_signals.or(settings.num_signals).unwrap_or(4096);
        let reserved = reserved_signals(info.world_size);
        if num_signals <= reserved {
            return Err(Error::InvalidArgument(format!(
                "num_signals {num_signals} must exceed {reserved} ({BARRIER_SIGNALS} for the \
                 barrier and one per rank for the control exchange)"
            )));
        }
        let name = namespace(self.name)?;
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
        let id = bootstrap::host::host_id(&|k| std::env::var(k).ok())?;
        let hosts = bootstrap::host::exchange(store, &info, &id, deadline)?;
        let mut info = info;
        (info.local_rank, info.local_size) = hosts.local(info.rank);
        // The same on every rank: every rank has the same host table.
        let backend = backend.resolve(hosts.count(), settings.shm_disable);
        tracing::debug!(rank = info.rank, world = info.world_size, source = info.source, %job_id, "xccl init");

        let made = Made {
            info: &info,
            settings: &settings,
            store,
            num_signals,
            timeout,
            deadline,
        };
        let transport = made.transport(backend, job_id, &hosts)?;
        store_barrier(store, "ready", info.world_size, deadline)?;
        rdv.finish(&ns, info.rank, info.world_size, deadline)?;
        Communicator::with_info(transport, info, hosts, timeout)
    }
}

/// The store namespace of a communicator: `n-<name>` for a named one (letters, digits, '-'
/// and '_'), else `g-<n>`, the n-th this process builds.
fn namespace(name: Option<String>) -> Result<String> {
    Ok(match name {
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
    })
}

/// What building a transport needs, once the ranks agreed on the configuration.
#[cfg_attr(not(all(feature = "shm", feature = "tcp")), allow(dead_code))]
struct Made<'a> {
    info: &'a RankInfo,
    settings: &'a Settings,
    store: &'a dyn Store,
    num_signals: usize,
    timeout: Duration,
    deadline: Instant,
}

impl Made<'_> {
    /// The transport of `backend` for job `job_id`.
    #[cfg_attr(not(feature = "shm"), allow(unused_variables))]
    fn transport(
        &self,
        backend: Backend,
        job_id: String,
        hosts: &bootstrap::host::Hosts,
    ) -> Result<Box<dyn Transport>> {
        Ok(match backend {
            Backend::Loopback => {
                if self.info.world_size != 1 {
                    return Err(Error::InvalidUsage(
                        "loopback ranks are threads of one process: build them with \
                         Loopback::create and Communicator::from_transport"
                            .into(),
                    ));
                }
                let t = Loopback::create_with(1, self.num_signals, self.timeout)?;
                Box::new(t.into_iter().next().expect("one rank"))
            }
            #[cfg(feature = "shm")]
            Backend::Shm => {
                use crate::transport::shm::{ShmOptions, ShmTransport};
                if self.info.local_size != self.info.world_size {
                    return Err(Error::InvalidUsage(format!(
                        "the shm backend needs every rank on one host ({} of {} are on this \
                         one, by their host names: XCCL_HOST_ID or the machine's); across \
                         hosts use the tcp backend",
                        self.info.local_size, self.info.world_size
                    )));
                }
                let mut opts = ShmOptions::new(job_id, self.info.rank, self.info.world_size);
                opts.num_signals = self.num_signals;
                opts.setup_timeout = self.timeout;
                let world = self.info.world_size;
                Box::new(ShmTransport::new(opts, &mut || {
                    store_barrier(self.store, "mesh", world, self.deadline)
                })?)
            }
            #[cfg(not(feature = "shm"))]
            Backend::Shm => return Err(Error::Unsupported("built without the shm feature".into())),
            #[cfg(feature = "tcp")]
            Backend::Tcp => Box::new(self.tcp()?),
            #[cfg(not(feature = "tcp"))]
            Backend::Tcp => return Err(Error::Unsupported("built without the tcp feature".into())),
            #[cfg(all(feature = "shm", feature = "tcp"))]
            Backend::Hybrid => Box::new(self.hybrid(job_id, hosts)?),
            #[cfg(not(all(feature = "shm", feature = "tcp")))]
            Backend::Hybrid => {
                return Err(Error::Unsupported(
                    "the hybrid backend needs both the shm and the tcp features".into(),
                ))
            }
            Backend::Auto => unreachable!("resolved once the hosts are known"),
        })
    }

    /// The hybrid transport: a shared-memory job among this host's ranks (its own job id and
    /// store barrier), then the TCP node over every rank, set up as [`Made::tcp`] does.
    #[cfg(all(feature = "shm", feature = "tcp"))]
    fn hybrid(
        &self,
        job_id: String,
        hosts: &bootstrap::host::Hosts,
    ) -> Result<crate::transport::hybrid::HybridTransport> {
        use crate::transport::hybrid::HybridTransport;
        use crate::transport::shm::{ShmOptions, ShmTransport};
        let host = hosts.host_of(self.info.rank);
        let local_ranks = hosts.ranks_on(host);
        let mut opts = ShmOptions::new(
            format!("{job_id}-h{host}"),
            self.info.local_rank,
            local_ranks.len(),
        );
        opts.num_signals = self.num_signals;
        opts.setup_timeout = self.timeout;
        opts.other_load = crate::transport::hybrid::node_load(hosts.count());
        let shm = ShmTransport::new(opts, &mut || {
            store_barrier(
                self.store,
                &format!("mesh-h{host}"),
                local_ranks.len(),
                self.deadline,
            )
        })?;
        let (opts, _held) = self.tcp_options()?;
        HybridTransport::new(
            shm,
            &local_ranks,
            opts,
            &mut store_addresses(self.store, self.info, self.deadline),
        )
    }
}

#[cfg(feature = "tcp")]
impl Made<'_> {
    /// Builds the TCP transport: the secret from `XCCL_JOB_SECRET` (what `xccl-run` gives
    /// its ranks), else, when every rank is on this host, one rank 0 hands over outside the
    /// store ([`bootstrap::local_secret`]); a job across hosts without a secret is refused. A
    /// listener on `XCCL_SOCKET_IFNAME`'s address or loopback; every rank's address
    /// exchanged through the store (addresses are not secret: links authenticate with the
    /// secret).
    fn tcp(&self) -> Result<crate::transport::tcp::TcpTransport> {
        let (opts, _held) = self.tcp_options()?;
        let exchange = &mut store_addresses(self.store, self.info, self.deadline);
        crate::transport::tcp::TcpTransport::new(opts, exchange)
    }

    /// The TCP settings of [`Made::tcp`], and what keeps rank 0's secret readable until the
    /// links are up.
    fn tcp_options(
        &self,
    ) -> Result<(
        crate::transport::tcp::TcpOptions,
        Option<bootstrap::local_secret::Held>,
    )> {
        use crate::transport::tcp::TcpOptions;
        let (info, settings) = (self.info, self.settings);
        let (secret, held) = match settings.secret() {
            Some(s) => (s.to_vec(), None),
            None if info.local_size == info.world_size => {
                bootstrap::local_secret::share(self.store, info.rank, self.deadline)?
            }
            None => {
                return Err(Error::InvalidUsage(format!(
                    "a TCP job across hosts ({} of {} ranks on this one) needs \
                     XCCL_JOB_SECRET, the same unguessable value on every rank (xccl-run sets \
                     it; with mpirun pass -x XCCL_JOB_SECRET)",
                    info.local_size, info.world_size
                )))
            }
        };
        let mut opts = TcpOptions::new(info.rank, info.world_size, secret);
        if let Some(ifname) = &settings.socket_ifname {
            let ip = bootstrap::interface::interface_addr(ifname, settings.socket_family)?;
            opts.bind = std::net::SocketAddr::from((ip, 0));
        }
        opts.num_signals = self.num_signals;
        opts.setup_timeout = self.timeout;
        if let Some(h) = settings.tcp_heartbeat {
            opts.heartbeat = h;
        }
        if let Some(t) = settings.tcp_peer_timeout {
            opts.peer_timeout = t;
        }
        Ok((opts, held))
    }
}

/// The address exchange of a TCP node through the store: publishes this rank's listening
/// address and returns every rank's, by rank (addresses are not secret: links authenticate
/// with the job secret).
#[cfg(feature = "tcp")]
fn store_addresses<'a>(
    store: &'a dyn Store,
    info: &RankInfo,
    deadline: Instant,
) -> impl FnMut(std::net::SocketAddr) -> Result<Vec<std::net::SocketAddr>> + 'a {
    let (rank, world) = (info.rank, info.world_size);
    move |addr| {
        tracing::debug!(rank, %addr, "TCP transport listening");
        store.set(&format!("tcp/addr/{rank}"), addr.to_string().as_bytes())?;
        (0..world)
            .map(|r| {
                let v = store.get(&format!("tcp/addr/{r}"), deadline)?;
                String::from_utf8_lossy(&v).parse().map_err(|_| {
                    Error::ProtocolViolation(format!("rank {r} published a bad address"))
                })
            })
            .collect()
    }
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
