//! Sending: frames out on a link (vectored, interruptible every 50 ms), the abort frame,
//! and the goodbye half-close.

use super::*;
use rustix::net::{send, sendmsg, SendAncillaryBuffer, SendFlags};

impl Shared {
    pub(super) fn send(&self, peer: usize, f: &Frame, payload: &[u8]) -> Result<()> {
        self.send_parts(peer, f, &[payload])
    }

    /// Sends one frame whose payload is `parts`, end to end.
    pub(super) fn send_parts(&self, peer: usize, f: &Frame, parts: &[&[u8]]) -> Result<()> {
        self.send_held(peer, f, parts, false)
    }

    /// [`Shared::send_parts`]; with `hold`, the caller sends another frame to `peer` at once,
    /// and this one may wait in the socket to leave with it.
    pub(super) fn send_held(
        &self,
        peer: usize,
        f: &Frame,
        parts: &[&[u8]],
        hold: bool,
    ) -> Result<()> {
        if let Some(e) = self.interrupted() {
            return Err(e);
        }
        let hdr = f.encode();
        let mut guard = self.writers[peer].lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the writer lock, which `say_bye` holds while it sends the goodbye:
        // no request can slip in behind it.
        if !matches!(f.kind, Kind::ReadResp | Kind::FlushAck)
            && self.bye_sent[peer].load(Ordering::SeqCst)
        {
            return Err(Error::Closed(format!(
                "rank {} has said goodbye to rank {peer}",
                self.cfg.rank
            )));
        }
        let Some(s) = guard.as_mut() else {
            return Err(Error::Invalid(format!("no link to rank {peer}")));
        };
        let stopped = || self.must_stop_writing();
        // A plain write is seen by the peer only after a later signal (or answered after a
        // later flush or read) on this same stream, each sent without this flag: the kernel
        // may hold it back and send it with what follows (a record and its announcement
        // leave in one segment). So may a frame the caller follows at once (`hold`).
        let more = hold || (f.kind == Kind::Write && f.flags & FLAG_SIGNAL == 0);
        let r = match parts {
            [payload] => write_all_vectored(s, &hdr, payload, more, &stopped),
            _ => write_all_parts(s, &hdr, parts, more, &stopped),
        };
        if r.is_ok() && self.aborted.load(Ordering::SeqCst) != 0 {
            // `abort` found this link busy: the peer still has to hear of it.
            self.send_abort(peer, s);
        }
        drop(guard);
        match r {
            Ok(()) => {
                self.last_sent[peer].store(self.now_us(), Ordering::Relaxed);
                Ok(())
            }
            Err(WriteEnd::Stopped) => {
                // Part of a frame may have gone out: nothing can follow it on this stream.
                self.shutdown_link(peer);
                Err(self.interrupted().unwrap_or(Error::Aborted))
            }
            Err(WriteEnd::Io(e)) => {
                self.fail(peer, &format!("send failed: {e}"));
                Err(Error::PeerFailed {
                    rank: peer,
                    detail: e.to_string(),
                })
            }
        }
    }

    /// Tells `peer` of the abort, once, on its (locked) writer; gives up at the first stall
    /// (the link is then shut, which the peer sees as well).
    pub(super) fn send_abort(&self, peer: usize, s: &mut TcpStream) {
        if self.abort_sent[peer].swap(true, Ordering::SeqCst) {
            return;
        }
        let hdr = Frame::new(Kind::Abort).encode();
        if write_all_parts(s, &hdr, &[], false, &|| true).is_err() {
            self.shutdown_link(peer);
        }
    }
}

/// Why a frame could not be written whole.
pub(super) enum WriteEnd {
    /// The socket failed.
    Io(std::io::Error),
    /// The node was interrupted (abort, a failed peer) while the socket was full.
    Stopped,
}

/// How long one blocking write may wait on a full socket before the writer looks at whether
/// it was interrupted (the send timeout of every link).
pub(super) const WRITE_SLICE: Duration = Duration::from_millis(50);

/// Runs one write; a write the send timeout cut short is tried again unless `stopped()`.
pub(super) fn retrying(
    mut write: impl FnMut() -> std::io::Result<usize>,
    stopped: &dyn Fn() -> bool,
) -> std::result::Result<usize, WriteEnd> {
    loop {
        match write() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                if stopped() {
                    return Err(WriteEnd::Stopped);
                }
            }
            Err(e) => return Err(WriteEnd::Io(e)),
            Ok(0) => return Err(WriteEnd::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => return Ok(n),
        }
    }
}

