//! The channel engine behind send/recv: one ring of chunk slots per ordered pair of ranks in
//! the receiver's window, a head counter (chunks sent) and a credit counter (chunks consumed)
//! per pair, and a doorbell counter per rank that every arrival and every credit bumps, so a
//! rank with many requests in flight waits on a single word.
//!
//! Messages from one source are delivered in order; a message whose receive is not posted yet
//! is drained into an unexpected-message buffer, so the sender never stalls on a receiver that
//! is busy sending (no deadlock when both directions run at once).

use super::wire::{ChunkHeader, HEADER_LEN, INLINE_MAX, MARKER_LEN};
use crate::error::{Error, Result};
use crate::size::Sizer;
use crate::transport::{Cmp, Doorbell, MappedMem, PeerPath, SignalOp, Stores, Transport};
use crate::{Communicator, Lease};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(crate) type OpId = u64;
/// Source segments of a send (one for a plain buffer, several for vectored sends).
pub(crate) type SendSegs = SmallVec<[(*const u8, usize); 2]>;
/// Destination segments of a receive.
pub(crate) type RecvSegs = SmallVec<[(*mut u8, usize); 2]>;
/// How long no chunk may move before messages without a posted receive are drained into
/// the unexpected buffer. Until then they wait in the ring, so a receive posted a little
/// late still gets its data with one copy; after it, a rank blocked in a send keeps taking
/// what its peers send, so blocking sends in a cycle cannot deadlock.
const DRAIN_AFTER: Duration = Duration::from_micros(50);

type OpMap = crate::id_map::IdMap<Op>;

/// What a waiting op sleeps on.
enum Wake {
    /// One source's next chunk (source, chunks consumed so far): the engine's only op is a
    /// receive, so one cache line is all there is to watch (the chunk's header marker, or
    /// the source's head counter). The wait comes back after a slice (growing while nothing
    /// happens) to progress every channel, so other ranks' traffic is never left waiting.
    Focused(usize, u64),
    /// The doorbell, briefly: a message is parked in a ring and may need draining.
    Drain,
    /// The doorbell, which every arrival and credit bumps.
    Doorbell,
}

/// Messages of at least this many bytes are written into mapped rings with non-temporal
/// stores.
const STREAM_MESSAGE: u64 = 8 << 20;
/// Polls of the wake word before a wait that reads the clock.
const QUICK_POLLS: usize = 64;
/// How long a receive first watches its source's next chunk (the marker where windows are
/// mapped; elsewhere the head counter, reading the links meanwhile) before the general path,
/// unless this host's ranks outnumber its CPUs: a spinning rank then holds the core the
/// sender needs, so it looks only briefly.
const QUICK_WAIT: Duration = Duration::from_micros(20);

fn quick_wait(comm: &Communicator) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    if comm.info().local_size > cores {
        Duration::ZERO
    } else {
        QUICK_WAIT
    }
}

/// First slice of a focused wait.
const FOCUS_SLICE: Duration = Duration::from_micros(100);
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

enum OpState {
    Pending,
    Done(u64),
    Failed(Error),
}

struct SendOp {
    peer: usize,
    tag: u64,
    segs: SendSegs,
    total: u64,
    sent: u64,
    started: bool,
}

struct RecvOp {
    src: usize,
    tag: u64,
    segs: RecvSegs,
    cap: u64,
    /// Collective mode: takes the next message from `src` whatever its tag, and fails unless
    /// tag and length are exactly as expected (ranks called different collectives, or
    /// disagree on counts).
    exact: bool,
}

enum Kind {
    Send(SendOp),
    Recv(RecvOp),
}

struct Op {
    kind: Kind,
    state: OpState,
}

enum Dest {
    Posted(OpId),
    Unexpected,
    Sink,
}

struct Incoming {
    dest: Dest,
    tag: u64,
    total: u64,
    got: u64,
}

struct Unexpected {
    tag: u64,
    total: u64,
    data: Vec<u8>,
    complete: bool,
}

