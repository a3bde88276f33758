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
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// Bytes of keys and values the server holds at most.
const MAX_STORED: usize = 64 << 20;
/// Client connections served at once; more are closed unread.
const MAX_CONNECTIONS: usize = 256;
/// How long a connection may wait between requests (longer than any setup deadline).
const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// How long the rest of a request may take once its first byte has arrived.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Table {
    map: Mutex<Stored>,
    changed: Condvar,
}

#[derive(Default)]
struct Stored {
    entries: HashMap<String, Vec<u8>>,
    bytes: usize,
}

impl Stored {
    /// Sets `key`, unless the store would then hold more than [`MAX_STORED`] bytes.
    fn set(&mut self, key: String, value: Vec<u8>) -> bool {
        let old = self.entries.get(&key).map_or(0, |v| key.len() + v.len());
        let bytes = self.bytes - old + key.len() + value.len();
        if bytes > MAX_STORED {
            return false;
        }
        self.bytes = bytes;
        self.entries.insert(key, value);
        true
    }
}

/// The live client connections, so that dropping the server ends them.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
}

/// The store server. It serves until dropped.
pub struct TcpStoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Connections>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Binds `addr` (port 0 picks a free port) and starts serving. With a `secret`, every
    /// client must prove it before its first request; without one, the store is open to
    /// anyone who can reach it, and must then carry nothing secret.
    pub fn bind(addr: impl ToSocketAddrs, secret: Option<&[u8]>) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).map_err(|e| Error::system("binding the TCP store", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::system("TCP store address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Connections> = Arc::default();
        let table: Arc<Table> = Arc::default();
        let secret: Option<Arc<[u8]>> = secret.map(Arc::from);
        let (stop2, conns2) = (stop.clone(), conns.clone());
        let acceptor = std::thread::Builder::new()
            .name("xccl-store".into())
            .spawn(move || {
                let mut backoff = Duration::from_millis(5);
                // Client threads: those that ended are joined at least every 50 ms (a server
                // that lives long leaves nothing of past clients behind), the rest before
                // the server is gone.
                let mut clients: Vec<std::thread::JoinHandle<()>> = Vec::new();
                let _ = listener.set_nonblocking(true);
                loop {
                    join_finished(&mut clients);
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let conn = match listener.accept() {
                        Ok((c, _)) => {
                            let _ = c.set_nonblocking(false);
                            c
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            let mut p = libc::pollfd {
                                fd: listener.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one valid pollfd; 50 ms bounds how late `stop` is seen
                            // and ended clients are joined.
                            unsafe { libc::poll(&mut p, 1, 50) };
                            continue;
                        }
                        Err(e) => {
                            // Out of descriptors: the connection stays queued; do not spin.
                            tracing::warn!(error = %e, "TCP store: accept failed; backing off");
                            std::thread::sleep(backoff); // pacing of retries after an error
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                            continue;
                        }
                    };
                    backoff = Duration::from_millis(5);
                    let Some(id) = conns2.admit(&conn) else {
                        tracing::warn!("TCP store: {MAX_CONNECTIONS} clients at once; one refused");
                        continue; // dropping `conn` closes it
                    };
                    let _ = conn.set_nodelay(true);
                    let (table, conns, secret) = (table.clone(), conns2.clone(), secret.clone());
                    let spawned = std::thread::Builder::new()
                        .name("xccl-store-conn".into())
                        .spawn(move || {
                            let mut conn = conn;
                            match store_auth::serve(&mut conn, secret.as_deref()) {
                                Ok(()) => serve(conn, &table),
                                Err(e) => tracing::warn!(error = %e, "TCP store: client refused"),
                            }
                            conns.leave(id);
                        });
                    match spawned {
                        Ok(h) => clients.push(h),
                        Err(_) => conns2.leave(id),
                    }
                }
                // No client is admitted any more: end the ones still open (one may have come
                // in after `drop` ended the others), then wait for their threads.
                for (_, c) in conns2
                    .open
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain()
                {
                    let _ = c.shutdown(Shutdown::Both);
                }
                for h in clients {
                    let _ = h.join();
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

    /// Client connections open right now.
    pub fn connections(&self) -> usize {
        self.conns
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Connections {
    /// Records a new client unless [`MAX_CONNECTIONS`] are open; its id.
    fn admit(&self, conn: &TcpStream) -> Option<u64> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= MAX_CONNECTIONS {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(id, conn.try_clone().ok()?);
        Some(id)
    }

    /// Forgets a client whose connection has ended (closing the server's copy of it).
    fn leave(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock accept with a connection of our own, then end every client connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for (_, c) in self
            .conns
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// Joins the threads of `handles` that have ended.
fn join_finished(handles: &mut Vec<std::thread::JoinHandle<()>>) {
    let mut i = 0;
    while i < handles.len() {
        if handles[i].is_finished() {
            let _ = handles.swap_remove(i).join();
        } else {
            i += 1;
        }
    }
}

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

fn answer(s: &mut TcpStream, status: u8, data: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(status);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)
}

/// Serves one client until it disconnects, misbehaves, dawdles or idles too long.
fn serve(mut s: TcpStream, table: &Table) {
    loop {
        let mut op = [0u8; 1];
        if read_by(&mut s, &mut op, Instant::now() + IDLE_LIMIT).is_err() {
            return;
        }
        let by = Instant::now() + REQUEST_LIMIT;
        let Ok(Some(key)) = read_capped_by(&mut s, MAX_KEY, by) else {
            let _ = answer(&mut s, ST_BAD, b"key too long or too slow");
            return;
        };
        let Ok(Some(val)) = read_capped_by(&mut s, MAX_VALUE, by) else {
            let _ = answer(&mut s, ST_BAD, b"value too long or too slow");
            return;
        };
        let Ok(key) = String::from_utf8(key) else {
            let _ = answer(&mut s, ST_BAD, b"key is not UTF-8");
            return;
        };
        let res = match op[0] {
            OP_SET => {
                let stored = table
                    .map
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set(key, val);
                if stored {
                    table.changed.notify_all();
                    answer(&mut s, ST_OK, &[])
                } else {
                    answer(&mut s, ST_BAD, b"store full")
                }
            }
            OP_GET => {
                // The value field carries the client's wait budget in milliseconds.
                let ms = val
                    .get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                let deadline = Instant::now() + Duration::from_millis(ms.min(3_600_000));
                let mut map = table.map.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(v) = map.entries.get(&key) {
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
                match map
                    .entries
                    .get(&key)
                    .map(|v| parse_counter(&key, v))
                    .transpose()
                {
                    Ok(cur) => {
                        let new = cur.unwrap_or(0).wrapping_add(delta);
                        if map.set(key, new.to_string().into_bytes()) {
                            drop(map);
                            table.changed.notify_all();
                            answer(&mut s, ST_OK, &new.to_le_bytes())
                        } else {
                            drop(map);
                            answer(&mut s, ST_BAD, b"store full")
                        }
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
    /// Connects to `addr`, retrying until `deadline` while the server is not up yet, and
    /// proves `secret` when the server requires it (a client with a secret refuses a server
    /// that asks for none).
    pub fn connect(addr: &str, secret: Option<&[u8]>, deadline: Instant) -> Result<Self> {
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
                            Ok(mut s) => {
                                let _ = s.set_nodelay(true);
                                store_auth::join(&mut s, secret)?;
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
        // One deadline for the whole exchange, however the answer is split.
        let by = start + io_timeout.max(Duration::from_millis(1));
        let exchanged = s
            .set_write_timeout(Some(io_timeout.max(Duration::from_millis(1))))
            .and_then(|()| s.write_all(&frame))
            .and_then(|()| {
                let mut st = [0u8; 1];
                read_by(&mut s, &mut st, by)?;
                Ok((st[0], read_capped_by(&mut s, MAX_VALUE, by)?))
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
    use std::io::Read;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    /// The server's opening hello (25 bytes) as a raw client sees it.
    fn skip_hello(s: &mut TcpStream) -> u8 {
        let mut hello = [0u8; 25];
        s.read_exact(&mut hello).unwrap();
        hello[24]
    }

    #[test]
    fn clients_rendezvous_and_bad_frames_are_dropped() {
        let server = TcpStoreServer::bind("127.0.0.1:0", None).unwrap();
        let addr = server.addr().to_string();
        let d = deadline();
        // A client announcing a huge key is cut off; the store keeps serving others.
        let mut rogue = TcpStream::connect(&addr).unwrap();
        assert_eq!(skip_hello(&mut rogue), 0, "an open store");
        rogue.write_all(&[OP_SET, 0xff, 0xff, 0xff, 0xff]).unwrap();
        std::thread::scope(|s| {
            for _ in 0..3 {
                let addr = addr.clone();
                s.spawn(move || {
                    let c = TcpStore::connect(&addr, None, d).unwrap();
                    store_barrier(&c, "b", 3, d).unwrap();
                });
            }
        });
        let mut st = [0u8; 1];
        rogue.read_exact(&mut st).unwrap();
        assert_eq!(st[0], ST_BAD);
        let c = TcpStore::connect(&addr, None, d).unwrap();
        c.set("k", b"value").unwrap();
        assert_eq!(c.get("k", d).unwrap(), b"value");
        assert_eq!(c.add("n", 4).unwrap(), 4);
        assert!(matches!(
            c.get("nope", Instant::now() + Duration::from_millis(30)),
            Err(Error::Timeout { .. })
        ));
    }

    /// A store server that completed the handshake and then went silent (its process
    /// stopped): a `get` fails with `Timeout` at its deadline (plus the answer grace), and the
    /// connection is not reused.
    #[test]
    fn get_from_a_silent_server_times_out_at_its_deadline() {
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = silent.accept().unwrap();
            let mut hello = 0x5843_5354u32.to_le_bytes().to_vec();
            hello.extend_from_slice(&1u32.to_le_bytes());
            hello.extend_from_slice(&[0u8; 17]);
            s.write_all(&hello).unwrap();
            s // held open, never answering
        });
        let c = TcpStore::connect(&addr, None, deadline()).unwrap();
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
        drop(server.join().unwrap());
    }

    /// With a secret, only clients that prove it are served: a stranger's client (no secret,
    /// a wrong one, or raw bytes) reads nothing, and a rank with the secret refuses a store
    /// that asks for none (it would not be the job's).
    #[test]
    fn a_secured_store_serves_only_clients_with_the_secret() {
        let secret = b"the job secret".as_slice();
        let server = TcpStoreServer::bind("127.0.0.1:0", Some(secret)).unwrap();
        let addr = server.addr().to_string();
        let rank = TcpStore::connect(&addr, Some(secret), deadline()).unwrap();
        rank.set("xccl/tcp/addr/0", b"127.0.0.1:1").unwrap();
        match TcpStore::connect(&addr, None, deadline()) {
            Err(Error::InvalidUsage(m)) => assert!(m.contains("requires the job secret"), "{m}"),
            other => panic!("no secret: {:?}", other.err()),
        }
        assert!(TcpStore::connect(&addr, Some(b"a guess"), deadline()).is_err());
        let mut raw = TcpStream::connect(&addr).unwrap();
        assert_eq!(skip_hello(&mut raw), 1, "a secured store");
        let mut get = vec![OP_GET];
        get.extend_from_slice(&15u32.to_le_bytes());
        get.extend_from_slice(b"xccl/tcp/addr/0");
        get.extend_from_slice(&8u32.to_le_bytes());
        get.extend_from_slice(&1000u64.to_le_bytes());
        let _ = raw.write_all(&[0u8; 48]); // a proof made without the secret
        let _ = raw.write_all(&get);
        let mut answer = Vec::new();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = raw.read_to_end(&mut answer);
        assert!(
            !answer.windows(11).any(|w| w == b"127.0.0.1:1"),
            "{answer:?}"
        );
        assert_eq!(
            rank.get("xccl/tcp/addr/0", deadline()).unwrap(),
            b"127.0.0.1:1"
        );
        let open = TcpStoreServer::bind("127.0.0.1:0", None).unwrap();
        let a = open.addr().to_string();
        assert!(TcpStore::connect(&a, Some(secret), deadline()).is_err());
    }

    fn open_descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// What a client can take is bounded: connections that come and go are all released,
    /// the bytes stored are capped, and a client that dawdles over the handshake is cut off.
    #[test]
    fn the_store_bounds_connections_bytes_and_handshakes() {
        let server = TcpStoreServer::bind("127.0.0.1:0", None).unwrap();
        let addr = server.addr().to_string();
        let fds = open_descriptors();
        for _ in 0..2000 {
            drop(TcpStore::connect(&addr, None, deadline()).unwrap());
        }
        let settle = Instant::now() + Duration::from_secs(10);
        while server.connections() > 0 && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(10)); // waiting for servers to see EOF
        }
        assert_eq!(server.connections(), 0, "connections still held");
        assert!(
            open_descriptors() <= fds + 8,
            "{fds} -> {} descriptors",
            open_descriptors()
        );
        let c = TcpStore::connect(&addr, None, deadline()).unwrap();
        let big = vec![7u8; MAX_VALUE];
        let mut stored = 0;
        let refused = (0..8).find_map(|i| match c.set(&format!("big{i}"), &big) {
            Ok(()) => {
                stored += big.len();
                None
            }
            Err(e) => Some(e),
        });
        assert!(stored <= MAX_STORED, "{stored} bytes stored");
        match refused {
            Some(Error::ProtocolViolation(m)) => assert!(m.contains("store full"), "{m}"),
            other => panic!("past the cap: {other:?}"),
        }
        c.set("big0", b"small").unwrap(); // overwriting frees room
        c.set("more", &big).unwrap();
        // A secured store cuts a client that says nothing at the handshake's deadline.
        let start = Instant::now();
        let mut b = [0u8; 1];
        let secured = TcpStoreServer::bind("127.0.0.1:0", Some(b"s".as_slice())).unwrap();
        let mut mute = TcpStream::connect(secured.addr()).unwrap();
        skip_hello(&mut mute);
        mute.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let cut = matches!(mute.read(&mut b), Ok(0) | Err(_));
        assert!(cut, "a mute client kept its handshake open");
        assert!(
            start.elapsed() < store_auth::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
            "cut after {:?}",
            start.elapsed()
        );
    }
}
