//! A full mesh of Unix-domain links between the local ranks of one job: passes segment
//! descriptors and reports a peer whose end closes (death or exit) to a hook.

use crate::error::{Error, Result};
use crate::fdpass::{self, Msg};
use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KIND_HELLO: u32 = 1;
const KIND_SEGMENT: u32 = 2;
const KIND_VERDICT: u32 = 3;
const PROTOCOL_VERSION: u64 = 1;

/// One message from a peer, with the descriptor it carried if any.
type Received = (Msg, Option<OwnedFd>);

/// Called from the watcher thread with the rank of a peer whose link closed.
pub type PeerDownHook = Arc<dyn Fn(usize) + Send + Sync>;

/// One connection per peer, established collectively by [`Mesh::establish`].
pub struct Mesh {
    rank: usize,
    world: usize,
    links: Vec<Option<UnixStream>>,
    watcher: Option<(JoinHandle<()>, OwnedFd)>,
}

fn job_hash(job: &str) -> u64 {
    // FNV-1a: only has to tell two jobs apart, not resist an adversary (the peer's uid is
    // checked separately).
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, job.as_bytes());
    std::hash::Hasher::finish(&h)
}

fn socket_name(job: &str, rank: usize) -> Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("xccl.{job}.{rank}"))
        .map_err(|e| Error::io("building an abstract socket name", e))
}

fn peer_uid(sock: &UnixStream) -> Result<u32> {
    rustix::net::sockopt::socket_peercred(sock)
        .map(|cred| cred.uid.as_raw())
        .map_err(|e| Error::io("SO_PEERCRED on a mesh link", e.into()))
}

