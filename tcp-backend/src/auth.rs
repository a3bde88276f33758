//! Peer authentication: HMAC-SHA256 challenge–response over the job secret, run before the
//! acceptor allocates anything for a connection. Fresh nonces on both sides make a recorded
//! exchange useless (no replay). The whole handshake has one deadline, however slowly a
//! client drips its bytes.

use crate::error::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

const HELLO_MAGIC: u32 = 0x5843_5448; // "XCTH"
const VERSION: u32 = 1;
/// How long a whole handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads exactly `buf.len()` bytes by `deadline` (each read waits only for what is left).
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant, what: &str) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Protocol(format!("handshake too slow while {what}")));
        }
        s.set_read_timeout(Some(left))
            .map_err(io("socket timeout"))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(Error::Protocol(format!("connection closed while {what}"))),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(what.to_string(), e)),
        }
    }
    Ok(())
}

/// Writes all of `data` by `deadline`.
fn write_by(s: &mut TcpStream, data: &[u8], deadline: Instant, what: &str) -> Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_write_timeout(Some(left.max(Duration::from_millis(1))))
        .map_err(io("socket timeout"))?;
    let mut done = 0;
    while done < data.len() {
        // Never SIGPIPE: a client gone mid-handshake is an error, not the end of the process.
        match rustix::net::send(&*s, &data[done..], rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => {
                return Err(Error::io(
                    what.to_string(),
                    std::io::ErrorKind::WriteZero.into(),
                ))
            }
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::io(what.to_string(), e.into())),
        }
    }
    Ok(())
}

/// Leaves the socket as the handshake found it (no timeouts).
fn done(s: &mut TcpStream) -> Result<()> {
    s.set_read_timeout(None).map_err(io("socket timeout"))?;
    s.set_write_timeout(None).map_err(io("socket timeout"))
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).expect("the operating system's random source");
    n
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(what.to_string(), e)
}

/// Constant-time comparison of two MACs.
fn same(a: &[u8; 32], b: &[u8]) -> bool {
    b.len() == 32 && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Connector side: proves knowledge of `secret` to rank `expect` and checks it knows it too.
pub(crate) fn connect(
    s: &mut TcpStream,
    secret: &[u8],
    rank: u32,
    world: u32,
    expect: u32,
) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let nc = nonce();
    let mut hello = Vec::with_capacity(32);
    hello.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&rank.to_le_bytes());
    hello.extend_from_slice(&world.to_le_bytes());
    hello.extend_from_slice(&nc);
    write_by(s, &hello, deadline, "sending hello")?;
    let mut ch = [0u8; 16 + 4 + 32];
    read_by(s, &mut ch, deadline, "reading the challenge")?;
    let na = &ch[..16];
    let ra = u32::from_le_bytes(ch[16..20].try_into().expect("4 bytes"));
    if ra != expect {
        return Err(Error::Protocol(format!(
            "expected rank {expect}, reached rank {ra}"
        )));
    }
    let want = mac(
        secret,
        &[b"acceptor", &nc, na, &ra.to_le_bytes(), &rank.to_le_bytes()],
    );
    if !same(&want, &ch[20..]) {
        return Err(Error::Protocol(format!(
            "rank {ra} does not know the job secret"
        )));
    }
    let proof = mac(
        secret,
        &[
            b"connector",
            na,
            &nc,
            &rank.to_le_bytes(),
            &ra.to_le_bytes(),
        ],
    );
    write_by(s, &proof, deadline, "sending the proof")?;
    let mut ack = [0u8; 1];
    read_by(s, &mut ack, deadline, "reading the acceptance")?;
    if ack[0] != 1 {
        return Err(Error::Protocol(format!("rank {ra} refused the connection")));
    }
    done(s)
}

/// Acceptor side: returns the authenticated peer's rank. Reads only fixed, small messages
/// under one deadline, so garbage, slow or unauthenticated clients cost nothing.
pub(crate) fn accept(s: &mut TcpStream, secret: &[u8], rank: u32, world: u32) -> Result<u32> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut hello = [0u8; 32];
    read_by(s, &mut hello, deadline, "reading hello")?;
    let word = |i: usize| u32::from_le_bytes(hello[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if word(0) != HELLO_MAGIC || word(1) != VERSION {
        return Err(Error::Protocol("not an xccl-tcp hello".into()));
    }
    let (rc, wc) = (word(2), word(3));
    if wc != world || rc >= world || rc == rank {
        return Err(Error::Protocol(format!(
            "hello from rank {rc} of {wc}; this is rank {rank} of {world}"
        )));
    }
    let nc = &hello[16..32];
    let na = nonce();
    let m = mac(
        secret,
        &[b"acceptor", nc, &na, &rank.to_le_bytes(), &rc.to_le_bytes()],
    );
    let mut ch = Vec::with_capacity(52);
    ch.extend_from_slice(&na);
    ch.extend_from_slice(&rank.to_le_bytes());
    ch.extend_from_slice(&m);
    write_by(s, &ch, deadline, "sending the challenge")?;
    let mut proof = [0u8; 32];
    read_by(s, &mut proof, deadline, "reading the proof")?;
    let want = mac(
        secret,
        &[
            b"connector",
            &na,
            nc,
            &rc.to_le_bytes(),
            &rank.to_le_bytes(),
        ],
    );
    if !same(&want, &proof) {
        let _ = write_by(s, &[0], deadline, "refusing");
        return Err(Error::Protocol(format!(
            "a client claiming rank {rc} does not know the job secret"
        )));
    }
    write_by(s, &[1], deadline, "accepting")?;
    done(s)?;
    Ok(rc)
}
