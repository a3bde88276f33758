//! `xccl-shm`: anonymous shared-memory segments for processes on one host.
//!
//! The crate stands alone (it knows nothing of `xccl`'s transport trait):
//!
//! - [`Segment`]: a `memfd` segment with its space reserved up front (`fallocate`), sealed
//!   against resizing, carrying a checked header (magic, version, size) published last.
//!   A `memfd` has no name in any file system, so nothing outlives the last process that maps
//!   it, even when every process is killed with `SIGKILL`.
//! - [`SignalArray`]: 64-bit monotonic signal words, one per 128-byte line, with a shared
//!   (cross-process) futex for parking waiters: spin, then yield, then park.
//! - [`Mesh`]: one Unix-domain connection per pair of local ranks (abstract socket names, peer
//!   credentials checked) that passes segment descriptors (`SCM_RIGHTS`) and notices a peer's
//!   death the moment the kernel closes its end.
//!
//! ```
//! use xccl_shm::Segment;
//! let seg = Segment::create("doc-example", 4096).unwrap();
//! assert_eq!(seg.data_len(), 4096);
//! let peer_view = Segment::open(seg.fd().unwrap(), 4096).unwrap();
//! assert_eq!(peer_view.data_len(), 4096);
//! ```

mod error;
mod fdpass;
mod futex;
pub mod headroom;
mod mesh;
mod segment;
mod signal;

pub use error::{Error, Result};
pub use mesh::{Mesh, PeerDownHook};
pub use segment::{Segment, SegmentState, HEADER_LEN};
pub use signal::{SignalArray, WaitOutcome, WaitPolicy, SIGNAL_LINE};
