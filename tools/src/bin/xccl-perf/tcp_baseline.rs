//! Plain TCP between the same two processes, for `pingpong --baseline --backend tcp`: a
//! ping-pong whose receiver polls (non-blocking reads in a loop, like a progress engine) and a
//! stream of writes, on loopback with `TCP_NODELAY` — what the tcp backend is measured against.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use xccl::{Error, Result};

/// One plain TCP connection between the pair.
pub struct PlainTcp {
    s: TcpStream,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::system(format!("plain TCP baseline: {what}"), e)
}

impl PlainTcp {
    /// The responder listens on loopback and hands its port to `publish`; the initiator gets
    /// the port from `fetch` and connects.
    pub fn connect(
        initiator: bool,
        publish: impl FnOnce(u16) -> Result<()>,
        fetch: impl FnOnce() -> Result<u16>,
    ) -> Result<Self> {
        let s = if initiator {
            let port = fetch()?;
            TcpStream::connect(("127.0.0.1", port)).map_err(io("connect"))?
        } else {
            let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind"))?;
            publish(l.local_addr().map_err(io("address"))?.port())?;
            l.accept().map_err(io("accept"))?.0
        };
        s.set_nodelay(true).map_err(io("nodelay"))?;
        s.set_nonblocking(true).map_err(io("nonblocking"))?;
        Ok(PlainTcp { s })
    }

    fn write_all(&mut self, mut buf: &[u8], deadline: Instant) -> Result<()> {
        while !buf.is_empty() {
            match self.s.write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io("write")(e)),
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    op: "plain TCP write".into(),
                    waited: Duration::ZERO,
                });
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes, polling.
    fn read_all(&mut self, buf: &mut [u8], deadline: Instant) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.s.read(&mut buf[got..]) {
                Ok(0) => return Err(Error::ProtocolViolation("plain TCP peer closed".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(io("read")(e)),
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    op: "plain TCP read".into(),
                    waited: Duration::ZERO,
                });
            }
        }
        Ok(())
    }

    /// `iters` round trips of `buf` after `warm` untimed ones; on the initiator, the one-way
    /// time of each (µs).
    pub fn pingpong(
        &mut self,
        initiator: bool,
        buf: &mut [u8],
        warm: usize,
        iters: usize,
        limit: Duration,
    ) -> Result<Vec<f64>> {
        let deadline = Instant::now() + limit;
        let mut times = Vec::with_capacity(iters);
        let mut last = Instant::now();
        for i in 0..warm + iters {
            if initiator {
                self.write_all(buf, deadline)?;
                self.read_all(buf, deadline)?;
                let now = Instant::now();
                if i >= warm {
                    times.push((now - last).as_secs_f64() * 1e6 / 2.0);
                }
                last = now;
            } else {
                self.read_all(buf, deadline)?;
                self.write_all(buf, deadline)?;
            }
        }
        Ok(times)
    }

    /// `batches` batches of `window` messages of `buf` and a one-byte acknowledgement; on the
    /// initiator, the time per message of each batch (µs).
    pub fn stream(
        &mut self,
        initiator: bool,
        buf: &mut [u8],
        window: usize,
        batches: usize,
        limit: Duration,
    ) -> Result<Vec<f64>> {
        let deadline = Instant::now() + limit;
        let mut times = Vec::with_capacity(batches);
        let mut ack = [0u8; 1];
        for _ in 0..batches {
            let s = Instant::now();
            if initiator {
                for _ in 0..window {
                    self.write_all(buf, deadline)?;
                }
                self.read_all(&mut ack, deadline)?;
                times.push(s.elapsed().as_secs_f64() * 1e6 / window as f64);
            } else {
                for _ in 0..window {
                    self.read_all(buf, deadline)?;
                }
                self.write_all(&ack, deadline)?;
            }
        }
        Ok(times)
    }

    /// The baseline of one message size: `iters` ping-pongs (after `warm`) then `batches`
    /// streamed batches of `window`; on the initiator, the median one-way time (µs) and the
    /// streaming bandwidth (GB/s), `None` on the responder.
    #[allow(clippy::too_many_arguments)]
    pub fn measure(
        &mut self,
        initiator: bool,
        buf: &mut [u8],
        warm: usize,
        iters: usize,
        window: usize,
        batches: usize,
        limit: Duration,
    ) -> Result<Option<(f64, f64)>> {
        let lat = self.pingpong(initiator, buf, warm, iters, limit)?;
        let per_msg = self.stream(initiator, buf, window, batches, limit)?;
        Ok(initiator.then(|| {
            let bw = crate::report::gbps(buf.len(), crate::report::stats(&per_msg).p50);
            (crate::report::stats(&lat).p50, bw)
        }))
    }
}
