//! `xccl-tcp`: RDMA-like one-sided memory over TCP, in the spirit of iWARP (RFC 5040/5041)
//! and Linux `siw`. The crate stands alone (it knows nothing of `xccl`'s transport trait):
//!
//! - registered memory [`Region`]s, addressed by (region id, offset);
//! - one authenticated TCP connection per pair of ranks (HMAC-SHA256 challenge–response over
//!   a job secret before anything is allocated for the peer);
//! - frames for WRITE (optionally with a signal), READ request/response, SIGNAL, FLUSH,
//!   HEARTBEAT, ABORT and region announcements, with checked fixed-size headers and a size
//!   cap; signals ride the stream behind the writes they follow, so per-pair ordering is the
//!   stream's order;
//! - a progress thread per peer that applies incoming writes straight into the target region
//!   after checking id, offset and length (no intermediate buffer), polling briefly before it
//!   blocks;
//! - heartbeats on idle links: a dead peer, a reset connection or a silent link becomes a
//!   failed peer within a configured time (silence counts only while nothing from the peer
//!   waits unread, and only for time this rank was running);
//! - writes that wake every 50 ms on a full socket, so an abort or a failed peer ends them;
//! - an orderly end ([`Node::close`]): goodbye is a half-close, each side reads the other's
//!   stream to its end, and a rank that closes first keeps applying what slower peers send.

mod auth;
mod error;
mod frame;
mod node;
mod region;
mod signals;

pub use error::{Error, Result};
pub use node::{Config, Listening, Node, REG_FAILED};
pub use region::Region;
pub use signals::SignalSink;
