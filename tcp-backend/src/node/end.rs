//! Ending: abort, the orderly close, and what dropping a node does.

use super::*;

impl Node {
    /// Fails every pending and future operation here and on the peers with `Aborted`.
    pub fn abort(&self) {
        let _ = self.shared.aborted.compare_exchange(
            0,
            self.rank() as u64 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        // Waiters here learn of it at once; then each peer, on links nobody is writing to
        // (a busy writer sends it after its frame, or gives up if its peer does not read).
        self.shared.notify();
        for peer in (0..self.world()).filter(|&p| p != self.rank()) {
            if let Ok(mut g) = self.shared.writers[peer].try_lock() {
                if let Some(s) = g.as_mut() {
                    self.shared.send_abort(peer, s);
                }
            }
        }
        self.shared.notify();
    }

    /// Whether abort was called here or by a peer.
    pub fn is_aborted(&self) -> bool {
        self.shared.aborted.load(Ordering::SeqCst) != 0
    }
}

impl Node {
    /// Collective orderly end: says goodbye to every peer (this rank asks nothing more of
    /// anyone), keeps applying what peers still send, and returns once every peer has said
    /// goodbye and its stream has ended. Fails with `PeerFailed` if a peer died first,
    /// `Aborted` after an abort, `Timeout` at `deadline`. Later operations fail with
    /// [`Error::Closed`]. Idempotent.
    pub fn close(&self, deadline: Instant) -> Result<()> {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        let others = || (0..self.world()).filter(|&p| p != self.rank());
        for peer in others() {
            sh.say_bye(peer);
        }
        let mut g = sh.pending.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let waiting: Vec<usize> = others()
                .filter(|&p| !sh.finished[p].load(Ordering::SeqCst))
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if let Some(e) = sh.interrupted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "closing: ranks {waiting:?} have not closed"
                )));
            }
            // `link_finished` and `fail` notify under this lock.
            g = sh
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Node {
    /// Without [`Node::close`], says goodbye and leaves at once: peers still sending to this
    /// rank then see it as gone.
    fn drop(&mut self) {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        for peer in (0..sh.cfg.world).filter(|&p| p != sh.cfg.rank) {
            sh.say_bye(peer);
        }
        sh.stop.store(true, Ordering::SeqCst);
        {
            let _g = sh.poll_gate.lock().unwrap_or_else(|p| p.into_inner());
            sh.poll_cv.notify_all();
        }
        for w in &sh.writers {
            if let Some(s) = w.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
