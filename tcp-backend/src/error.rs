//! The error type of the TCP backend.

use std::io;

/// What can go wrong in the TCP backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A peer died, closed its link, or went silent past the timeout.
    #[error("peer rank {rank} failed ({detail})")]
    PeerFailed {
        /// The peer.
        rank: usize,
        /// How it was noticed.
        detail: String,
    },
    /// `abort` was called here or on a peer.
    #[error("aborted")]
    Aborted,
    /// A deadline passed.
    #[error("timed out while {0}")]
    Timeout(String),
    /// A peer sent something that failed a check.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The caller passed an unusable value.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Ranks disagree (region sizes, world size).
    #[error("configuration mismatch: {0}")]
    Mismatch(String),
    /// A call after this node closed (or began closing) its links.
    #[error("closed: {0}")]
    Closed(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
