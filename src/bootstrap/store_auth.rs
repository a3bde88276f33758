//! The TCP store's opening handshake: the server says whether it requires the job secret;
//! if it does, client and server each prove they know it (HMAC-SHA256 over fresh nonces from
//! both sides), so neither a stranger's client nor a fake server takes part. A client that
//! holds a secret refuses a server that asks for none. The whole handshake has one deadline.

use crate::error::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x5843_5354; // "XCST"
const VERSION: u32 = 1;
/// How long a whole handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

fn mac(secret: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in [label, a, b] {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
fn same(a: &[u8; 32], b: &[u8]) -> bool {
    b.len() == 32 && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    super::fill_random(&mut n);
    n
}

fn refused(why: String) -> Error {
    Error::InvalidUsage(format!("TCP store handshake: {why}"))
}

/// Reads exactly `buf.len()` bytes by `deadline` (each read waits only for what is left).
pub(crate) fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_by(s: &mut TcpStream, data: &[u8], deadline: Instant) -> std::io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
    s.write_all(data)
}

/// Server side: `Ok` once the client may send requests.
pub(crate) fn serve(s: &mut TcpStream, secret: Option<&[u8]>) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io = |e| Error::system("TCP store handshake", e);
    let ns = nonce();
    let mut hello = Vec::with_capacity(25);
    hello.extend_from_slice(&MAGIC.to_le_bytes());
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&ns);
    hello.push(secret.is_some() as u8);
    write_by(s, &hello, deadline).map_err(io)?;
    if let Some(secret) = secret {
        let mut proof = [0u8; 16 + 32];
        read_by(s, &mut proof, deadline).map_err(io)?;
        let nc = &proof[..16];
        if !same(&mac(secret, b"xccl-store-client", &ns, nc), &proof[16..]) {
            let _ = write_by(s, &[0], deadline);
            return Err(refused("a client does not know the job secret".into()));
        }
        let mut answer = vec![1u8];
        answer.extend_from_slice(&mac(secret, b"xccl-store-server", nc, &ns));
        write_by(s, &answer, deadline).map_err(io)?;
    }
    s.set_write_timeout(None).map_err(io)
}

/// Client side: `Ok` once requests may be sent.
pub(crate) fn join(s: &mut TcpStream, secret: Option<&[u8]>) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let io = |e| Error::system("TCP store handshake", e);
    let mut hello = [0u8; 25];
    read_by(s, &mut hello, deadline).map_err(io)?;
    let word = |i: usize| u32::from_le_bytes(hello[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if word(0) != MAGIC || word(1) != VERSION {
        return Err(Error::ProtocolViolation("not an xccl TCP store".into()));
    }
    let ns = &hello[8..24];
    match (hello[24], secret) {
        (0, None) => {}
        (0, Some(_)) => {
            return Err(refused(
                "the store asks for no secret but this rank has one (XCCL_JOB_SECRET): \
                 not the job's store"
                    .into(),
            ))
        }
        (_, None) => {
            return Err(refused(
                "the store requires the job secret: set XCCL_JOB_SECRET as the launcher did".into(),
            ))
        }
        (_, Some(secret)) => {
            let nc = nonce();
            let mut proof = nc.to_vec();
            proof.extend_from_slice(&mac(secret, b"xccl-store-client", ns, &nc));
            write_by(s, &proof, deadline).map_err(io)?;
            let mut answer = [0u8; 33];
            read_by(s, &mut answer[..1], deadline).map_err(io)?;
            if answer[0] != 1 {
                return Err(refused("the store refused the job secret".into()));
            }
            read_by(s, &mut answer[1..], deadline).map_err(io)?;
            if !same(&mac(secret, b"xccl-store-server", &nc, ns), &answer[1..]) {
                return Err(refused("the store does not know the job secret".into()));
            }
        }
    }
    s.set_write_timeout(None).map_err(io)
}
