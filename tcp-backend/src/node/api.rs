//! The node's one-sided operations: regions, writes, reads, signals and flushes.

use super::*;

impl Node {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.shared.cfg.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.shared.cfg.world
    }

    /// Signal words of this rank.
    pub fn num_signals(&self) -> usize {
        self.shared.signals.len()
    }

    pub(super) fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.num_signals() {
            return Err(Error::Invalid(format!(
                "signal index {index} >= {}",
                self.num_signals()
            )));
        }
        Ok(())
    }

    /// Fails once the node is interrupted (abort, failed peer) or closed: what every operation
    /// checks first, also those that stay inside this rank.
    pub fn check_open(&self) -> Result<()> {
        if let Some(e) = self.shared.interrupted() {
            return Err(e);
        }
        if self.shared.closing.load(Ordering::SeqCst) {
            return Err(Error::Closed(format!(
                "rank {} has closed its node",
                self.rank()
            )));
        }
        Ok(())
    }

    pub(super) fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.world() {
            return Err(Error::Invalid(format!(
                "peer rank {peer} >= world size {}",
                self.world()
            )));
        }
        self.check_open()?;
        // A peer that said goodbye still applies what this rank sends until this rank says
        // goodbye too; one whose stream has ended is gone.
        if peer != self.rank() && self.shared.finished[peer].load(Ordering::SeqCst) {
            return Err(Error::PeerFailed {
                rank: peer,
                detail: "it left the job".into(),
            });
        }
        Ok(())
    }

    pub(super) fn region(&self, id: u64) -> Result<Arc<Region>> {
        self.shared
            .region(id)
            .ok_or_else(|| Error::Invalid(format!("region {id} is not registered")))
    }

    /// Registers region `id` of `len` bytes here and announces it to every peer. When the
    /// memory cannot be had, the peers are told so ([`REG_FAILED`] as the length) before the
    /// error returns, so that they fail too instead of waiting.
    pub fn register(&self, id: u64, len: usize) -> Result<Arc<Region>> {
        self.register_with(id, len, Region::new)
    }

    /// [`Node::register`] of a region `make(len)` provides (one [`Region::borrowed`] from
    /// memory local peers share, say). When `make` fails, the peers are told so as when an
    /// allocation fails; except that a [`Error::Mismatch`] (ranks that share the memory asked
    /// for different sizes) announces the length asked, so that every peer sees the
    /// disagreement in the lengths rather than a failure.
    pub fn register_with(
        &self,
        id: u64,
        len: usize,
        make: impl FnOnce(usize) -> Result<Region>,
    ) -> Result<Arc<Region>> {
        let region = make(len).and_then(|r| match r.len() == len {
            true => Ok(Arc::new(r)),
            false => Err(Error::Invalid(format!(
                "region {id}: {} bytes given for {len}",
                r.len()
            ))),
        });
        let mut f = Frame::new(Kind::Reg);
        f.region = id;
        f.len = match &region {
            Ok(_) | Err(Error::Mismatch(_)) => len as u64,
            Err(_) => REG_FAILED,
        };
        if let Ok(r) = &region {
            self.shared
                .regions
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, r.clone());
        }
        for peer in (0..self.world()).filter(|&p| p != self.rank()) {
            self.shared.send(peer, &f, &[])?;
        }
        region
    }

    /// Waits until every peer has announced region `id`; returns each rank's length.
    pub fn peers_registered(&self, id: u64, len: usize, deadline: Instant) -> Result<Vec<u64>> {
        let me = self.rank();
        let mut regs = self.shared.regs.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let all = (0..self.world()).all(|p| p == me || regs.contains_key(&(p, id)));
            if all {
                return Ok((0..self.world())
                    .map(|p| {
                        if p == me {
                            len as u64
                        } else {
                            regs.remove(&(p, id)).expect("present")
                        }
                    })
                    .collect());
            }
            if let Some(e) = self.shared.interrupted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!(
                    "waiting for every rank to register region {id}"
                )));
            }
            let g = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            drop(regs);
            let _ = self
                .shared
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(20)));
            regs = self.shared.regs.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Drops this rank's region `id` (later writes to it are drained and ignored).
    pub fn deregister(&self, id: u64) -> bool {
        self.shared
            .regions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .is_some()
    }

    /// One-sided write of `data` into `peer`'s region `id` at `offset`, then, if given, a
    /// signal `(index, set, value)` that the peer observes after the data (see
    /// [`Node::signal`]).
    pub fn write(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        data: &[u8],
        signal: Option<(usize, bool, u64)>,
    ) -> Result<()> {
        self.write_parts(peer, id, offset, &[data], signal)
    }

    /// [`Node::write`] of `parts` laid end to end from `offset`: the pieces go out together,
    /// in frames of at most `max_frame` bytes, without being copied into one buffer first.
    pub fn write_parts(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        parts: &[&[u8]],
        signal: Option<(usize, bool, u64)>,
    ) -> Result<()> {
        self.write_held(peer, id, offset, parts, signal, false)
    }

    /// [`Node::write_parts`]; with `hold`, the caller follows it at once with another frame
    /// to `peer` (and does follow, without waiting in between), so its last segment may wait
    /// in the socket to leave with that frame, though it carries a signal.
    pub fn write_held(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        parts: &[&[u8]],
        signal: Option<(usize, bool, u64)>,
        hold: bool,
    ) -> Result<()> {
        self.check_peer(peer)?;
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if peer == self.rank() {
            let r = self.region(id)?;
            r.check(offset, total)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let mut at = offset as usize;
            for part in parts {
                // SAFETY: the whole range was checked; `part` may alias the region, so an
                // overlap-safe copy.
                unsafe { std::ptr::copy(part.as_ptr(), r.as_ptr().add(at), part.len()) };
                at += part.len();
            }
            if let Some((i, set, v)) = signal {
                self.signal(peer, i, set, v)?;
            }
            return Ok(());
        }
        let cap = self.shared.cfg.max_frame.max(1);
        let mut pieces = Pieces::new(parts);
        let mut sent = 0u64;
        loop {
            let len = (total - sent).min(cap);
            let mut f = Frame::new(Kind::Write);
            f.region = id;
            f.offset = offset + sent;
            f.len = len;
            sent += len;
            if sent == total {
                if let Some((i, set, v)) = signal {
                    f.flags = FLAG_SIGNAL | if set { FLAG_SET } else { 0 };
                    f.a = i as u64;
                    f.b = v;
                }
            }
            self.shared
                .send_held(peer, &f, &pieces.take(len as usize), hold)?;
            if sent == total {
                return Ok(());
            }
        }
    }

    /// Updates signal word `index` of `peer`: stores `value` when `set` (the frame's SET
    /// flag), else adds it, wrapping.
    pub fn signal(&self, peer: usize, index: usize, set: bool, value: u64) -> Result<()> {
        self.check_peer(peer)?;
        self.check_index(index)?;
        if peer == self.rank() {
            self.shared.signals.apply(index, set, value);
            return Ok(());
        }
        let mut f = Frame::new(Kind::Signal);
        f.flags = if set { FLAG_SET } else { 0 };
        f.a = index as u64;
        f.b = value;
        self.shared.send(peer, &f, &[])
    }

    /// One-sided read of `out.len()` bytes of `peer`'s region `id` at `offset`.
    pub fn read(
        &self,
        peer: usize,
        id: u64,
        offset: u64,
        out: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        self.check_peer(peer)?;
        if peer == self.rank() {
            let r = self.region(id)?;
            r.check(offset, out.len() as u64)
                .map_err(|e| Error::Invalid(e.to_string()))?;
            // SAFETY: range checked; `out` may alias the region, so an overlap-safe copy.
            unsafe { std::ptr::copy(r.as_ptr().add(offset as usize), out.as_mut_ptr(), out.len()) };
            return Ok(());
        }
        let cap = self.shared.cfg.max_frame.max(1) as usize;
        for (k, chunk) in out.chunks_mut(cap).enumerate() {
            let req = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
            let mut pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending.insert(
                req,
                Pending {
                    ptr: chunk.as_mut_ptr(),
                    len: chunk.len(),
                    done: false,
                },
            );
            drop(pending);
            let mut f = Frame::new(Kind::ReadReq);
            f.region = id;
            f.offset = offset + (k * cap) as u64;
            f.len = chunk.len() as u64;
            f.a = req;
            // A failed send is already `PeerFailed`: a get from a dead peer says so.
            let sent = self.shared.send(peer, &f, &[]);
            let result = sent.and_then(|()| {
                self.await_done(
                    |p| p.get(&req).is_some_and(|p| p.done),
                    deadline,
                    || format!("reading {} bytes from rank {peer}", chunk.len()),
                )
            });
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req);
            result?;
        }
        Ok(())
    }

    /// Returns once every earlier write to `peer` has been applied there.
    pub fn flush(&self, peer: usize, deadline: Instant) -> Result<()> {
        self.check_peer(peer)?;
        if peer == self.rank() {
            return Ok(());
        }
        let req = self.shared.next_req.fetch_add(1, Ordering::Relaxed);
        let mut f = Frame::new(Kind::Flush);
        f.a = req;
        self.shared.send(peer, &f, &[])?;
        self.await_done(
            |_| self.shared.flushed[peer].load(Ordering::SeqCst) >= req,
            deadline,
            || format!("flushing rank {peer}"),
        )
    }

    /// Polls the links, then sleeps on the progress threads' notifications, until `done`
    /// (checked under the pending-read lock) holds, the node is interrupted, or `deadline`.
    pub(super) fn await_done(
        &self,
        done: impl Fn(&HashMap<u64, Pending>) -> bool,
        deadline: Instant,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let locked = || {
            self.shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        self.poll_until(|| done(&locked()));
        let mut g = locked();
        loop {
            if done(&g) {
                return Ok(());
            }
            if let Some(e) = self.shared.interrupted() {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(what()));
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Polls the links in this thread until `done` holds or the polling budget is spent.
    pub(super) fn poll_until(&self, done: impl Fn() -> bool) {
        let _polling = Polling::new(&self.shared);
        let start = Instant::now();
        while !done()
            && self.shared.interrupted().is_none()
            && start.elapsed() < self.shared.cfg.poll
        {
            try_progress_all(&self.shared);
        }
    }
}
