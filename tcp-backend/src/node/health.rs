//! Health: the heartbeat thread, and deciding a silent link is a failed peer (only while
//! nothing from it waits unread, and only for time this rank was running).

use super::*;

/// Sends heartbeats on links idle for `heartbeat` and declares silent peers failed. Silence is
/// counted only while this rank itself runs and only when nothing from the peer waits unread:
/// a live peer is never declared dead because this rank was starved of the CPU.
pub(super) fn heartbeat(sh: Arc<Shared>) {
    let every = sh.cfg.heartbeat;
    let tick = every / 2;
    let mut last_tick = sh.now_us();
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick); // the heartbeat's own pace
        let now = sh.now_us();
        if Duration::from_micros(now.saturating_sub(last_tick)) > sh.cfg.peer_timeout / 2 {
            // This thread did not run for a long while: the machine is overloaded, and what
            // the peers sent meanwhile may not have been read yet. Start counting again.
            for t in &sh.last_recv {
                t.fetch_max(now, Ordering::Relaxed);
            }
        }
        for peer in (0..sh.cfg.world).filter(|&p| p != sh.cfg.rank) {
            sh.check_silence(peer, now);
            let idle = now.saturating_sub(sh.last_sent[peer].load(Ordering::Relaxed));
            if Duration::from_micros(idle) >= every {
                sh.beat(peer);
            }
        }
        last_tick = sh.now_us();
    }
}

impl Shared {
    /// Declares `peer` failed if it has been silent past the peer timeout (a peer that said
    /// goodbye sends nothing more and is not watched).
    pub(super) fn check_silence(&self, peer: usize, now: u64) {
        if self.departed[peer].load(Ordering::SeqCst) || self.closed[peer].load(Ordering::SeqCst) {
            return;
        }
        let silent = now.saturating_sub(self.last_recv[peer].load(Ordering::Relaxed));
        if Duration::from_micros(silent) <= self.cfg.peer_timeout {
            return;
        }
        if self.unread_bytes(peer) > 0 {
            // The peer did send; this rank has not read it yet.
            self.last_recv[peer].fetch_max(now, Ordering::Relaxed);
            return;
        }
        self.fail(peer, &format!("silent for {} ms", silent / 1000));
    }

    /// Bytes from `peer` waiting in the socket, unread.
    pub(super) fn unread_bytes(&self, peer: usize) -> usize {
        let fd = self.rx_fd[peer].load(Ordering::Relaxed);
        if fd < 0 {
            return 0;
        }
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; `fd` is the link's socket, open for the node's life.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        if rc == 0 {
            n.max(0) as usize
        } else {
            0
        }
    }
}
