//! Message matching, without a transport: the ops of one engine (sends and receives), the
//! channel state per peer (queued sends, posted receives, the message coming in, messages
//! set aside for want of a receive), and how a received chunk finds its receive. The engine
//! (`engine.rs`) moves chunks through rings; this module decides where each one goes.

use super::wire::ChunkHeader;
use crate::error::{Error, Result};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::time::Instant;

pub(crate) type OpId = u64;
/// Source segments of a send (one for a plain buffer, several for vectored sends).
pub(crate) type SendSegs = SmallVec<[(*const u8, usize); 2]>;
/// Destination segments of a receive.
pub(crate) type RecvSegs = SmallVec<[(*mut u8, usize); 2]>;

pub(super) type OpMap = crate::id_map::IdMap<Op>;

pub(super) enum OpState {
    Pending,
    Done(u64),
    Failed(Error),
}

pub(super) struct SendOp {
    pub(super) peer: usize,
    pub(super) tag: u64,
    pub(super) segs: SendSegs,
    pub(super) total: u64,
    pub(super) sent: u64,
    pub(super) started: bool,
}

pub(super) struct RecvOp {
    pub(super) src: usize,
    pub(super) tag: u64,
    pub(super) segs: RecvSegs,
    pub(super) cap: u64,
    /// Collective mode: takes the next message from `src` whatever its tag, and fails unless
    /// tag and length are exactly as expected (ranks called different collectives, or
    /// disagree on counts).
    pub(super) exact: bool,
}

pub(super) enum Kind {
    Send(SendOp),
    Recv(RecvOp),
}

pub(super) struct Op {
    pub(super) kind: Kind,
    pub(super) state: OpState,
}

pub(super) enum Dest {
    Posted(OpId),
    Unexpected,
    Sink,
}

pub(super) struct Incoming {
    pub(super) dest: Dest,
    pub(super) tag: u64,
    pub(super) total: u64,
    pub(super) got: u64,
}

pub(super) struct Unexpected {
    pub(super) tag: u64,
    pub(super) total: u64,
    pub(super) data: Vec<u8>,
    pub(super) complete: bool,
}

#[derive(Default)]
pub(super) struct Channel {
    pub(super) sent_chunks: u64,
    pub(super) send_q: VecDeque<OpId>,
    pub(super) consumed: u64,
    /// Chunks whose credit has been returned to the sender (credits go back in batches).
    pub(super) credited: u64,
    pub(super) incoming: Option<Incoming>,
    pub(super) posted: VecDeque<OpId>,
    pub(super) unexpected: VecDeque<Unexpected>,
}

pub(crate) struct State {
    pub(super) ops: OpMap,
    pub(super) next_id: OpId,
    pub(super) ch: Vec<Channel>,
    pub(super) poisoned: Option<String>,
    /// When the current run of passes that moved nothing began (`None` while chunks move);
    /// the clock is read only once nothing moves.
    pub(super) stalled_since: Option<Instant>,
    /// The last pass left a message in a ring because no receive was posted for it.
    pub(super) undrained: bool,
}

// SAFETY: the raw pointers in pending ops point at buffers borrowed by a live `Scope` (see
// `request.rs`): they are used only under the engine's mutex while the op is in `ops`, and
// every op of a scope is removed before the scope (and so the borrow) ends.
unsafe impl Send for State {}