#[derive(Default)]
struct Channel {
    sent_chunks: u64,
    send_q: VecDeque<OpId>,
    consumed: u64,
    /// Chunks whose credit has been returned to the sender (credits go back in batches).
    credited: u64,
    incoming: Option<Incoming>,
    posted: VecDeque<OpId>,
    unexpected: VecDeque<Unexpected>,
}

pub(crate) struct State {
    ops: OpMap,
    next_id: OpId,
    ch: Vec<Channel>,
    poisoned: Option<String>,
    /// When a chunk last moved in either direction.
    /// When the current run of passes that moved nothing began (`None` while chunks move);
    /// the clock is read only once nothing moves.
    stalled_since: Option<Instant>,
    /// The last pass left a message in a ring because no receive was posted for it.
    undrained: bool,
}

// SAFETY: the raw pointers in pending ops point at buffers borrowed by a live `Scope` (see
// `request.rs`): they are used only under the engine's mutex while the op is in `ops`, and
// every op of a scope is removed before the scope (and so the borrow) ends.
unsafe impl Send for State {}

/// Why a message does not fit the receive posted for it, if it does not.
fn size_problem(src: usize, tag: u64, total: u64, r: &RecvOp) -> Option<Error> {
    let (cap, exact) = (r.cap, r.exact);
    if exact && tag != r.tag {
        Some(Error::ConfigMismatch(format!(
            "rank {src} is in collective {tag:#x} while this rank is in {:#x} (collectives called in different orders)",
            r.tag
        )))
    } else if exact && total != cap {
        Some(Error::InvalidArgument(format!(
            "rank {src} sent {total} bytes where {cap} were expected (counts disagree)"
        )))
    } else if total > cap {
        Some(Error::InvalidArgument(format!(
            "message of {total} bytes from rank {src} does not fit the {cap}-byte receive buffer"
        )))
    } else {
        None
    }
}

/// Copies `data` into the segments starting at message offset `off`.
///
/// # Safety
/// Every segment must be valid for writes of its length and not aliased by `data`.
unsafe fn scatter(segs: &[(*mut u8, usize)], mut off: u64, mut data: &[u8]) {
    for &(p, len) in segs {
        if data.is_empty() {
            break;
        }
        if off >= len as u64 {
            off -= len as u64;
            continue;
        }
        let n = (len - off as usize).min(data.len());
        // SAFETY: `off + n <= len` for this segment, which the caller guarantees writable.
        unsafe { crate::copy::copy_bytes(p.add(off as usize), data.as_ptr(), n) };
        data = &data[n..];
        off = 0;
    }
}

/// The pieces of the segments covering message bytes `off .. off + len`.
///
/// # Safety
/// Every segment must be valid for reads of its length for the returned lifetime.
unsafe fn gather<'a>(
    segs: &[(*const u8, usize)],
    mut off: u64,
    mut len: usize,
) -> SmallVec<[&'a [u8]; 2]> {
    let mut out = SmallVec::new();
    for &(p, l) in segs {
        if len == 0 {
            break;
        }
        if off >= l as u64 {
            off -= l as u64;
            continue;
        }
        let n = (l - off as usize).min(len);
        // SAFETY: `off + n <= l`, readable by the caller's guarantee.
        out.push(unsafe { std::slice::from_raw_parts(p.add(off as usize), n) });
        len -= n;
        off = 0;
    }
    out
}

