//! Every `XCCL_*` setting, read in this one place and logged at debug level.

use crate::error::{Error, Result};
use std::time::Duration;

/// Settings from the environment.
#[derive(Clone)]
pub struct Settings {
    /// `XCCL_TIMEOUT_MS`: deadline of every wait and of setup (default 60 000).
    pub timeout: Duration,
    /// `XCCL_BACKEND`: `shm` or `loopback` (default `shm`).
    pub backend: Option<String>,
    /// `XCCL_STORE`: `tcp://host:port` or `file:///dir`.
    pub store: Option<String>,
    /// `XCCL_STORE_SERVER`: `external` when someone other than rank 0 serves the TCP store.
    pub store_external: bool,
    /// `XCCL_NUM_SIGNALS`: signal words per rank (default 4096).
    pub num_signals: Option<usize>,
    /// `XCCL_SHM_DISABLE`: refuse the shared-memory backend.
    pub shm_disable: bool,
    /// `XCCL_DEBUG`: the log filter of `xccl::logging` (`info`, `debug`, ...).
    pub debug: Option<String>,
    /// `XCCL_JOB_SECRET`: the secret TCP peers and TCP store clients prove they know (set by
    /// `xccl-run` for its ranks; required for a TCP job across hosts).
    pub job_secret: Option<String>,
    /// `XCCL_SOCKET_IFNAME`: the interfaces TCP listeners may bind to, in NCCL's syntax
    /// (`eth` prefix, `=eth0` exact, `^docker,lo` excluded; else loopback).
    pub socket_ifname: Option<String>,
    /// `XCCL_SOCKET_FAMILY`: `AF_INET` or `AF_INET6` (else IPv4 first, then IPv6).
    pub socket_family: Option<super::interface::Family>,
    /// `XCCL_TCP_HEARTBEAT_MS`: idle TCP links get a heartbeat this often (default 200).
    pub tcp_heartbeat: Option<Duration>,
    /// `XCCL_TCP_PEER_TIMEOUT_MS`: a TCP peer silent this long has failed (default 3000).
    pub tcp_peer_timeout: Option<Duration>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number(name: &str) -> Result<Option<u64>> {
    var(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| Error::InvalidArgument(format!("{name}={v:?} is not a number")))
        })
        .transpose()
}

impl Settings {
    /// The job secret's bytes, if one is set.
    pub fn secret(&self) -> Option<&[u8]> {
        self.job_secret.as_deref().map(str::as_bytes)
    }

    /// Reads the settings.
    pub fn from_env() -> Result<Self> {
        let s = Settings {
            timeout: Duration::from_millis(number("XCCL_TIMEOUT_MS")?.unwrap_or(60_000)),
            backend: var("XCCL_BACKEND"),
            store: var("XCCL_STORE"),
            store_external: var("XCCL_STORE_SERVER").is_some_and(|v| v == "external"),
            num_signals: number("XCCL_NUM_SIGNALS")?.map(|n| n as usize),
            shm_disable: var("XCCL_SHM_DISABLE").is_some_and(|v| v != "0"),
            debug: var("XCCL_DEBUG"),
            job_secret: var("XCCL_JOB_SECRET"),
            socket_ifname: var("XCCL_SOCKET_IFNAME"),
            socket_family: var("XCCL_SOCKET_FAMILY").map(|f| f.parse()).transpose()?,
            tcp_heartbeat: number("XCCL_TCP_HEARTBEAT_MS")?.map(Duration::from_millis),
            tcp_peer_timeout: number("XCCL_TCP_PEER_TIMEOUT_MS")?.map(Duration::from_millis),
        };
        tracing::debug!(
            timeout = ?s.timeout, backend = ?s.backend, store = ?s.store, num_signals = ?s.num_signals,
            socket_ifname = ?s.socket_ifname, job_secret_set = s.job_secret.is_some(), "xccl settings"
        );
        Ok(s)
    }
}
