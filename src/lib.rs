//! xccl: memory-semantic communication for serving Mixture-of-Experts models.
//!
//! Ranks expose registered windows that peers write into directly (one-sided put/get) and
//! small monotonic signal words they wait on with deadlines. The [`transport`] module holds
//! the contract and its backends (in-process loopback, shared memory across processes);
//! [`bootstrap`] finds the ranks of a job; [`Communicator`] ties them together.
//!
//! ```no_run
//! // Run under `xccl-run --np 2 -- ./my_program`:
//! use xccl::transport::{Cmp, SignalOp};
//! let comm = xccl::Communicator::from_env().unwrap();
//! let win = comm.register(1 << 20).unwrap();
//! let t = comm.transport();
//! if comm.rank() == 0 {
//!     t.put_signal(1, &win, 0, b"kv-cache block", 0, SignalOp::Add, 1).unwrap();
//! } else if comm.rank() == 1 {
//!     t.wait(0, Cmp::Ge, 1, comm.deadline()).unwrap();
//! }
//! comm.barrier().unwrap();
//! ```

pub mod bootstrap;
mod builder;
pub mod coll;
mod comm;
mod control;
pub mod copy;
mod error;
mod id_map;
pub mod launch;
mod lease;
#[cfg(feature = "log")]
pub mod logging;
mod mailbox;
pub mod moe;
pub mod p2p;
mod signal_pool;
mod size;
mod split;
pub mod transport;

pub use builder::{Backend, CommBuilder};
pub use comm::Communicator;
pub use error::{Error, Result};
pub use lease::Lease;

/// The README's code blocks, compiled (and run, unless marked otherwise) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
