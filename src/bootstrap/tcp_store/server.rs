//! The store's server: the table, the acceptor and one thread per connection, each request
//! checked and bounded.

use super::*;

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
                            // 50 ms bounds how late `stop` is seen and ended clients are
                            // joined.
                            let wait = rustix::event::Timespec {
                                tv_sec: 0,
                                tv_nsec: 50_000_000,
                            };
                            let readable = rustix::event::PollFlags::IN;
                            let mut p = [rustix::event::PollFd::new(&listener, readable)];
                            let _ = rustix::event::poll(&mut p, Some(&wait));
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
