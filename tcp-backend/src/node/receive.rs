//! Receiving: a link's staging buffer, reads with deadlines, and draining whole frames
//! into `apply`.

use super::*;

pub(super) enum ReadEnd {
    Eof,
    Err(std::io::Error),
}

/// Reads exactly `buf.len()` bytes. Bytes do not count as liveness (whole frames do, in `drain`), but a read that gets no byte for the peer
/// timeout, or whose peer was declared failed meanwhile, gives up.
pub(super) fn read_exact_timed(
    s: &mut TcpStream,
    buf: &mut [u8],
    sh: &Shared,
) -> std::result::Result<(), ReadEnd> {
    let mut got = 0;
    // Poll without blocking first (bytes of a frame in flight arrive within microseconds;
    // sleeping in `read` and being woken costs far more on a virtual machine), then block.
    let mut spin_since: Option<Instant> = None;
    let mut last_byte = Instant::now();
    while got < buf.len() {
        let rest = &mut buf[got..];
        match recv_now(s, rest) {
            Ok(0) => return Err(ReadEnd::Eof),
            Ok(n) => {
                got += n;
                spin_since = None;
                last_byte = Instant::now();
                continue;
            }
            // Nothing yet, or an error the blocking read below reports.
            Err(_) => {}
        }
        let since = *spin_since.get_or_insert_with(Instant::now);
        if since.elapsed() < READ_SPIN {
            std::hint::spin_loop();
            continue;
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ReadEnd::Eof),
            Ok(k) => {
                got += k;
                last_byte = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if last_byte.elapsed() > sh.cfg.peer_timeout || sh.stop.load(Ordering::SeqCst) {
                    return Err(ReadEnd::Err(e));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadEnd::Err(e)),
        }
    }
    Ok(())
}

/// How long a reader polls a link without blocking before it sleeps in `read`.
pub(super) const READ_SPIN: Duration = Duration::from_micros(100);

/// Receiving side of a link: the socket and a staging buffer. Small frames (header and
/// payload) arrive with one `recv`; a payload larger than what the staging buffer holds is
/// read from the socket straight into its region.
pub(super) struct RxLink {
    pub(super) s: TcpStream,
    pub(super) scratch: Vec<u8>,
    pub(super) buf: Box<[u8]>,
    pub(super) start: usize,
    pub(super) end: usize,
}

pub(super) const STAGING: usize = 64 << 10;

impl RxLink {
    pub(super) fn new(s: TcpStream) -> Self {
        RxLink {
            s,
            scratch: Vec::new(),
            buf: vec![0u8; STAGING].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads whatever is waiting into the staging buffer without blocking. `Ok(false)` when
    /// nothing was there.
    pub(super) fn fill_nonblocking(&mut self) -> std::result::Result<bool, ReadEnd> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = &mut self.buf[self.end..];
        match recv_now(&self.s, room) {
            Ok(0) => Err(ReadEnd::Eof),
            Ok(n) => {
                self.end += n;
                Ok(true)
            }
            Err(e) => match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(false),
                _ => Err(ReadEnd::Err(e)),
            },
        }
    }

    /// Whether `f` (its header at the front of the staging buffer) has arrived whole: its
    /// payload is staged or waiting in the socket.
    pub(super) fn whole(&self, f: &Frame) -> bool {
        let payload = match f.kind {
            Kind::Write | Kind::ReadResp => f.len as usize,
            _ => 0,
        };
        let staged = self.end - self.start - HDR;
        if staged >= payload {
            return true;
        }
        let waiting = rustix::io::ioctl_fionread(&self.s).unwrap_or(0);
        staged as u64 + waiting >= payload as u64
    }

    /// Fills `dst` from the staging buffer, then (blocking) from the socket.
    pub(super) fn read_into(&mut self, dst: &mut [u8], sh: &Shared) -> Result<()> {
        let have = (self.end - self.start).min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        if have < dst.len() {
            read_exact_timed(&mut self.s, &mut dst[have..], sh).map_err(|e| match e {
                ReadEnd::Err(e) => Error::io("reading a payload", e),
                _ => Error::Protocol("link closed inside a frame".into()),
            })?;
        }
        Ok(())
    }
}

/// Reads and applies every frame already waiting on `peer`'s link. `false` once the link is
/// finished (its stream ended, or it failed). With `may_block` false (a caller that polls the
/// links while it waits), a frame not yet whole is left for the progress thread: a caller
/// never blocks inside a frame past its own deadline.
pub(super) fn drain(sh: &Shared, peer: usize, link: &mut RxLink, may_block: bool) -> bool {
    let fail = |why: String| {
        sh.fail(peer, &why);
        sh.closed[peer].store(true, Ordering::SeqCst);
        false
    };
    // The end of a stream after the peer's goodbye is the orderly end of the link.
    let ended = |why: String| {
        if sh.departed[peer].load(Ordering::SeqCst) {
            sh.link_finished(peer);
            false
        } else {
            fail(why)
        }
    };
    loop {
        if link.end - link.start < HDR {
            match link.fill_nonblocking() {
                Ok(true) => continue,
                Ok(false) if link.end == link.start || !may_block => return true,
                Ok(false) => {
                    // Part of a header is here: the rest is on its way; wait for it.
                    let mut hdr = [0u8; HDR];
                    if let Err(e) = link.read_into(&mut hdr, sh) {
                        return fail(e.to_string());
                    }
                    link.buf[..HDR].copy_from_slice(&hdr);
                    link.start = 0;
                    link.end = HDR;
                }
                Err(ReadEnd::Eof) => return ended("connection closed".into()),
                Err(ReadEnd::Err(e)) => return ended(format!("connection error: {e}")),
            }
        }
        let mut hdr = [0u8; HDR];
        hdr.copy_from_slice(&link.buf[link.start..link.start + HDR]);
        let frame = match Frame::decode(&hdr, sh.cfg.max_frame) {
            Ok(f) => f,
            Err(e) => return fail(e.to_string()),
        };
        if !may_block && !link.whole(&frame) {
            return true;
        }
        link.start += HDR;
        match apply(sh, peer, link, &frame) {
            Ok(()) => {
                // A whole frame: the peer is alive.
                sh.last_recv[peer].store(sh.now_us(), Ordering::Relaxed);
                // Staging empty: return rather than spend another system call to learn that
                // nothing more is there (the caller polls again anyway).
                if link.start == link.end {
                    return true;
                }
            }
            Err(e) => return fail(e.to_string()),
        }
    }
}

/// One read of what has arrived, without blocking (`WouldBlock` when nothing has).
fn recv_now(s: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    rustix::net::recv(s, buf, rustix::net::RecvFlags::DONTWAIT)
        .map(|(n, _)| n)
        .map_err(Into::into)
}
