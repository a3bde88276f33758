//! Fixed-size messages with an optional descriptor (`SCM_RIGHTS`) over a Unix stream socket.

use crate::error::{Error, Result};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Bytes of every message on a mesh link.
pub(crate) const MSG_LEN: usize = 32;
const MSG_MAGIC: u32 = 0x5843_4D31; // "XCM1"

/// A mesh message: `kind`, then three 64-bit fields whose meaning depends on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Msg {
    pub kind: u32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

impl Msg {
    fn encode(&self) -> [u8; MSG_LEN] {
        let mut out = [0u8; MSG_LEN];
        out[0..4].copy_from_slice(&MSG_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..16].copy_from_slice(&self.a.to_le_bytes());
        out[16..24].copy_from_slice(&self.b.to_le_bytes());
        out[24..32].copy_from_slice(&self.c.to_le_bytes());
        out
    }

    fn decode(buf: &[u8; MSG_LEN]) -> Result<Msg> {
        let word = |r: std::ops::Range<usize>| -> u64 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[r]);
            u64::from_le_bytes(b)
        };
        let magic = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != MSG_MAGIC {
            return Err(Error::Protocol(format!(
                "bad mesh message magic {magic:#x}"
            )));
        }
        Ok(Msg {
            kind: u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]),
            a: word(8..16),
            b: word(16..24),
            c: word(24..32),
        })
    }
}

/// Sends `msg`, with `fd` attached when given. Blocks only while the socket buffer is full.
pub(crate) fn send(sock: &UnixStream, msg: &Msg, fd: Option<BorrowedFd<'_>>) -> Result<()> {
    let bytes = msg.encode();
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(Error::Protocol(
            "no room for a descriptor in a mesh message".into(),
        ));
    }
    let n = sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| Error::io("sending on a mesh link", e.into()))?;
    if n != MSG_LEN {
        return Err(Error::Protocol(format!(
            "short send of a mesh message ({n} bytes)"
        )));
    }
    Ok(())
}

/// Waits until `sock` is readable or `deadline` passes.
pub(crate) fn wait_readable(sock: &UnixStream, deadline: Instant, what: &str) -> Result<()> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout(what.to_string()));
        }
        let left = Timespec::try_from(deadline - now).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = [PollFd::new(sock, PollFlags::IN)];
        match poll(&mut fds, Some(&left)) {
            Ok(0) => {}
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::io(format!("poll while {what}"), e.into())),
        }
    }
}

/// Receives one message and the descriptor attached to it, if any, by `deadline`.
/// `Ok(None)` means the peer closed the link.
pub(crate) fn recv(
    sock: &UnixStream,
    deadline: Instant,
    what: &str,
) -> Result<Option<(Msg, Option<OwnedFd>)>> {
    wait_readable(sock, deadline, what)?;
    let mut bytes = [0u8; MSG_LEN];
    // Room for more descriptors than expected, so extra ones are received (and closed) rather
    // than silently dropped with MSG_CTRUNC.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::WAITALL | RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| Error::io(format!("receiving on a mesh link while {what}"), e.into()))?;
    // Take ownership of every received descriptor first, so none leaks on an error below.
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    if got.bytes != MSG_LEN {
        return Err(Error::Protocol(format!(
            "short mesh message ({} of {MSG_LEN} bytes)",
            got.bytes
        )));
    }
    if got.flags.contains(ReturnFlags::CTRUNC) || fds.len() > 1 {
        return Err(Error::Protocol(
            "mesh message carried unexpected descriptors".into(),
        ));
    }
    Ok(Some((Msg::decode(&bytes)?, fds.pop())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn message_and_descriptor_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let m = Msg {
            kind: 3,
            a: 1,
            b: u64::MAX,
            c: 42,
        };
        send(&a, &m, Some(f.as_fd())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (got, fd) = recv(&b, deadline, "test").unwrap().unwrap();
        assert_eq!(got, m);
        assert!(fd.is_some());
        drop(a);
        assert!(recv(&b, deadline, "test").unwrap().is_none());
    }

    #[test]
    fn garbage_is_rejected() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0xAB; MSG_LEN]).unwrap();
        let err = recv(&b, Instant::now() + Duration::from_secs(5), "test").unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
    }
}