/// Why a message does not fit the receive posted for it, if it does not.
pub(super) fn size_problem(src: usize, tag: u64, total: u64, r: &RecvOp) -> Option<Error> {
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
pub(super) unsafe fn scatter(segs: &[(*mut u8, usize)], mut off: u64, mut data: &[u8]) {
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
pub(super) unsafe fn gather<'a>(
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

impl Channel {
    /// The message coming in, which a message set aside incomplete implies.
    fn incoming_mut(&mut self) -> &mut Incoming {
        self.incoming
            .as_mut()
            .expect("an incomplete message is incoming")
    }
}

/// What became of a chunk offered to [`State::take_chunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Consumed: copied into its receive, set aside, or discarded.
    Yes,
    /// Left in the ring: it starts a message nobody has posted a receive for yet.
    Parked,
}

impl State {
    /// The state of an engine over `world` peers.
    pub(super) fn new(world: usize) -> Self {
        let mut ch = Vec::with_capacity(world);
        ch.resize_with(world, Channel::default);
        State {
            ops: OpMap::default(),
            next_id: 1,
            ch,
            poisoned: None,
            stalled_since: None,
            undrained: false,
        }
    }

    fn new_id(&mut self) -> OpId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Queues a send of `segs` (all bytes, in order) to `peer`.
    pub(super) fn add_send(&mut self, peer: usize, tag: u64, segs: SendSegs) -> OpId {
        let total = segs.iter().map(|&(_, l)| l as u64).sum();
        let id = self.new_id();
        let send = SendOp {
            peer,
            tag,
            segs,
            total,
            sent: 0,
            started: false,
        };
        let state = OpState::Pending;
        self.ops.insert(
            id,
            Op {
                kind: Kind::Send(send),
                state,
            },
        );
        self.ch[peer].send_q.push_back(id);
        id
    }

    /// Posts a receive from `src` into `segs`; `exact` demands the next message from `src`,
    /// whatever its tag, and that it fill them. A message already set aside is matched at
    /// once (and its rest, still arriving, goes straight to the receive).
    pub(super) fn add_recv(&mut self, src: usize, tag: u64, segs: RecvSegs, exact: bool) -> OpId {
        let cap: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
        let id = self.new_id();
        let ch = &mut self.ch[src];
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
                        ch.incoming_mut().dest = Dest::Sink;
                    }
                }
                None => {
                    // SAFETY: the segments come from live `&mut` borrows held by the caller's
                    // scope; `u.data` is engine-owned, so they cannot overlap.
                    unsafe { scatter(&op.segs, 0, &u.data) };
                    if u.complete {
                        state = OpState::Done(u.total);
                    } else {
                        ch.incoming_mut().dest = Dest::Posted(id);
                    }
                }
            }
        } else {
            ch.posted.push_back(id);
        }
        self.ops.insert(
            id,
            Op {
                kind: Kind::Recv(op),
                state,
            },
        );
        id
    }

    /// Where the message that chunk `h` (from `src`) starts goes: its posted receive (or
    /// nowhere, failing the receive, when it does not fit), or, with `drain`, set aside.
    /// `None` when nobody posted a receive for it and it may stay in the ring.
    fn open_message(&mut self, src: usize, h: &ChunkHeader, drain: bool) -> Result<Option<Dest>> {
        if h.offset != 0 {
            return Err(Error::ProtocolViolation(format!(
                "rank {src} started a message at offset {}",
                h.offset
            )));
        }
        let (ops, ch) = (&mut self.ops, &mut self.ch[src]);
        let pos = ch.posted.iter().position(|id| match &ops[id].kind {
            Kind::Recv(r) => r.exact || r.tag == h.tag,
            Kind::Send(_) => false,
        });
        Ok(match pos {
            Some(pos) => {
                let id = ch.posted.remove(pos).expect("valid position");
                let op = ops.get_mut(&id).expect("posted op exists");
                let Kind::Recv(r) = &op.kind else {
                    unreachable!("posted holds receives")
                };
                Some(match size_problem(src, h.tag, h.total, r) {
                    Some(e) => {
                        op.state = OpState::Failed(e);
                        Dest::Sink
                    }
                    None => Dest::Posted(id),
                })
            }
            None if drain => {
                ch.unexpected.push_back(Unexpected {
                    tag: h.tag,
                    total: h.total,
                    data: Vec::new(),
                    complete: false,
                });
                Some(Dest::Unexpected)
            }
            None => None,
        })
    }

    /// Takes chunk `h` from `src` with its `payload` (the chunk the channel expects next):
    /// into the receive its message goes to, set aside, or discarded. A chunk that starts a
    /// message nobody has posted a receive for stays in the ring unless `drain`.
    pub(super) fn take_chunk(
        &mut self,
        src: usize,
        h: &ChunkHeader,
        payload: &[u8],
        drain: bool,
    ) -> Result<Taken> {
        if self.ch[src].incoming.is_none() {
            let Some(dest) = self.open_message(src, h, drain)? else {
                self.undrained = true;
                return Ok(Taken::Parked);
            };
            self.ch[src].incoming = Some(Incoming {
                dest,
                tag: h.tag,
                total: h.total,
                got: 0,
            });
        }
        let (ops, ch) = (&mut self.ops, &mut self.ch[src]);
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
                // SAFETY: the receive's segments are live `&mut` borrows of its scope and do
                // not overlap `payload` (window memory or a header).
                unsafe { scatter(&r.segs, inc.got, payload) };
            }
            Dest::Unexpected => ch
                .unexpected
                .back_mut()
                .expect("set aside when the message started")
                .data
                .extend_from_slice(payload),
            Dest::Sink => {}
        }
        inc.got += h.len;
        ch.consumed += 1;
        if inc.got == inc.total {
            match inc.dest {
                Dest::Posted(id) => {
                    ops.get_mut(&id).expect("posted op exists").state = OpState::Done(inc.total)
                }
                Dest::Unexpected => ch.unexpected.back_mut().expect("set aside").complete = true,
                Dest::Sink => {}
            }
            ch.incoming = None;
        }
        Ok(Taken::Yes)
    }

    /// Removes op `id` once it has ended: `Some(bytes)` or its error; `None` while pending.
    pub(super) fn collect(&mut self, id: OpId) -> Result<Option<u64>> {
        match self.ops.get(&id).map(|o| &o.state) {
            None => Err(Error::InvalidUsage(format!(
                "request {id} already completed"
            ))),
            Some(OpState::Pending) => Ok(None),
            Some(_) => match self.ops.remove(&id).expect("present").state {
                OpState::Done(n) => Ok(Some(n)),
                OpState::Failed(e) => Err(e),
                OpState::Pending => unreachable!("checked above"),
            },
        }
    }

    /// Removes ops a scope leaves unfinished, keeping the channels consistent: an unstarted
    /// send or unmatched receive is simply dropped, a half-received message is discarded as
    /// it arrives. True when a message was left half sent (it cannot be completed).
    pub(super) fn cancel(&mut self, ids: &[OpId]) -> bool {
        let mut half_sent = false;
        for id in ids {
            let Some(op) = self.ops.remove(id) else {
                continue;
            };
            match op.kind {
                Kind::Send(s) => {
                    self.ch[s.peer].send_q.retain(|x| x != id);
                    half_sent |= s.started && s.sent < s.total;
                }
                Kind::Recv(r) => {
                    let ch = &mut self.ch[r.src];
                    ch.posted.retain(|x| x != id);
                    if let Some(inc) = &mut ch.incoming {
                        if matches!(inc.dest, Dest::Posted(p) if p == *id) {
                            inc.dest = Dest::Sink;
                        }
                    }
                }
            }
        }
        half_sent
    }

    /// Whether a message is under way (an op pending or a message coming in) or the engine
    /// is poisoned.
    pub(super) fn busy(&self) -> bool {
        self.poisoned.is_some()
            || !self.ops.is_empty()
            || self.ch.iter().any(|c| c.incoming.is_some())
    }

    /// Whether nothing from `src` is pending: no posted receive, no message half in, none set
    /// aside.
    pub(super) fn idle_from(&self, src: usize) -> bool {
        let ch = &self.ch[src];
        ch.posted.is_empty() && ch.incoming.is_none() && ch.unexpected.is_empty()
    }
}

#[cfg(test)]
#[path = "matching_tests.rs"]
mod tests;
