//! Progress: the per-peer threads that read the links, handing the polling role to a
//! waiter that spins, and the eventfds that wake them.

use super::*;
use rustix::event::EventfdFlags;

/// Marks a caller as polling the links for as long as it lives.
pub(super) struct Polling<'a>(pub(super) &'a Shared);

impl<'a> Polling<'a> {
    pub(super) fn new(sh: &'a Shared) -> Self {
        // SeqCst with its partner in `progress` (`in_poll` raised, then `pollers` read): either
        // the progress thread sees this caller and keeps out of `poll`, or this caller sees
        // the thread about to poll and kicks it out.
        if sh.pollers.fetch_add(1, Ordering::SeqCst) == 0 && sh.in_poll.load(Ordering::SeqCst) > 0 {
            sh.kicked.store(true, Ordering::SeqCst);
            eventfd_add(&sh.kick);
        }
        Polling(sh)
    }
}

impl Polling<'_> {
    /// Stops polling and hands the links back to the progress threads at once (before the
    /// caller goes to sleep and relies on them).
    pub(super) fn hand_back(self) {
        let sh = self.0;
        drop(self);
        if sh.pollers.load(Ordering::SeqCst) == 0 {
            let _g = sh.poll_gate.lock().unwrap_or_else(|p| p.into_inner());
            sh.poll_cv.notify_all();
        }
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        // No wake-up here: a caller that got what it waited for will likely poll again soon;
        // the progress threads look again within a millisecond anyway. The last poller out
        // rearms the kick.
        if self.0.pollers.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.kicked.swap(false, Ordering::SeqCst)
        {
            eventfd_clear(&self.0.kick);
        }
    }
}

pub(super) fn new_eventfd() -> Result<OwnedFd> {
    rustix::event::eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
        .map_err(|e| Error::io("eventfd", e.into()))
}

pub(super) fn eventfd_add(fd: &OwnedFd) {
    // Non-blocking; a full counter only means it is readable already.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

pub(super) fn eventfd_clear(fd: &OwnedFd) {
    // Non-blocking; nothing to read means it is clear already.
    let _ = rustix::io::read(fd, &mut [0u8; 8]);
}

/// Drains every link nobody else is reading right now (for callers that wait anyway).
pub(super) fn try_progress_all(sh: &Shared) {
    for peer in 0..sh.cfg.world {
        if peer == sh.cfg.rank || sh.closed[peer].load(Ordering::Relaxed) {
            continue;
        }
        if let Ok(mut g) = sh.rx[peer].try_lock() {
            if let Some(link) = g.as_mut() {
                // A finished link stays in place (marked closed) so that its descriptor
                // lives as long as the node: the liveness check may still look at it.
                drain(sh, peer, link, false);
            }
        }
    }
}

/// The progress thread of one link: sleeps in `poll` until frames arrive and applies them
/// (unless a waiting caller already did), until the link ends.
pub(super) fn progress(sh: Arc<Shared>, peer: usize) {
    let fd = match sh.rx[peer]
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        Some(l) => l.s.as_raw_fd(),
        None => return,
    };
    let slice = sh
        .cfg
        .heartbeat
        .min(Duration::from_millis(50))
        .as_millis()
        .max(1) as i32;
    loop {
        if sh.stop.load(Ordering::SeqCst) || sh.closed[peer].load(Ordering::SeqCst) {
            return;
        }
        // Partner of `Polling::new`: raised before `pollers` is read.
        sh.in_poll.fetch_add(1, Ordering::SeqCst);
        if sh.pollers.load(Ordering::SeqCst) > 0 {
            sh.in_poll.fetch_sub(1, Ordering::SeqCst);
            let mut g = sh.poll_gate.lock().unwrap_or_else(|p| p.into_inner());
            while sh.pollers.load(Ordering::SeqCst) > 0 && !sh.stop.load(Ordering::SeqCst) {
                g = sh
                    .poll_cv
                    .wait_timeout(g, Duration::from_millis(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            continue;
        }
        let mut p = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sh.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; the link's descriptor and the eventfd stay open for the
        // node's life (links are never dropped before the node).
        let rc = unsafe { libc::poll(p.as_mut_ptr(), 2, slice) };
        sh.in_poll.fetch_sub(1, Ordering::SeqCst);
        // When kicked (a caller polls now), the link is left to the caller.
        if rc > 0 && p[0].revents != 0 && sh.pollers.load(Ordering::SeqCst) == 0 {
            let mut g = sh.rx[peer].lock().unwrap_or_else(|p| p.into_inner());
            if let Some(link) = g.as_mut() {
                if !drain(&sh, peer, link, true) {
                    return;
                }
            }
        }
    }
}