impl Mesh {
    /// Connects `rank` to every other rank of `job` on this host. `barrier` must return once
    /// every rank has bound its listener (it is called exactly once, after binding).
    ///
    /// `job` names the job (letters, digits, `-`, `_`; at most 64); ranks of different jobs
    /// never connect to each other. Peers running as another user are refused.
    pub fn establish(
        job: &str,
        rank: usize,
        world: usize,
        deadline: Instant,
        barrier: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Mesh> {
        if job.is_empty()
            || job.len() > 64
            || !job
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Invalid(format!(
                "job id {job:?} (want 1-64 of [A-Za-z0-9_-])"
            )));
        }
        if rank >= world {
            return Err(Error::Invalid(format!("rank {rank} >= world size {world}")));
        }
        let listener = UnixListener::bind_addr(&socket_name(job, rank)?).map_err(|e| {
            Error::io(
                format!("binding the mesh socket of rank {rank} (job {job} already running?)"),
                e,
            )
        })?;
        barrier()?;
        let hash = job_hash(job);
        let mut links: Vec<Option<UnixStream>> = (0..world).map(|_| None).collect();
        // 1. Connect to every lower rank; their listeners exist (barrier), so connect completes
        //    from the backlog without waiting for accept.
        for (peer, slot) in links.iter_mut().enumerate().take(rank) {
            let s = UnixStream::connect_addr(&socket_name(job, peer)?)
                .map_err(|e| Error::io(format!("connecting to local rank {peer}"), e))?;
            let hello = Msg {
                kind: KIND_HELLO,
                a: hash,
                b: rank as u64,
                c: world as u64,
            };
            fdpass::send(&s, &hello, None)?;
            *slot = Some(s);
        }
        // 2. Accept every higher rank and answer its hello.
        accept_higher(&listener, &mut links, (rank, world), hash, deadline)?;
        drop(listener);
        // 3. Read every lower rank's answer.
        for (peer, link) in links.iter().enumerate().take(rank) {
            let s = link.as_ref().expect("connected above");
            let (m, _) = fdpass::recv(s, deadline, "waiting for a peer's hello answer")?
                .ok_or_else(|| Error::PeerGone {
                    rank: peer,
                    detail: "closed during setup".into(),
                })?;
            if m.kind != KIND_HELLO || m.a != hash || m.b != peer as u64 || m.c != PROTOCOL_VERSION
            {
                return Err(Error::Protocol(format!(
                    "bad hello answer from rank {peer}: {m:?}"
                )));
            }
        }
        Ok(Mesh {
            rank,
            world,
            links,
            watcher: None,
        })
    }

    /// This process's rank in the mesh.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the mesh.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Collective: sends `msg` (with `fd`, if any) to every peer and receives one message from
    /// each. Entry `r` of the result is rank `r`'s message (`None` for this rank). `what` names
    /// the step in errors.
    fn all_to_all(
        &self,
        msg: &Msg,
        fd: Option<BorrowedFd<'_>>,
        deadline: Instant,
        what: &str,
    ) -> Result<Vec<Option<Received>>> {
        for link in self.links.iter().flatten() {
            fdpass::send(link, msg, fd)?;
        }
        self.links
            .iter()
            .enumerate()
            .map(|(peer, link)| {
                let Some(link) = link else { return Ok(None) };
                let waiting = format!("waiting for rank {peer}'s {what}");
                let got =
                    fdpass::recv(link, deadline, &waiting)?.ok_or_else(|| Error::PeerGone {
                        rank: peer,
                        detail: format!("link closed during the {what}"),
                    })?;
                Ok(Some(got))
            })
            .collect()
    }

    /// Collective: sends `fd` (a segment of `len` bytes, registration number `tag`) to every
    /// peer and receives each peer's. Entry `r` of the result is rank `r`'s descriptor and
    /// length (`None` for this rank). A peer that sends another tag is a protocol violation
    /// (the ranks registered in different orders).
    pub fn exchange(
        &self,
        tag: u64,
        fd: BorrowedFd<'_>,
        len: u64,
        deadline: Instant,
    ) -> Result<Vec<Option<(OwnedFd, u64)>>> {
        let msg = Msg {
            kind: KIND_SEGMENT,
            a: tag,
            b: len,
            c: 0,
        };
        let what = format!("segment #{tag}");
        let got = self.all_to_all(&msg, Some(fd), deadline, &what)?;
        let mut out = Vec::with_capacity(self.world);
        for (peer, entry) in got.into_iter().enumerate() {
            let Some((m, pfd)) = entry else {
                out.push(None);
                continue;
            };
            if m.kind != KIND_SEGMENT || m.a != tag {
                return Err(Error::Protocol(format!(
                    "rank {peer} sent message kind {} for segment #{} while #{tag} was expected \
                     (collective calls made in different orders?)",
                    m.kind, m.a
                )));
            }
            let pfd = pfd.ok_or_else(|| {
                Error::Protocol(format!(
                    "rank {peer}'s segment #{tag} arrived without a descriptor"
                ))
            })?;
            out.push(Some((pfd, m.b)));
        }
        Ok(out)
    }

    /// Collective: tells every peer whether this rank succeeded at step `tag` and learns
    /// theirs. Entry `r` of the result is rank `r`'s answer (this rank's own included), so
    /// every rank reaches the same all-or-none decision.
    pub fn agree(&self, tag: u64, ok: bool, deadline: Instant) -> Result<Vec<bool>> {
        let msg = Msg {
            kind: KIND_VERDICT,
            a: tag,
            b: ok as u64,
            c: 0,
        };
        let what = format!("verdict on step #{tag}");
        let got = self.all_to_all(&msg, None, deadline, &what)?;
        let mut out = Vec::with_capacity(self.world);
        for (peer, entry) in got.into_iter().enumerate() {
            let Some((m, pfd)) = entry else {
                out.push(ok);
                continue;
            };
            if m.kind != KIND_VERDICT || m.a != tag || m.b > 1 || pfd.is_some() {
                return Err(Error::Protocol(format!(
                    "rank {peer} sent message kind {} #{} ({}) while the verdict on #{tag} was \
                     expected (collective calls made in different orders?)",
                    m.kind, m.a, m.b
                )));
            }
            out.push(m.b == 1);
        }
        Ok(out)
    }

    /// Starts a thread that calls `hook(peer)` once for each peer whose link closes (the
    /// kernel closes it when the peer dies, even by `SIGKILL`). It reads nothing, so it never
    /// competes with [`Mesh::exchange`].
    pub fn watch(&mut self, hook: PeerDownHook) -> Result<()> {
        if self.watcher.is_some() {
            return Err(Error::Invalid("the mesh is already watched".into()));
        }
        let efd = eventfd(0, EventfdFlags::CLOEXEC)
            .map_err(|e| Error::io("eventfd for the mesh watcher", e.into()))?;
        let stop = efd
            .try_clone()
            .map_err(|e| Error::io("eventfd for the mesh watcher", e))?;
        // The watcher holds its own handles on the links: each stays open (and watched) until
        // the watcher ends, which `Drop` waits for.
        let mut watched: Vec<(usize, OwnedFd)> = Vec::new();
        for (r, l) in self.links.iter().enumerate() {
            if let Some(s) = l {
                let fd = s
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::io("duplicating a mesh link for the watcher", e))?;
                watched.push((r, fd));
            }
        }
        let handle = std::thread::Builder::new()
            .name(format!("xccl-shm-watch-{}", self.rank))
            .spawn(move || loop {
                let mut fds: Vec<PollFd<'_>> = std::iter::once(PollFd::new(&stop, PollFlags::IN))
                    .chain(
                        watched
                            .iter()
                            .map(|(_, fd)| PollFd::new(fd, PollFlags::RDHUP)),
                    )
                    .collect();
                if poll(&mut fds, None).is_err() {
                    continue; // EINTR
                }
                if !fds[0].revents().is_empty() {
                    return;
                }
                let down = PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL;
                let mut gone = Vec::new();
                for (k, p) in fds[1..].iter().enumerate() {
                    if p.revents().intersects(down) {
                        gone.push(k);
                    }
                }
                drop(fds);
                for k in gone.into_iter().rev() {
                    let (peer, _) = watched.remove(k);
                    hook(peer);
                }
            })
            .map_err(|e| Error::io("spawning the mesh watcher", e))?;
        self.watcher = Some((handle, efd));
        Ok(())
    }
}

