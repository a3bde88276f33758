//! The TCP rendezvous store: a small server (on rank 0, or in the launcher) and its client.
//!
//! A connection opens with the handshake of [`super::store_auth`] (the job secret, when the
//! server has one). Frames are then `op:u8, key_len:u32, key, val_len:u32, val` with
//! little-endian lengths; answers are `status:u8, len:u32, data`. Lengths are checked against
//! caps before anything is allocated; a connection that sends a bad frame is dropped without
//! disturbing the others. The server bounds what a client can take: connections at once,
//! bytes stored, time to send a request, and time a connection may sit idle.

use super::store::{parse_counter, Store};
use super::store_auth::{self, read_by};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod client;
mod server;
#[cfg(test)]
mod tests;

pub use client::TcpStore;
pub use server::TcpStoreServer;

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const ST_OK: u8 = 0;
const ST_MISSING: u8 = 1;
const ST_BAD: u8 = 2;
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 16 << 20;
/// Bytes of keys and values the server holds at most.
const MAX_STORED: usize = 64 << 20;
/// Client connections served at once; more are closed unread.
const MAX_CONNECTIONS: usize = 256;
/// How long a connection may wait between requests (longer than any setup deadline).
const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// How long the rest of a request may take once its first byte has arrived.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// A `len:u32, bytes` field of at most `cap` bytes (`None` past it), read by `deadline`
/// however slowly the bytes come.
fn read_capped_by(
    s: &mut TcpStream,
    cap: usize,
    deadline: Instant,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    read_by(s, &mut len, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > cap {
        return Ok(None);
    }
    let mut v = vec![0u8; len];
    read_by(s, &mut v, deadline)?;
    Ok(Some(v))
}
