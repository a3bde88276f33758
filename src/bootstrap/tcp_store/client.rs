//! The store's client: one authenticated connection, requests serialized, answers read by
//! their deadline.

use super::*;

/// How long past a `get`'s deadline the client waits for the server's answer to arrive (the
/// server answers "missing" at the deadline itself).
pub(super) const ANSWER_GRACE: Duration = Duration::from_millis(250);

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