fn accept_by(listener: &UnixListener, deadline: Instant, rank: usize) -> Result<UnixStream> {
    loop {
        match listener.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Timeout(format!(
                        "rank {rank} waiting for higher local ranks to connect"
                    )));
                }
                let wait =
                    (deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(100));
                let wait = Timespec::try_from(wait).expect("at most 100 ms");
                // Readable, interrupted or timed out: accept again either way.
                let _ = poll(&mut [PollFd::new(listener, PollFlags::IN)], Some(&wait));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("accepting a mesh link", e)),
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((handle, efd)) = self.watcher.take() {
            // Wakes the watcher's poll; an eventfd write of 8 bytes does not fail short of an
            // overflowing counter, which one write cannot reach.
            let _ = rustix::io::write(&efd, &1u64.to_ne_bytes());
            let _ = handle.join();
        }
    }
}

/// Setup step 2: accepts every rank above `rank` on `listener`, checks its hello (same user,
/// same job, same world, a rank not seen yet), answers it and keeps its link. Connections
/// from another user's process or another job are refused and the wait goes on.
fn accept_higher(
    listener: &UnixListener,
    links: &mut [Option<UnixStream>],
    (rank, world): (usize, usize),
    hash: u64,
    deadline: Instant,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("listener nonblocking", e))?;
    let my_uid = rustix::process::geteuid().as_raw();
    let mut accepted = 0;
    while accepted < world - rank - 1 {
        let s = accept_by(listener, deadline, rank)?;
        s.set_nonblocking(false)
            .map_err(|e| Error::io("link blocking", e))?;
        if peer_uid(&s)? != my_uid {
            continue; // another user's process reached our socket name
        }
        let (m, fd) = fdpass::recv(&s, deadline, "reading a peer's hello")?
            .ok_or_else(|| Error::Protocol("a peer closed its link before saying hello".into()))?;
        drop(fd);
        let peer = m.b as usize;
        if m.kind != KIND_HELLO || m.a != hash {
            continue; // not one of ours
        }
        if m.c != world as u64 {
            return Err(Error::Protocol(format!(
                "rank {peer} says the world has {} ranks, rank {rank} says {world}",
                m.c
            )));
        }
        if peer <= rank || peer >= world || links[peer].is_some() {
            return Err(Error::Protocol(format!(
                "unexpected hello from rank {peer}"
            )));
        }
        let answer = Msg {
            kind: KIND_HELLO,
            a: hash,
            b: rank as u64,
            c: PROTOCOL_VERSION,
        };
        fdpass::send(&s, &answer, None)?;
        links[peer] = Some(s);
        accepted += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Segment;
    use std::sync::{Barrier, Mutex};
    use std::time::Duration;

    #[test]
    fn three_ranks_exchange_segments_and_notice_departure() {
        let job = format!("unit{}", std::process::id());
        let world = 3;
        let barrier = Barrier::new(world);
        let downs = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|rank| {
                    let (job, barrier, downs) = (&job, &barrier, &downs);
                    s.spawn(move || {
                        let deadline = Instant::now() + Duration::from_secs(20);
                        let mut mesh = Mesh::establish(job, rank, world, deadline, &mut || {
                            barrier.wait();
                            Ok(())
                        })
                        .unwrap();
                        let seg = Segment::create("mesh-test", 64 + rank).unwrap();
                        let got = mesh
                            .exchange(7, seg.fd().unwrap(), 64 + rank as u64, deadline)
                            .unwrap();
                        for (r, e) in got.iter().enumerate() {
                            match e {
                                None => assert_eq!(r, rank),
                                Some((fd, len)) => {
                                    assert_eq!(*len, 64 + r as u64);
                                    use std::os::fd::AsFd;
                                    Segment::open(fd.as_fd(), 64 + r).unwrap();
                                }
                            }
                        }
                        if rank == 0 {
                            let (tx, rx) = std::sync::mpsc::channel();
                            let tx = Mutex::new(tx);
                            mesh.watch(Arc::new(move |p| tx.lock().unwrap().send(p).unwrap()))
                                .unwrap();
                            barrier.wait(); // others drop their meshes after this
                            for _ in 1..world {
                                downs
                                    .lock()
                                    .unwrap()
                                    .push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
                            }
                        } else {
                            barrier.wait();
                            drop(mesh);
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        });
        let mut d = downs.into_inner().unwrap();
        d.sort();
        assert_eq!(d, vec![1, 2]);
    }
}