/// The engine: rings in one registered window, counters in the communicator's signals.
pub(crate) struct Engine<'c> {
    pub(crate) comm: &'c Communicator,
    /// The rings' window and the counters' signal words.
    lease: Lease<'c>,
    slots: usize,
    slot_bytes: usize,
    head_base: usize,
    credit_base: usize,
    hdr_base: usize,
    /// This rank's path to each rank's rings, by rank: mapped (chunks announced by a marker
    /// in the header) or network (by the head counter).
    paths: Vec<PeerPath<'c>>,
    /// This rank's own rings, where senders' headers land.
    own: MappedMem,
    /// What a receiver waiting for anything sleeps on.
    doorbell: Doorbell<'c>,
    /// How long a blocking receive first watches its source's next chunk (see
    /// `arrives_soon`).
    quick_wait: Duration,
    state: Mutex<State>,
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
        let paths = t.paths(lease.window())?;
        let own = t.local_mem(lease.window())?;
        let doorbell = Doorbell::new(t, lease.window(), ring_bytes + hdr_bytes, head_base + 2 * n)?;
        let mut ch = Vec::with_capacity(n);
        ch.resize_with(n, Channel::default);
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
            state: Mutex::new(State {
                ops: OpMap::default(),
                next_id: 1,
                ch,
                poisoned: None,
                stalled_since: None,
                undrained: false,
            }),
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
    fn mark_if_busy(&self) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.poisoned.is_some() || !st.ops.is_empty() || st.ch.iter().any(|c| c.incoming.is_some())
        {
            self.lease.enter();
        }
    }

    fn t(&self) -> &dyn Transport {
        self.comm.transport()
    }

    /// Chunk size for a message of `total` bytes: large enough to amortize a signal, small
    /// enough that a message spreads over the ring, so the receiver copies chunk k out while
    /// the sender writes chunk k+1 (both cores busy instead of one after the other).
    ///
    /// Where `peer`'s window is not mapped (tcp), the network pipelines already and every
    /// chunk costs frames and a credit round trip: chunks are as large as a slot.
    fn chunk_len(&self, peer: usize, total: u64) -> usize {
        if !self.paths[peer].is_mapped() {
            return self.slot_bytes;
        }
        const PIPE_MIN: usize = 16 << 10;
        let spread = (total as usize).div_ceil(self.slots).div_ceil(PAGE) * PAGE;
        spread.clamp(PIPE_MIN.min(self.slot_bytes), self.slot_bytes)
    }

    /// A put into `peer`'s rings.
    fn put(&self, peer: usize, off: usize, data: &[u8]) -> Result<()> {
        self.paths[peer].put(off, data, Stores::Cached)
    }

    /// Whether `peer`'s ring has a free slot for chunk `n` (its credits say it consumed
    /// chunk `n - slots`).
    fn has_room(&self, peer: usize, n: u64) -> Result<bool> {
        let slots = self.slots as u64;
        Ok(n < slots || self.t().signal_value(self.credit_base + peer)? >= n + 1 - slots)
    }

    /// Returns `src` the credits of the chunks consumed from it, once half the ring is
    /// consumed: the sender is never blocked by withheld credits (at most `slots - 1` chunks
    /// are ever withheld), and a short exchange costs one signal fewer on its critical path.
    fn return_credits(&self, ch: &mut Channel, src: usize) -> Result<()> {
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
    fn publish_chunk(&self, peer: usize, slot: usize, bytes: &[u8; HEADER_LEN]) -> Result<()> {
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

    /// Waits briefly for chunk `n` from `src`; true once it is here. Where the window is
    /// mapped, spins on its marker; elsewhere waits on the head counter through the
    /// transport, which meanwhile reads the links itself (a tcp receiver that only looked at
    /// the counter would wait for a progress thread to wake up).
    fn arrives_soon(&self, src: usize, n: u64) -> bool {
        let until = Instant::now() + self.quick_wait;
        if self.paths[src].is_mapped() {
            loop {
                if (0..QUICK_POLLS).any(|_| {
                    std::hint::spin_loop();
                    self.arrived(src, n).unwrap_or(true)
                }) {
                    return true;
                }
                if Instant::now() >= until {
                    return false;
                }
            }
        }
        self.t()
            .wait(self.head_base + src, Cmp::Gt, n, until)
            .is_ok()
    }

    /// Whether chunk `n` from `src` has arrived in this rank's ring: its header's marker where
    /// the window is mapped here (one cache line to watch), else the head counter.
    fn arrived(&self, src: usize, n: u64) -> Result<bool> {
        if self.paths[src].is_mapped() {
            let off = self.header_off(src, (n % self.slots as u64) as usize);
            // SYNC POINT: Acquire load; partner of the Release store in `publish_chunk`.
            Ok(self.own.observe(off)? == n + 1)
        } else {
            Ok(self.t().signal_value(self.head_base + src)? > n)
        }
    }

    /// Reads from this rank's own rings.
    fn read_own(&self, off: usize, out: &mut [u8]) -> Result<()> {
        self.own.read(off, out)
    }

    fn payload_off(&self, src: usize, slot: usize) -> usize {
        (src * self.slots + slot) * self.slot_bytes
    }

    fn header_off(&self, src: usize, slot: usize) -> usize {
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
        let idle = |st: &State| {
            let ch = &st.ch[src];
            ch.posted.is_empty() && ch.incoming.is_none() && ch.unexpected.is_empty()
        };
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
        let total = segs.iter().map(|&(_, l)| l as u64).sum();
        let mut st = self.lock()?;
        let id = st.next_id;
        st.next_id += 1;
        st.ops.insert(
            id,
            Op {
                kind: Kind::Send(SendOp {
                    peer,
                    tag,
                    segs,
                    total,
                    sent: 0,
                    started: false,
                }),
                state: OpState::Pending,
            },
        );
        st.ch[peer].send_q.push_back(id);
        Ok(id)
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
        let cap: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
        let mut st = self.lock()?;
        let id = st.next_id;
        st.next_id += 1;
        let st = &mut *st;
        let ch = &mut st.ch[src];
        let mut state = OpState::Pending;
        let op = RecvOp {
            src,
            tag,
            segs,
            cap,
            exact,
        };
        let found = if exact {
            (!ch.unexpected.is_empty()).then_some(0)
        } else {
            ch.unexpected.iter().position(|u| u.tag == tag)
        };
        if let Some(pos) = found {
            let u = ch.unexpected.remove(pos).expect("position is valid");
            match size_problem(src, u.tag, u.total, &op) {
                Some(e) => {
                    state = OpState::Failed(e);
                    if !u.complete {
                        // The rest of this message is still arriving: discard it.
                        ch.incoming
                            .as_mut()
                            .expect("an incomplete message is incoming")
                            .dest = Dest::Sink;
                    }
                }
                None => {
                    // SAFETY: the segments come from live `&mut` borrows held by the caller's
                    // scope; `u.data` is engine-owned, so they cannot overlap.
                    unsafe { scatter(&op.segs, 0, &u.data) };
                    if u.complete {
                        state = OpState::Done(u.total);
                    } else {
                        ch.incoming
                            .as_mut()
                            .expect("an incomplete message is incoming")
                            .dest = Dest::Posted(id);
                    }
                }
            }
        } else {
            ch.posted.push_back(id);
        }
        st.ops.insert(
            id,
            Op {
                kind: Kind::Recv(op),
                state,
            },
        );
        Ok(id)
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
    fn pass(&self, st: &mut State, drain: bool) -> Result<bool> {
        st.undrained = false;
        let mut moved = false;
        for p in 0..self.comm.world_size() {
            moved |= self.progress_send(st, p)?;
            moved |= self.progress_recv(st, p, drain)?;
        }
        Ok(moved)
    }

    fn progress_send(&self, st: &mut State, peer: usize) -> Result<bool> {
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

    fn progress_recv(&self, st: &mut State, src: usize, drain: bool) -> Result<bool> {
        let State {
            ops,
            ch: chans,
            undrained,
            ..
        } = st;
        let ch = &mut chans[src];
        let mut moved = false;
        loop {
            self.return_credits(ch, src)?;
            let n = ch.consumed;
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
                // above and will not write it again before this rank's credit below; `slice`
                // checks the range.
                unsafe {
                    self.own
                        .slice(self.payload_off(src, slot), h.len as usize)?
                }
            };
            if ch.incoming.is_none() {
                if h.offset != 0 {
                    return Err(Error::ProtocolViolation(format!(
                        "rank {src} started a message at offset {}",
                        h.offset
                    )));
                }
                let pos = ch.posted.iter().position(|id| match &ops[id].kind {
                    Kind::Recv(r) => r.exact || r.tag == h.tag,
                    Kind::Send(_) => false,
                });
                if pos.is_none() && !drain {
                    *undrained = true;
                    return Ok(moved);
                }
                let dest = match pos {
                    Some(pos) => {
                        let id = ch.posted.remove(pos).expect("valid position");
                        let op = ops.get_mut(&id).expect("posted op exists");
                        let Kind::Recv(r) = &op.kind else {
                            unreachable!("posted holds receives")
                        };
                        match size_problem(src, h.tag, h.total, r) {
                            Some(e) => {
                                op.state = OpState::Failed(e);
                                Dest::Sink
                            }
                            None => Dest::Posted(id),
                        }
                    }
                    None => {
                        ch.unexpected.push_back(Unexpected {
                            tag: h.tag,
                            total: h.total,
                            data: Vec::new(),
                            complete: false,
                        });
                        Dest::Unexpected
                    }
                };
                ch.incoming = Some(Incoming {
                    dest,
                    tag: h.tag,
                    total: h.total,
                    got: 0,
                });
            }
            let inc = ch.incoming.as_mut().expect("set above");
            if h.tag != inc.tag || h.total != inc.total || h.offset != inc.got {
                return Err(Error::ProtocolViolation(format!(
                    "rank {src} sent chunk (tag {}, total {}, offset {}) inside message (tag {}, total {}, at {})",
                    h.tag, h.total, h.offset, inc.tag, inc.total, inc.got
                )));
            }
            match inc.dest {
                Dest::Posted(id) => {
                    let Kind::Recv(r) = &ops[&id].kind else {
                        unreachable!("posted holds receives")
                    };
                    // SAFETY: the receive's segments are live `&mut` borrows of its scope and
                    // do not overlap window memory.
                    unsafe { scatter(&r.segs, inc.got, payload) };
                }
                Dest::Unexpected => ch
                    .unexpected
                    .back_mut()
                    .expect("pushed above")
                    .data
                    .extend_from_slice(payload),
                Dest::Sink => {}
            }
            inc.got += h.len;
            ch.consumed += 1;
            moved = true;
            if inc.got == inc.total {
                match inc.dest {
                    Dest::Posted(id) => {
                        ops.get_mut(&id).expect("posted op exists").state =
                            OpState::Done(inc.total);
                    }
                    Dest::Unexpected => {
                        ch.unexpected.back_mut().expect("pushed above").complete = true
                    }
                    Dest::Sink => {}
                }
                ch.incoming = None;
            }
        }
    }

    /// Progresses once; `Some` when op `id` has ended (it is then removed).
    pub(crate) fn test(&self, id: OpId) -> Result<Option<u64>> {
        self.test_inner(id).map(|(r, _)| r)
    }

    /// As `test`, also telling whether a message is parked in a ring awaiting a receive.
    fn test_inner(&self, id: OpId) -> Result<(Option<u64>, Wake)> {
        let mut st = self.lock()?;
        self.progress(&mut st)?;
        let wake = match st.ops.get(&id) {
            Some(Op {
                kind: Kind::Recv(r),
                state: OpState::Pending,
            }) if st.ops.len() == 1 && !st.undrained => Wake::Focused(r.src, st.ch[r.src].consumed),
            _ if st.undrained => Wake::Drain,
            _ => Wake::Doorbell,
        };
        Ok((Self::collect(&mut st, id)?, wake))
    }

    fn collect(st: &mut State, id: OpId) -> Result<Option<u64>> {
        match st.ops.get(&id).map(|o| &o.state) {
            None => Err(Error::InvalidUsage(format!(
                "request {id} already completed"
            ))),
            Some(OpState::Pending) => Ok(None),
            Some(_) => match st.ops.remove(&id).expect("present").state {
                OpState::Done(n) => Ok(Some(n)),
                OpState::Failed(e) => Err(e),
                OpState::Pending => unreachable!("checked above"),
            },
        }
    }

    /// Whether op `id` is still registered (not yet collected).
    pub(crate) fn is_live(&self, id: OpId) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ops
            .contains_key(&id)
    }

    /// Waits until op `id` ends or `deadline` passes, driving every channel meanwhile.
    pub(crate) fn wait(&self, id: OpId, deadline: Instant) -> Result<u64> {
        self.wait_inner(id, Some(deadline))
    }

    /// Waits with the communicator's timeout, starting the clock only if the op does not
    /// complete at once (a blocking call on a short message reads no clock at all).
    pub(crate) fn wait_default(&self, id: OpId) -> Result<u64> {
        self.wait_inner(id, None)
    }

    fn wait_inner(&self, id: OpId, deadline: Option<Instant>) -> Result<u64> {
        let mut fixed = deadline;
        let mut deadline = || *fixed.get_or_insert_with(|| self.comm.deadline());
        let t = self.t();
        let mut slice = FOCUS_SLICE;
        loop {
            let (done, wake) = self.test_inner(id)?;
            if let Some(n) = done {
                return Ok(n);
            }
            if let Wake::Focused(src, consumed) = wake {
                // Poll briefly before anything that reads the clock: most waits for a short
                // message end here.
                if self.arrives_soon(src, consumed) {
                    continue;
                }
            }
            // Where windows are mapped, senders announce chunks by marker and doorbell only:
            // a receiver that must sleep arms the doorbell.
            let wake = match wake {
                Wake::Focused(src, _) if self.paths[src].is_mapped() => Wake::Doorbell,
                w => w,
            };
            let (until, r) = match wake {
                Wake::Focused(src, consumed) => {
                    let until = deadline().min(Instant::now() + slice);
                    slice = (slice * 2).min(Duration::from_millis(10));
                    (
                        until,
                        t.wait(self.head_base + src, Cmp::Gt, consumed, until),
                    )
                }
                Wake::Drain | Wake::Doorbell => {
                    // Arm, so that peers ring the doorbell, then look once more for anything
                    // that arrived before they could see this rank armed.
                    let _armed = self.doorbell.arm()?;
                    let seen = self.doorbell.seen()?;
                    if let (Some(n), _) = self.test_inner(id)? {
                        return Ok(n);
                    }
                    let until = match wake {
                        // With a message parked in a ring, come back in time to drain it.
                        Wake::Drain => deadline().min(Instant::now() + DRAIN_AFTER),
                        _ => deadline(),
                    };
                    (until, self.doorbell.wait(seen, until))
                }
            };
            match r {
                Ok(_) => slice = FOCUS_SLICE,
                Err(Error::Timeout { .. }) if until < deadline() => {}
                Err(Error::Timeout { .. }) => {
                    return Err(Error::Timeout {
                        op: format!("point-to-point request {id}"),
                        waited: self.comm.timeout(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes ops that a scope leaves unfinished after an error, keeping the channels
    /// consistent: an unstarted send or unmatched receive is simply dropped, a half-received
    /// message is discarded as it arrives; a half-sent message cannot be completed, so the
    /// communicator is aborted (peers then fail instead of waiting for the rest).
    pub(crate) fn cancel(&self, ids: &[OpId]) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut must_abort = false;
        for id in ids {
            let Some(op) = st.ops.remove(id) else {
                continue;
            };
            match op.kind {
                Kind::Send(s) => {
                    st.ch[s.peer].send_q.retain(|x| x != id);
                    if s.started && s.sent < s.total {
                        must_abort = true;
                    }
                }
                Kind::Recv(r) => {
                    let ch = &mut st.ch[r.src];
                    ch.posted.retain(|x| x != id);
                    if let Some(inc) = &mut ch.incoming {
                        if matches!(inc.dest, Dest::Posted(p) if p == *id) {
                            inc.dest = Dest::Sink;
                        }
                    }
                }
            }
        }
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
