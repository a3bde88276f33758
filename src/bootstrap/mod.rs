//! Bootstrap: who this rank is (explicit arguments or launcher variables), settings, and the
//! rendezvous store ranks use to find each other during setup.

mod env;
mod file_store;
pub mod host;
pub mod interface;
pub mod local_secret;
mod prefixed;
mod settings;
mod store;
mod store_auth;
mod tcp_store;

pub use env::{detect, detect_with, RankInfo};
pub use file_store::FileStore;
pub use host::Hosts;
pub use prefixed::Prefixed;
pub use settings::Settings;
pub use store::{store_barrier, MemStore, Store};
pub use tcp_store::{TcpStore, TcpStoreServer};

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fills `buf` from the operating system's random source; panics only if the system has
/// none to give (no `getrandom` system call and no `/dev/urandom`).
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source")
}

/// A fresh unguessable job id (128 random bits, hex).
pub fn random_job_id() -> String {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    hex::encode(b)
}

/// A rendezvous store plus what must be cleaned up once setup is over.
pub struct Rendezvous {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Rank 0 serves the store.
    serving: bool,
    cleanup_dir: Option<PathBuf>,
}

/// The store servers rank 0 of this process runs, by the address they serve. A server lives
/// as long as the process once it has served a setup (as torchrun's store lives as long as
/// its job): a peer may begin setting up its next communicator through it at any moment,
/// before rank 0 does, and must find it there.
fn served() -> &'static Mutex<HashMap<String, Arc<TcpStoreServer>>> {
    static SERVED: std::sync::OnceLock<Mutex<HashMap<String, Arc<TcpStoreServer>>>> =
        std::sync::OnceLock::new();
    SERVED.get_or_init(Default::default)
}

impl Rendezvous {
    /// Wraps a store that needs no cleanup (for example a [`MemStore`] shared by threads).
    pub fn from_store(store: Arc<dyn Store>) -> Self {
        Rendezvous {
            store,
            serving: false,
            cleanup_dir: None,
        }
    }
    /// Picks the store from the environment, in order: `XCCL_STORE` (`tcp://host:port`, served
    /// by rank 0 unless `XCCL_STORE_SERVER=external`, or `file:///dir`), torchrun's
    /// `MASTER_ADDR`/`MASTER_PORT` (served by rank 0), a single rank's in-memory store, and a
    /// per-job directory in the temp dir named after Open MPI's, PMIx's or Slurm's job id.
    /// A store rank 0 serves stays up while its process lives (see `served`).
    pub fn from_env(info: &RankInfo, settings: &Settings, deadline: Instant) -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(url) = &settings.store {
            if let Some(addr) = url.strip_prefix("tcp://") {
                let serve = info.rank == 0 && !settings.store_external;
                return Self::tcp(addr, serve, settings.secret(), deadline);
            }
            if let Some(dir) = url.strip_prefix("file://") {
                return Ok(Rendezvous {
                    store: Arc::new(FileStore::new(dir)?),
                    serving: false,
                    cleanup_dir: None,
                });
            }
            return Err(Error::InvalidArgument(format!(
                "XCCL_STORE={url:?}: expected tcp://host:port or file:///dir"
            )));
        }
        if let (Some(host), Some(port)) = (env("MASTER_ADDR"), env("MASTER_PORT")) {
            let addr = format!("{host}:{port}");
            return Self::tcp(&addr, info.rank == 0, settings.secret(), deadline);
        }
        if info.world_size == 1 {
            return Ok(Self::from_store(Arc::new(MemStore::new())));
        }
        let job = env("PMIX_NAMESPACE")
            .or_else(|| env("OMPI_MCA_ess_base_jobid"))
            .or_else(|| {
                env("SLURM_JOB_ID")
                    .map(|j| format!("{j}.{}", env("SLURM_STEP_ID").unwrap_or_default()))
            });
        let Some(job) = job else {
            return Err(Error::InvalidUsage(format!(
                "{} ranks but no rendezvous: set XCCL_STORE=tcp://host:port or file:///dir, or \
                 MASTER_ADDR and MASTER_PORT, or launch with xccl-run, mpirun or srun",
                info.world_size
            )));
        };
        let safe: String = job
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let uid = rustix::process::getuid().as_raw();
        let dir = std::env::temp_dir().join(format!("xccl-store-{uid}-{safe}"));
        Ok(Rendezvous {
            store: Arc::new(FileStore::new(&dir)?),
            serving: false,
            cleanup_dir: (info.rank == 0).then_some(dir),
        })
    }

    fn tcp(addr: &str, serve: bool, secret: Option<&[u8]>, deadline: Instant) -> Result<Self> {
        if serve {
            let mut map = served().lock().unwrap_or_else(|p| p.into_inner());
            if !map.contains_key(addr) {
                let s = TcpStoreServer::bind(addr, secret).map_err(|e| {
                    Error::InvalidUsage(format!("rank 0 cannot serve the TCP store at {addr}: {e}"))
                })?;
                map.insert(addr.to_string(), Arc::new(s));
            }
        }
        let store = Arc::new(TcpStore::connect(addr, secret, deadline)?);
        Ok(Rendezvous {
            store,
            serving: serve,
            cleanup_dir: None,
        })
    }

    /// Ends setup of the communicator whose keys live under `namespace`: every rank checks
    /// out; rank 0 waits for all of them, then removes the namespace's keys from a store
    /// directory (and the directory once no namespace is left in it).
    pub fn finish(
        self,
        namespace: &Prefixed,
        rank: usize,
        world: usize,
        deadline: Instant,
    ) -> Result<()> {
        let start = Instant::now();
        namespace.add("left", 1)?;
        if rank == 0 && (self.serving || self.cleanup_dir.is_some()) {
            let mut backoff = Duration::from_micros(200);
            while namespace.add("left", 0)? < world as i64 {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        op: "waiting for every rank to finish setup".into(),
                        waited: start.elapsed(),
                    });
                }
                std::thread::sleep(backoff); // polling pace of the store, not synchronisation
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
            if let Some(dir) = &self.cleanup_dir {
                file_store::remove_namespace(dir, namespace.prefix());
                // Fails while another communicator's keys are still there, as it should.
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(())
    }
}
