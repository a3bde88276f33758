//! A job secret handed from rank 0 to the other ranks of its host without crossing the store:
//! rank 0 keeps it in a `memfd`, the store carries only where it is (pid and descriptor), and
//! the others read it through `/proc`, which the kernel opens only for processes of the same
//! user. A rank on another host cannot read it, so a job across hosts must be given
//! `XCCL_JOB_SECRET` instead.

use super::Store;
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::Instant;

const KEY: &str = "tcp/secret-at";
const NAME: &str = "xccl-job-secret";
const LEN: usize = 32;

/// Rank 0's copy of the secret; others can read it while this lives.
pub struct Held(#[allow(dead_code)] OwnedFd);

/// Collective: rank 0 makes a secret and publishes where it is; every rank returns it (rank 0
/// also the holder to keep until every rank has read it, e.g. until the links are up).
pub fn share(store: &dyn Store, rank: usize, deadline: Instant) -> Result<(Vec<u8>, Option<Held>)> {
    if rank == 0 {
        let mut secret = vec![0u8; LEN];
        super::fill_random(&mut secret);
        let fd = rustix::fs::memfd_create(NAME, rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| Error::system("memfd for the job secret", e.into()))?;
        std::fs::File::from(fd.try_clone().map_err(|e| Error::system("dup", e))?)
            .write_all(&secret)
            .map_err(|e| Error::system("writing the job secret", e))?;
        let at = format!("{}/{}", std::process::id(), fd.as_raw_fd());
        store.set(KEY, at.as_bytes())?;
        return Ok((secret, Some(Held(fd))));
    }
    let at = String::from_utf8_lossy(&store.get(KEY, deadline)?).into_owned();
    let bad = |why: String| {
        Error::InvalidUsage(format!(
            "cannot read rank 0's job secret ({why}); a TCP job across hosts needs \
             XCCL_JOB_SECRET, the same on every rank"
        ))
    };
    let (pid, fd) = at
        .split_once('/')
        .and_then(|(p, f)| Some((p.parse::<u32>().ok()?, f.parse::<u32>().ok()?)))
        .ok_or_else(|| bad(format!("the store says {at:?}")))?;
    let path = format!("/proc/{pid}/fd/{fd}");
    // Only a descriptor of our own user's process, and only the secret's memfd.
    let me = rustix::process::geteuid().as_raw();
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map_err(|e| bad(format!("process {pid}: {e}")))?
        .uid();
    if owner != me {
        return Err(bad(format!("process {pid} belongs to user {owner}")));
    }
    let target = std::fs::read_link(&path).map_err(|e| bad(format!("{path}: {e}")))?;
    if !target
        .to_string_lossy()
        .starts_with(&format!("/memfd:{NAME}"))
    {
        return Err(bad(format!("{path} is {}", target.display())));
    }
    let mut secret = vec![0u8; LEN];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(|e| bad(format!("{path}: {e}")))?;
    Ok((secret, None))
}
