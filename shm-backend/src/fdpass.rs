//! Fixed-size messages with an optional descriptor (`SCM_RIGHTS`) over a Unix stream socket.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: MSG_LEN,
    };
    // u64-aligned room for one control message carrying one descriptor.
    let mut cbuf = [0u64; 4];
    // SAFETY: a zeroed msghdr is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&cbuf));
        hdr.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        hdr.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` writable, aligned bytes, so CMSG_FIRSTHDR is
        // non-null and the header and its one-descriptor payload fit inside `cbuf`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd.as_raw_fd());
        }
    }
    // SAFETY: `hdr` points at live buffers (`bytes`, `cbuf`) for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(Error::last_os("sending on a mesh link"));
    }
    if n as usize != MSG_LEN {
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
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(format!("poll while {what}"), e));
        }
        if rc > 0 {
            return Ok(());
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
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr() as *mut libc::c_void,
        iov_len: MSG_LEN,
    };
    // Room for more descriptors than expected, so extra ones are received (and closed) rather
    // than silently dropped with MSG_CTRUNC.
    let mut cbuf = [0u64; 16];
    // SAFETY: a zeroed msghdr is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: `hdr` points at live writable buffers of the sizes given.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut hdr,
            libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(Error::last_os(format!(
            "receiving on a mesh link while {what}"
        )));
    }
    // Take ownership of every received descriptor first, so none leaks on an error below.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: the kernel filled `hdr.msg_control` with `msg_controllen` bytes of well-formed
    // control messages; CMSG_FIRSTHDR/NXTHDR walk only within them. Each SCM_RIGHTS payload is
    // an array of descriptors now owned by this process.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let payload = (*c).cmsg_len as usize - (data as usize - c as usize);
                for k in 0..payload / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(k));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if n == 0 {
        return Ok(None);
    }
    if n as usize != MSG_LEN {
        return Err(Error::Protocol(format!(
            "short mesh message ({n} of {MSG_LEN} bytes)"
        )));
    }
    if hdr.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > 1 {
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
