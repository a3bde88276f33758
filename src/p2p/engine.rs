//! The channel engine behind send/recv: one ring of chunk slots per ordered pair of ranks in
//! the receiver's window, a head counter (chunks sent) and a credit counter (chunks consumed)
//! per pair, and a doorbell counter per rank that every arrival and every credit bumps, so a
//! rank with many requests in flight waits on a single word.
//!
//! Messages from one source are delivered in order; a message whose receive is not posted yet
//! is drained into an unexpected-message buffer, so the sender never stalls on a receiver that
//! is busy sending (no deadlock when both directions run at once).

use super::matching::{gather, Channel, Kind, OpState, RecvSegs, State, Taken};
pub(crate) use super::matching::{OpId, SendSegs};
use super::wait::quick_wait;
use super::wire::{ChunkHeader, HEADER_LEN, INLINE_MAX, MARKER_LEN};
use crate::error::{Error, Result};
use crate::size::Sizer;
use crate::transport::{Doorbell, MappedMem, PeerPath, SignalOp, Stores, Transport};
use crate::{Communicator, Lease};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
/// How long no chunk may move before messages without a posted receive are drained into
/// the unexpected buffer. Until then they wait in the ring, so a receive posted a little
/// late still gets its data with one copy; after it, a rank blocked in a send keeps taking
/// what its peers send, so blocking sends in a cycle cannot deadlock.
pub(super) const DRAIN_AFTER: Duration = Duration::from_micros(50);

/// Messages of at least this many bytes are written into mapped rings with non-temporal
/// stores.
const STREAM_MESSAGE: u64 = 8 << 20;
const PAGE: usize = 4096;

/// Sizing of an engine's rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pConfig {
    /// Slots per ordered pair (chunks in flight per pair).
    pub slots: usize,
    /// Bytes per slot (rounded up to a page); larger messages are pipelined in chunks.
    pub slot_bytes: usize,
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig {
            slots: 4,
            slot_bytes: 1 << 20,
        }
    }
}

/// The engine: rings in one registered window, counters in the communicator's signals.
pub(crate) struct Engine<'c> {
    pub(crate) comm: &'c Communicator,
    /// The rings' window and the counters' signal words.
    pub(super) lease: Lease<'c>,
    pub(super) slots: usize,
    pub(super) slot_bytes: usize,
    pub(super) head_base: usize,
    pub(super) credit_base: usize,
    pub(super) hdr_base: usize,
    /// This rank's path to each rank's rings, by rank: mapped (chunks announced by a marker
    /// in the header) or network (by the head counter).
    pub(super) paths: Vec<PeerPath<'c>>,
    /// This rank's own rings, where senders' headers land.
    pub(super) own: MappedMem,
    /// What a receiver waiting for anything sleeps on.
    pub(super) doorbell: Doorbell<'c>,
    /// How long a blocking receive first watches its source's next chunk (see
    /// `arrives_soon`).
    pub(super) quick_wait: Duration,
    pub(super) state: Mutex<State>,
}

