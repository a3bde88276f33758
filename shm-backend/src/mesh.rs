//! A full mesh of Unix-domain links between the local ranks of one job: passes segment
//! descriptors and reports a peer whose end closes (death or exit) to a hook.

use crate::error::{Error, Result};
use crate::fdpass::{self, Msg};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

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
    job.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn socket_name(job: &str, rank: usize) -> Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("xccl.{job}.{rank}"))
        .map_err(|e| Error::io("building an abstract socket name", e))
}

fn peer_uid(sock: &UnixStream) -> Result<u32> {
    // SAFETY: a zeroed ucred is valid; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket, output buffer and length pointers for the call's duration.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::last_os("SO_PEERCRED on a mesh link"));
    }
    Ok(cred.uid)
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
        // SAFETY: plain syscall; the result is checked and then owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::last_os("eventfd for the mesh watcher"));
        }
        // SAFETY: `efd` is a fresh descriptor owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop = efd.as_raw_fd();
        let mut watched: Vec<(usize, i32)> = self
            .links
            .iter()
            .enumerate()
            .filter_map(|(r, l)| l.as_ref().map(|s| (r, s.as_raw_fd())))
            .collect();
        // The raw descriptors stay valid: `Drop` stops and joins this thread before the links
        // and the eventfd are closed.
        let handle = std::thread::Builder::new()
            .name(format!("xccl-shm-watch-{}", self.rank))
            .spawn(move || loop {
                let mut fds: Vec<libc::pollfd> = std::iter::once(libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .chain(watched.iter().map(|&(_, fd)| libc::pollfd {
                    fd,
                    events: libc::POLLRDHUP,
                    revents: 0,
                }))
                .collect();
                // SAFETY: `fds` is a valid array of pollfd of the given length.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if rc < 0 {
                    continue; // EINTR
                }
                if fds[0].revents != 0 {
                    return;
                }
                let down = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
                let mut gone = Vec::new();
                for (k, p) in fds[1..].iter().enumerate() {
                    if p.revents & down != 0 {
                        gone.push(k);
                    }
                }
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

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
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
                let ms = (deadline - now).as_millis().clamp(1, 100) as i32;
                let mut p = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, ms) };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("accepting a mesh link", e)),
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((handle, efd)) = self.watcher.take() {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            unsafe {
                libc::write(
                    efd.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                )
            };
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
    let my_uid = unsafe_geteuid();
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