impl Shared {
    /// Tells `peer` that this rank asks nothing more of it; shuts the writer down if the peer
    /// said the same already. Idempotent.
    pub(super) fn say_bye(&self, peer: usize) {
        let mut guard = self.writers[peer].lock().unwrap_or_else(|p| p.into_inner());
        if self.bye_sent[peer].swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(s) = guard.as_mut() {
            let hdr = Frame::new(Kind::Bye).encode();
            let stopped = || self.must_stop_writing();
            if write_all_parts(s, &hdr, &[], false, &stopped).is_err() {
                self.shutdown_link(peer);
            }
            // SeqCst pair with `peer_said_bye`: the goodbye flag is stored there before the
            // writer lock is taken, so one of the two sees both goodbyes and shuts down.
            if self.departed[peer].load(Ordering::SeqCst) {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }

    /// The peer's goodbye arrived: it asks nothing more of this rank.
    pub(super) fn peer_said_bye(&self, peer: usize) {
        self.departed[peer].store(true, Ordering::SeqCst);
        let guard = self.writers[peer].lock().unwrap_or_else(|p| p.into_inner());
        if self.bye_sent[peer].load(Ordering::SeqCst) {
            if let Some(s) = guard.as_ref() {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
        drop(guard);
        self.notify();
    }

    /// The peer's stream ended after its goodbye: nothing more will come from it.
    pub(super) fn link_finished(&self, peer: usize) {
        self.finished[peer].store(true, Ordering::SeqCst);
        self.closed[peer].store(true, Ordering::SeqCst);
        self.notify();
    }
}

/// The flags of every write: never SIGPIPE (a peer gone is an error for the caller, not a
/// signal that ends a process whose SIGPIPE is not ignored), and `MSG_MORE` when `more`
/// (more follows soon: the kernel may hold a partial segment back for it).
fn flags(more: bool) -> SendFlags {
    if more {
        SendFlags::NOSIGNAL | SendFlags::MORE
    } else {
        SendFlags::NOSIGNAL
    }
}

/// One vectored write (see [`flags`]).
fn send_parts(s: &TcpStream, parts: &[IoSlice<'_>], more: bool) -> std::io::Result<usize> {
    let mut no_control = SendAncillaryBuffer::default();
    sendmsg(s, parts, &mut no_control, flags(more)).map_err(Into::into)
}

/// One plain write (see [`flags`]).
pub(crate) fn send_bytes(s: &TcpStream, bytes: &[u8], more: bool) -> std::io::Result<usize> {
    send(s, bytes, flags(more)).map_err(Into::into)
}

/// Writes a header and its payload (`stopped` as in [`retrying`]).
pub(super) fn write_all_vectored(
    s: &mut TcpStream,
    hdr: &[u8],
    payload: &[u8],
    more: bool,
    stopped: &dyn Fn() -> bool,
) -> std::result::Result<(), WriteEnd> {
    if payload.len() <= 256 {
        // A small frame goes out in one plain write (cheaper than a two-part writev).
        let mut one = [0u8; HDR + 256];
        one[..hdr.len()].copy_from_slice(hdr);
        one[hdr.len()..hdr.len() + payload.len()].copy_from_slice(payload);
        return write_all_parts(s, &one[..hdr.len() + payload.len()], &[], more, stopped);
    }
    let total = hdr.len() + payload.len();
    let mut done = 0;
    while done < total {
        done += if done < hdr.len() {
            retrying(
                || {
                    send_parts(
                        s,
                        &[IoSlice::new(&hdr[done..]), IoSlice::new(payload)],
                        more,
                    )
                },
                stopped,
            )?
        } else {
            retrying(
                || send_bytes(s, &payload[done - hdr.len()..], more),
                stopped,
            )?
        };
    }
    Ok(())
}

/// Writes the header and then every part, however the socket splits the writes
/// (`stopped` as in [`retrying`]).
pub(super) fn write_all_parts(
    s: &mut TcpStream,
    hdr: &[u8],
    parts: &[&[u8]],
    more: bool,
    stopped: &dyn Fn() -> bool,
) -> std::result::Result<(), WriteEnd> {
    let mut slices: SmallVec<[IoSlice; 8]> = std::iter::once(hdr)
        .chain(parts.iter().copied())
        .filter(|p| !p.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = retrying(|| send_parts(s, rest, more), stopped)?;
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Consecutive byte ranges of a list of parts, taken front to back.
pub(super) struct Pieces<'a> {
    pub(super) parts: &'a [&'a [u8]],
    /// Bytes of `parts[0]` already taken.
    pub(super) at: usize,
}

impl<'a> Pieces<'a> {
    pub(super) fn new(parts: &'a [&'a [u8]]) -> Self {
        Pieces { parts, at: 0 }
    }

    /// The next `len` bytes (fewer if the parts run out), as slices of the parts.
    pub(super) fn take(&mut self, mut len: usize) -> SmallVec<[&'a [u8]; 4]> {
        let mut out = SmallVec::new();
        while len > 0 {
            let Some((first, rest)) = self.parts.split_first() else {
                break;
            };
            let piece = &first[self.at..];
            let n = piece.len().min(len);
            out.push(&piece[..n]);
            len -= n;
            self.at += n;
            if self.at == first.len() {
                self.parts = rest;
                self.at = 0;
            }
        }
        out
    }
}