impl<'c> Engine<'c> {
    /// Collective: registers the rings and reserves the counters.
    pub fn new(comm: &'c Communicator, cfg: P2pConfig) -> Result<Self> {
        if cfg.slots == 0 || cfg.slot_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "p2p config {cfg:?}: slots and slot_bytes must be positive"
            )));
        }
        let n = comm.world_size();
        let what = format!("p2p rings of {cfg:?} for {n} ranks");
        let size = Sizer::new(&what);
        let slot_bytes = size.round_up(cfg.slot_bytes, PAGE)?;
        let ring_bytes = size.mul(&[n, cfg.slots, slot_bytes])?;
        let hdr_bytes = size.round_up(size.mul(&[n, cfg.slots, HEADER_LEN])?, PAGE)?;
        // One page more for this rank's count of armed waiters (see `ring_doorbell`).
        let lease = comm.lease(
            &what,
            size.add(&[ring_bytes, hdr_bytes, PAGE])?,
            2 * n + 1,
            &format!("p2p {cfg:?}"),
        )?;
        let head_base = lease.signals().start;
        let t = comm.transport();
        let (paths, own) = lease.views()?;
        let doorbell = Doorbell::new(t, lease.window(), ring_bytes + hdr_bytes, head_base + 2 * n)?;
        Ok(Engine {
            comm,
            lease,
            slots: cfg.slots,
            slot_bytes,
            head_base,
            credit_base: head_base + n,
            hdr_base: ring_bytes,
            paths,
            own,
            doorbell,
            quick_wait: quick_wait(comm),
            state: Mutex::new(State::new(n)),
        })
    }

    /// Collective: drains and gives the rings' window and words back (see [`Lease`]); an
    /// engine with messages under way or poisoned retires its words instead.
    pub(crate) fn close(mut self) -> Result<()> {
        self.mark_if_busy();
        self.lease.release()
    }

    /// Marks the lease busy when a message is under way or the engine is poisoned: its
    /// words must not be reused.
    pub(super) fn mark_if_busy(&self) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.busy() {
            self.lease.enter();
        }
    }

    pub(super) fn t(&self) -> &dyn Transport {
        self.comm.transport()
    }

    /// Chunk size for a message of `total` bytes: large enough to amortize a signal, small
    /// enough that a message spreads over the ring, so the receiver copies chunk k out while
    /// the sender writes chunk k+1 (both cores busy instead of one after the other).
    ///
    /// Where `peer`'s window is not mapped (tcp), the network pipelines already and every
    /// chunk costs frames and a credit round trip: chunks are as large as a slot.
    pub(super) fn chunk_len(&self, peer: usize, total: u64) -> usize {
        if !self.paths[peer].is_mapped() {
            return self.slot_bytes;
        }
        const PIPE_MIN: usize = 16 << 10;
        let spread = (total as usize).div_ceil(self.slots).div_ceil(PAGE) * PAGE;
        spread.clamp(PIPE_MIN.min(self.slot_bytes), self.slot_bytes)
    }

    /// A put into `peer`'s rings.
    pub(super) fn put(&self, peer: usize, off: usize, data: &[u8]) -> Result<()> {
        self.paths[peer].put(off, data, Stores::Cached)
    }

    /// Whether `peer`'s ring has a free slot for chunk `n` (its credits say it consumed
    /// chunk `n - slots`).
    pub(super) fn has_room(&self, peer: usize, n: u64) -> Result<bool> {
        let slots = self.slots as u64;
        Ok(n < slots || self.t().signal_value(self.credit_base + peer)? >= n + 1 - slots)
    }

    /// Returns `src` the credits of the chunks consumed from it, once half the ring is
    /// consumed: the sender is never blocked by withheld credits (at most `slots - 1` chunks
    /// are ever withheld), and a short exchange costs one signal fewer on its critical path.
    pub(super) fn return_credits(&self, ch: &mut Channel, src: usize) -> Result<()> {
        let back = ch.consumed - ch.credited;
        if back >= (self.slots as u64).div_ceil(2) {
            self.t().signal(
                src,
                self.credit_base + self.comm.rank(),
                SignalOp::Add,
                back,
            )?;
            self.doorbell.ring(&self.paths[src])?;
            ch.credited = ch.consumed;
        }
        Ok(())
    }

    /// Publishes a chunk (its payload already written): the header, then whatever tells the
    /// receiver. Where the window is mapped here, the header body goes first and the arrival
    /// marker last with Release, so a receiver polling the marker (Acquire, in `arrived`) sees
    /// a complete header without any head signal. Elsewhere the header and the head signal
    /// travel together (one frame over tcp). Then the doorbell, for a parked receiver.
    pub(super) fn publish_chunk(
        &self,
        peer: usize,
        slot: usize,
        bytes: &[u8; HEADER_LEN],
    ) -> Result<()> {
        let me = self.comm.rank();
        let off = self.header_off(me, slot);
        let path = &self.paths[peer];
        if path.is_mapped() {
            path.put(off + MARKER_LEN, &bytes[MARKER_LEN..], Stores::Cached)?;
            let marker = u64::from_le_bytes(bytes[..MARKER_LEN].try_into().expect("8 bytes"));
            // SYNC POINT: Release store; partner of the Acquire load in `arrived`.
            path.publish(off, marker)?;
        } else {
            path.put_signal(off, bytes, self.head_base + me, SignalOp::Add, 1)?;
        }
        self.doorbell.ring(path)
    }

    /// Whether chunk `n` from `src` has arrived in this rank's ring: its header's marker where
    /// the window is mapped here (one cache line to watch), else the head counter.
    pub(super) fn arrived(&self, src: usize, n: u64) -> Result<bool> {
        if self.paths[src].is_mapped() {
            let off = self.header_off(src, (n % self.slots as u64) as usize);
            // SYNC POINT: Acquire load; partner of the Release store in `publish_chunk`.
            Ok(self.own.observe(off)? == n + 1)
        } else {
            Ok(self.t().signal_value(self.head_base + src)? > n)
        }
    }

    /// Reads from this rank's own rings.
    pub(super) fn read_own(&self, off: usize, out: &mut [u8]) -> Result<()> {
        self.own.read(off, out)
    }

    pub(super) fn payload_off(&self, src: usize, slot: usize) -> usize {
        (src * self.slots + slot) * self.slot_bytes
    }

    pub(super) fn header_off(&self, src: usize, slot: usize) -> usize {
        self.hdr_base + (src * self.slots + slot) * HEADER_LEN
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &st.poisoned {
            Some(why) => Err(Error::InvalidUsage(format!(
                "point-to-point engine unusable: {why}"
            ))),
            None => Ok(st),
        }
    }

    /// A blocking send's fast path for a message that is one chunk, when nothing else is
    /// queued to `peer` and the ring has room: writes it at once, without an op. `Ok(false)`
    /// when it does not apply (the caller takes the general path).
    pub(crate) fn send_now(&self, peer: usize, tag: u64, data: &[u8]) -> Result<bool> {
        crate::transport::check_peer(peer, self.comm.world_size())?;
        if data.len() > self.chunk_len(peer, data.len() as u64) {
            return Ok(false);
        }
        let mut st = self.lock()?;
        let ch = &mut st.ch[peer];
        let n = ch.sent_chunks;
        if !ch.send_q.is_empty() || !self.has_room(peer, n)? {
            return Ok(false);
        }
        let len = data.len() as u64;
        let h = ChunkHeader {
            seq: n,
            tag,
            total: len,
            offset: 0,
            len,
        };
        let slot = (n % self.slots as u64) as usize;
        // As `progress_send` does for a one-chunk message.
        let inline = if h.is_inline() {
            data
        } else {
            self.put(peer, self.payload_off(self.comm.rank(), slot), data)?;
            &[][..]
        };
        self.publish_chunk(peer, slot, &h.encode(inline))?;
        st.ch[peer].sent_chunks += 1;
        Ok(true)
    }

    /// A blocking receive's fast path: when nothing from `src` is pending (no posted receive,
    /// no message half in, none set aside), watches `src`'s next chunk for a short while and,
    /// if it is a whole message (one chunk) with `tag` that fits `buf`, takes it at once,
    /// without an op. `Ok(None)` when it does not apply or nothing came: the caller takes the
    /// general path, which finds the chunk where it was left.
    pub(crate) fn recv_now(&self, src: usize, tag: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        crate::transport::check_peer(src, self.comm.world_size())?;
        let idle = |st: &State| st.idle_from(src);
        let n = {
            let st = self.lock()?;
            if !idle(&st) {
                return Ok(None);
            }
            st.ch[src].consumed
        };
        if !self.arrives_soon(src, n) {
            return Ok(None);
        }
        let mut st = self.lock()?;
        if !idle(&st) || st.ch[src].consumed != n || !self.arrived(src, n)? {
            return Ok(None);
        }
        let slot = (n % self.slots as u64) as usize;
        let mut hb = [0u8; HEADER_LEN];
        self.read_own(self.header_off(src, slot), &mut hb)?;
        let h = match ChunkHeader::decode(&hb, src, n, self.slot_bytes) {
            Ok(h) => h,
            Err(e) => {
                if let Error::ProtocolViolation(m) = &e {
                    st.poisoned = Some(m.clone());
                }
                return Err(e);
            }
        };
        if h.tag != tag || h.offset != 0 || h.len != h.total {
            return Ok(None);
        }
        let Some(dst) = buf.get_mut(..h.len as usize) else {
            return Ok(None); // too long for `buf`: the general path reports it
        };
        if h.is_inline() {
            dst.copy_from_slice(h.inline_bytes(&hb));
        } else {
            // SAFETY: the sender wrote this slot before publishing the header seen above and
            // writes it again only after the credit below; the length was checked against the
            // slot by `decode`.
            let payload = unsafe { self.own.slice(self.payload_off(src, slot), dst.len())? };
            crate::copy::copy_slice(dst, payload);
        }
        let got = dst.len();
        let ch = &mut st.ch[src];
        ch.consumed += 1;
        self.return_credits(ch, src)?;
        Ok(Some(got))
    }

    /// Queues a send of the segments (all bytes, in order) to `peer`.
    pub(crate) fn post_send(&self, peer: usize, tag: u64, segs: SendSegs) -> Result<OpId> {
        crate::transport::check_peer(peer, self.comm.world_size())?;
        Ok(self.lock()?.add_send(peer, tag, segs))
    }

    /// Posts a receive from `src` into the segments; `exact` demands the message fill them.
    pub(crate) fn post_recv(
        &self,
        src: usize,
        tag: u64,
        segs: RecvSegs,
        exact: bool,
    ) -> Result<OpId> {
        crate::transport::check_peer(src, self.comm.world_size())?;
        Ok(self.lock()?.add_recv(src, tag, segs, exact))
    }

    /// Moves every channel forward as far as possible without waiting. Messages nobody has
    /// posted a receive for are left in the ring until nothing has moved for `DRAIN_AFTER`.
    pub(crate) fn progress(&self, st: &mut State) -> Result<()> {
        let r = self.pass(st, false).and_then(|moved| {
            if moved || !st.undrained {
                st.stalled_since = None;
            } else {
                // Only a message parked for want of a receive needs the clock.
                let since = *st.stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DRAIN_AFTER && self.pass(st, true)? {
                    st.stalled_since = None;
                }
            }
            Ok(())
        });
        if let Err(Error::ProtocolViolation(m)) = &r {
            st.poisoned = Some(m.clone());
        }
        r
    }

    /// One pass over every channel; true if any chunk moved.
    pub(super) fn pass(&self, st: &mut State, drain: bool) -> Result<bool> {
        st.undrained = false;
        let mut moved = false;
        for p in 0..self.comm.world_size() {
            moved |= self.progress_send(st, p)?;
            moved |= self.progress_recv(st, p, drain)?;
        }
        Ok(moved)
    }

    pub(super) fn progress_send(&self, st: &mut State, peer: usize) -> Result<bool> {
        let me = self.comm.rank();
        let mut moved = false;
        loop {
            let Some(&id) = st.ch[peer].send_q.front() else {
                return Ok(moved);
            };
            let n = st.ch[peer].sent_chunks;
            if !self.has_room(peer, n)? {
                return Ok(moved);
            }
            moved = true;
            let op = st.ops.get_mut(&id).expect("queued op exists");
            let Kind::Send(s) = &mut op.kind else {
                unreachable!("send queue holds sends")
            };
            let len = (s.total - s.sent).min(self.chunk_len(peer, s.total) as u64) as usize;
            let slot = (n % self.slots as u64) as usize;
            let h = ChunkHeader {
                seq: n,
                tag: s.tag,
                total: s.total,
                offset: s.sent,
                len: len as u64,
            };
            let mut inline = [0u8; INLINE_MAX];
            let mut at = 0;
            // Messages far larger than the caches stream past this core's caches: the
            // receiver reads the chunk next, from another core.
            let stream = s.total >= STREAM_MESSAGE;
            // SAFETY: the segments are borrowed by a live scope for as long as the op exists.
            for piece in unsafe { gather(&s.segs, s.sent, len) } {
                if h.is_inline() {
                    inline[at..at + piece.len()].copy_from_slice(piece);
                } else {
                    let stores = if stream {
                        Stores::Streaming
                    } else {
                        Stores::Cached
                    };
                    self.paths[peer].put(self.payload_off(me, slot) + at, piece, stores)?;
                }
                at += piece.len();
            }
            let inline = if h.is_inline() {
                &inline[..len]
            } else {
                &[][..]
            };
            self.publish_chunk(peer, slot, &h.encode(inline))?;
            s.sent += len as u64;
            s.started = true;
            st.ch[peer].sent_chunks += 1;
            if s.sent == s.total {
                op.state = OpState::Done(s.total);
                st.ch[peer].send_q.pop_front();
            }
        }
    }

    /// Takes every chunk that has arrived from `src` (see [`State::take_chunk`]); true if
    /// any moved.
    pub(super) fn progress_recv(&self, st: &mut State, src: usize, drain: bool) -> Result<bool> {
        let mut moved = false;
        loop {
            self.return_credits(&mut st.ch[src], src)?;
            let n = st.ch[src].consumed;
            if !self.arrived(src, n)? {
                return Ok(moved);
            }
            let slot = (n % self.slots as u64) as usize;
            let mut hb = [0u8; HEADER_LEN];
            self.read_own(self.header_off(src, slot), &mut hb)?;
            let h = ChunkHeader::decode(&hb, src, n, self.slot_bytes)?;
            let payload = if h.is_inline() {
                h.inline_bytes(&hb)
            } else {
                // SAFETY: the sender wrote this slot before the header or head signal observed
                // above and will not write it again before this rank's credit for it; `slice`
                // checks the range.
                unsafe {
                    self.own
                        .slice(self.payload_off(src, slot), h.len as usize)?
                }
            };
            if st.take_chunk(src, &h, payload, drain)? == Taken::Parked {
                return Ok(moved);
            }
            moved = true;
        }
    }

    /// Removes ops that a scope leaves unfinished after an error, keeping the channels
    /// consistent: an unstarted send or unmatched receive is simply dropped, a half-received
    /// message is discarded as it arrives; a half-sent message cannot be completed, so the
    /// communicator is aborted (peers then fail instead of waiting for the rest).
    pub(crate) fn cancel(&self, ids: &[OpId]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let must_abort = st.cancel(ids);
        if must_abort {
            st.poisoned = Some("a message was abandoned half sent".into());
            drop(st);
            tracing::error!("abandoning a half-sent message: aborting the communicator");
            self.comm.abort();
        }
    }
}

impl Drop for Engine<'_> {
    fn drop(&mut self) {
        self.mark_if_busy();
    }
}
