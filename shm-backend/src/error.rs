//! The error type of the shared-memory backend.

use std::io;

/// What can go wrong in the shared-memory backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed; `context` says which and on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A peer's connection closed or broke.
    #[error("peer rank {rank} is gone ({detail})")]
    PeerGone {
        /// The peer's rank.
        rank: usize,
        /// How it was noticed.
        detail: String,
    },
    /// A deadline passed.
    #[error("timed out while {0}")]
    Timeout(String),
    /// Data from another process failed a check (bad magic, version, size, message).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The caller passed an unusable value.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with context.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
