//! The TCP rendezvous store: a small server (on rank 0, or in the launcher) and its client.
//!
//! Frames are `op:u8, key_len:u32, key, val_len:u32, val` with little-endian lengths; answers
//! are `status:u8, len:u32, data`. Lengths are checked against caps before anything is
//! allocated; a connection that sends a bad frame is dropped without disturbing the others.

use super::store::{parse_counter, Store};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const ST_OK: u8 = 0;
const ST_MISSING: u8 = 1;
const ST_BAD: u8 = 2;
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 16 << 20;

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The store server. It serves until dropped.
pub struct TcpStoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port) and starts serving.
    pub fn bind(addr: impl ToSocketAddrs) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::system("binding the TCP store", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::system("TCP store address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let table: Arc<Table> = Arc::default();
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let acceptor = std::thread::Builder::new()
            .name("xccl-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let _ = conn.set_nodelay(true);
                    if let Ok(c) = conn.try_clone() {
                        conns2.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                    }
                    let table = table.clone();
                    let _ = std::thread::Builder::new()
                        .name("xccl-store-conn".into())
                        .spawn(move || serve(conn, &table));
                }
            })
            .map_err(|e| Error::system("spawning the TCP store", e))?;
        tracing::debug!(%addr, "TCP store serving");
        Ok(TcpStoreServer {
            addr,
            stop,
            conns,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock accept with a connection of our own, then end every client connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_capped(s: &mut impl Read, cap: usize) -> std::io::Result<Option<Vec<u8>>> {
    let len = read_u32(s)? as usize;
    if len > cap {
        return Ok(None);
    }
    let mut v = vec![0u8; len];
    s.read_exact(&mut v)?;
    Ok(Some(v))
}

fn answer(s: &mut TcpStream, status: u8, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(status);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

/// Serves one client until it disconnects or misbehaves.
fn serve(mut s: TcpStream, table: &Table) {
    loop {
        let mut op = [0u8; 1];
        if s.read_exact(&mut op).is_err() {
            return;
        }
        let Ok(Some(key)) = read_capped(&mut s, MAX_KEY) else {
            let _ = answer(&mut s, ST_BAD, b"key too long");
            return;
        };
        let Ok(Some(val)) = read_capped(&mut s, MAX_VALUE) else {
            let _ = answer(&mut s, ST_BAD, b"value too long");
            return;
        };
        let Ok(key) = String::from_utf8(key) else {
            let _ = answer(&mut s, ST_BAD, b"key is not UTF-8");
            return;
        };
        let res = match op[0] {
            OP_SET => {
                table
                    .map
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, val);
                table.changed.notify_all();
                answer(&mut s, ST_OK, &[])
            }
            OP_GET => {
                // The value field carries the client's wait budget in milliseconds.
                let ms = val
                    .get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                let deadline = Instant::now() + Duration::from_millis(ms.min(3_600_000));
                let mut map = table.map.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(v) = map.get(&key) {
                        let v = v.clone();
                        drop(map);
                        break answer(&mut s, ST_OK, &v);
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        drop(map);
                        break answer(&mut s, ST_MISSING, &[]);
                    }
                    map = table
                        .changed
                        .wait_timeout(map, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            OP_ADD => {
                let delta = val
                    .get(..8)
                    .map_or(0, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
                let mut map = table.map.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(&key).map(|v| parse_counter(&key, v)).transpose() {
                    Ok(cur) => {
                        let new = cur.unwrap_or(0).wrapping_add(delta);
                        map.insert(key, new.to_string().into_bytes());
                        drop(map);
                        table.changed.notify_all();
                        answer(&mut s, ST_OK, &new.to_le_bytes())
                    }
                    Err(_) => {
                        drop(map);
                        answer(&mut s, ST_BAD, b"not a counter")
                    }
                }
            }
            _ => {
                let _ = answer(&mut s, ST_BAD, b"unknown op");
                return;
            }
        };
        if res.is_err() {
            return;
        }
    }
}

/// How long past a `get`'s deadline the client waits for the server's answer to arrive (the
/// server answers "missing" at the deadline itself).
const ANSWER_GRACE: Duration = Duration::from_millis(250);

/// A client of a [`TcpStoreServer`]; one connection, requests serialized.
pub struct TcpStore {
    conn: Mutex<TcpStream>,
    addr: String,
}

impl TcpStore {
    /// Connects to `addr`, retrying until `deadline` while the server is not up yet.
    pub fn connect(addr: &str, deadline: Instant) -> Result<Self> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(5);
        loop {
            let last = match addr.to_socket_addrs() {
                Ok(addrs) => {
                    let mut last = None;
                    for a in addrs {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let limit = left.clamp(Duration::from_millis(1), Duration::from_secs(2));
                        match TcpStream::connect_timeout(&a, limit) {
                            Ok(s) => {
                                let _ = s.set_nodelay(true);
                                return Ok(TcpStore {
                                    conn: Mutex::new(s),
                                    addr: addr.to_string(),
                                });
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                    last
                }
                Err(e) => Some(e),
            };
            if Instant::now() + backoff >= deadline {
                return Err(Error::Timeout {
                    op: format!("connecting to the TCP store at {addr} (last error: {last:?})"),
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(backoff); // retry pacing, not synchronisation
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    fn request(
        &self,
        op: u8,
        key: &str,
        val: &[u8],
        io_timeout: Duration,
    ) -> Result<(u8, Vec<u8>)> {
        if key.len() > MAX_KEY || val.len() > MAX_VALUE {
            return Err(Error::InvalidArgument(format!(
                "store key or value too long ({key:?})"
            )));
        }
        let mut s = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout {
                op: format!("TCP store {} request {key:?}", self.addr),
                waited: start.elapsed(),
            },
            _ => Error::system(format!("TCP store {} request {key:?}", self.addr), e),
        };
        let mut frame = Vec::with_capacity(9 + key.len() + val.len());
        frame.push(op);
        frame.extend_from_slice(&(key.len() as u32).to_le_bytes());
        frame.extend_from_slice(key.as_bytes());
        frame.extend_from_slice(&(val.len() as u32).to_le_bytes());
        frame.extend_from_slice(val);
        let timeout = Some(io_timeout.max(Duration::from_millis(1)));
        let exchanged = s
            .set_read_timeout(timeout)
            .and_then(|()| s.set_write_timeout(timeout))
            .and_then(|()| s.write_all(&frame))
            .and_then(|()| {
                let mut st = [0u8; 1];
                s.read_exact(&mut st)?;
                Ok((st[0], read_capped(&mut *s, MAX_VALUE)?))
            });
        if exchanged.is_err() {
            // The answer may still come: the connection is unusable from now on (a later
            // request must never read this one's answer).
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let (st, data) = exchanged.map_err(io)?;
        let data =
            data.ok_or_else(|| Error::ProtocolViolation("TCP store answer too long".into()))?;
        Ok((st, data))
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        match self.request(OP_SET, key, value, Duration::from_secs(30))? {
            (ST_OK, _) => Ok(()),
            (_, m) => Err(Error::ProtocolViolation(
                String::from_utf8_lossy(&m).into_owned(),
            )),
        }
    }

    fn get(&self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let start = Instant::now();
        let budget = deadline.saturating_duration_since(start);
        let ms = budget.as_millis() as u64;
        match self.request(OP_GET, key, &ms.to_le_bytes(), budget + ANSWER_GRACE)? {
            (ST_OK, v) => Ok(v),
            (ST_MISSING, _) => Err(Error::Timeout {
                op: format!("store get {key:?}"),
                waited: start.elapsed(),
            }),
            (_, m) => Err(Error::ProtocolViolation(
                String::from_utf8_lossy(&m).into_owned(),
            )),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        match self.request(OP_ADD, key, &delta.to_le_bytes(), Duration::from_secs(30))? {
            (ST_OK, v) if v.len() == 8 => Ok(i64::from_le_bytes(v.try_into().expect("8 bytes"))),
            (_, m) => Err(Error::ProtocolViolation(
                String::from_utf8_lossy(&m).into_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::store::store_barrier;

    #[test]
    fn clients_rendezvous_and_bad_frames_are_dropped() {
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let addr = server.addr().to_string();
        let d = Instant::now() + Duration::from_secs(20);
        // A client announcing a huge key is cut off; the store keeps serving others.
        let mut rogue = TcpStream::connect(&addr).unwrap();
        rogue.write_all(&[OP_SET, 0xff, 0xff, 0xff, 0xff]).unwrap();
        std::thread::scope(|s| {
            for _ in 0..3 {
                let addr = addr.clone();
                s.spawn(move || {
                    let c = TcpStore::connect(&addr, d).unwrap();
                    store_barrier(&c, "b", 3, d).unwrap();
                });
            }
        });
        let mut st = [0u8; 1];
        rogue.read_exact(&mut st).unwrap();
        assert_eq!(st[0], ST_BAD);
        let c = TcpStore::connect(&addr, d).unwrap();
        c.set("k", b"value").unwrap();
        assert_eq!(c.get("k", d).unwrap(), b"value");
        assert_eq!(c.add("n", 4).unwrap(), 4);
        assert!(matches!(
            c.get("nope", Instant::now() + Duration::from_millis(30)),
            Err(Error::Timeout { .. })
        ));
    }

    /// A store server that accepts but never answers (its process stopped): a `get` fails with
    /// `Timeout` at its deadline (plus the answer grace), and the connection is not reused.
    #[test]
    fn get_from_a_silent_server_times_out_at_its_deadline() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let c = TcpStore::connect(&addr, Instant::now() + Duration::from_secs(5)).unwrap();
        let budget = Duration::from_millis(300);
        let start = Instant::now();
        match c.get("k", start + budget) {
            Err(Error::Timeout { .. }) => {}
            other => panic!("expected Timeout, got {other:?}"),
        }
        let took = start.elapsed();
        assert!(
            took < budget + ANSWER_GRACE + Duration::from_millis(500),
            "get took {took:?} with a {budget:?} deadline"
        );
        assert!(
            c.set("k", b"v").is_err(),
            "a timed-out connection is not reused"
        );
    }
}
