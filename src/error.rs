//! The one error type of xccl, in categories like NCCL's.

use std::io;
use std::time::Duration;

/// Everything an xccl call can fail with.
///
/// Caller mistakes are [`Error::InvalidArgument`] (a bad value, checked before anything is
/// sent so other ranks are never left waiting) or [`Error::InvalidUsage`] (a call out of order).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bad value from the caller; the message names it.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A call that is not allowed in the current state (wrong window, closed peer, ...).
    #[error("invalid usage: {0}")]
    InvalidUsage(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    System {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A deadline passed.
    #[error("timed out after {waited:?} in {op}")]
    Timeout {
        /// The operation that waited.
        op: String,
        /// How long it waited.
        waited: Duration,
    },
    /// A peer died or its link broke; the communicator is unusable.
    #[error("peer rank {rank} failed")]
    PeerFailed {
        /// The first rank found dead.
        rank: usize,
    },
    /// `abort()` was called on this rank or on a peer.
    #[error("communication aborted")]
    Aborted,
    /// Data from another process failed a check.
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// Ranks disagree on configuration (world size, version, window size, ...).
    #[error("configuration mismatch: {0}")]
    ConfigMismatch(String),
    /// The backend cannot do this; see [`crate::transport::Caps`].
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Result alias used throughout xccl.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The same error; a `Timeout` that does not know how long it waited (it came from a
    /// layer that keeps no clock) gets the time since `start`.
    pub(crate) fn waited_since(self, start: std::time::Instant) -> Self {
        match self {
            Error::Timeout { op, waited } if waited.is_zero() => Error::Timeout {
                op,
                waited: start.elapsed(),
            },
            other => other,
        }
    }

    /// A `System` error from an `io::Error`.
    pub fn system(context: impl Into<String>, source: io::Error) -> Self {
        Error::System {
            context: context.into(),
            source,
        }
    }
}

#[cfg(feature = "shm")]
impl From<xccl_shm::Error> for Error {
    fn from(e: xccl_shm::Error) -> Self {
        match e {
            xccl_shm::Error::Io { context, source } => Error::System { context, source },
            xccl_shm::Error::PeerGone { rank, .. } => Error::PeerFailed { rank },
            xccl_shm::Error::Timeout(op) => Error::Timeout {
                op,
                waited: Duration::ZERO,
            },
            xccl_shm::Error::Protocol(m) => Error::ProtocolViolation(m),
            xccl_shm::Error::Invalid(m) => Error::InvalidArgument(m),
        }
    }
}
