//! Non-blocking requests, sound by construction: they live inside a [`Scope`] that waits for
//! every request it started before it returns, so no buffer is released while the engine
//! still points at it (even if a request handle is leaked).

use super::engine::{Engine, OpId, SendSegs};
use crate::error::Result;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::Instant;

/// Where non-blocking sends and receives are started; see [`super::P2p::scope`].
pub struct Scope<'scope, 'env: 'scope> {
    pub(super) engine: &'env Engine<'env>,
    pub(super) ids: Mutex<Vec<OpId>>,
    pub(super) _scope: PhantomData<&'scope mut &'scope ()>,
    pub(super) _env: PhantomData<&'env mut &'env ()>,
}

/// An outstanding send. Complete it with [`SendRequest::wait`] (or let the scope do it).
#[must_use = "a request does nothing unless tested or waited for (the scope waits at its end)"]
pub struct SendRequest<'scope> {
    engine: &'scope Engine<'scope>,
    id: OpId,
}

/// An outstanding receive. [`RecvRequest::wait`] returns the message length.
#[must_use = "a request does nothing unless tested or waited for (the scope waits at its end)"]
pub struct RecvRequest<'scope> {
    engine: &'scope Engine<'scope>,
    id: OpId,
    done: Option<u64>,
}

impl<'scope, 'env> Scope<'scope, 'env> {
    fn track(&self, id: OpId) -> OpId {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).push(id);
        id
    }

    /// Starts sending `data` to `peer` with `tag`. Messages to one peer leave in the order
    /// they were started.
    pub fn isend(
        &'scope self,
        peer: usize,
        tag: u64,
        data: &'scope [u8],
    ) -> Result<SendRequest<'scope>> {
        self.isendv(peer, tag, &[data])
    }

    /// Starts sending the concatenation of `blocks` (for example the pages of a paged KV
    /// cache) as one message, without packing them first.
    pub fn isendv(
        &'scope self,
        peer: usize,
        tag: u64,
        blocks: &[&'scope [u8]],
    ) -> Result<SendRequest<'scope>> {
        let segs: SendSegs = blocks.iter().map(|b| (b.as_ptr(), b.len())).collect();
        let id = self.track(self.engine.post_send(peer, tag, segs)?);
        Ok(SendRequest {
            engine: self.engine,
            id,
        })
    }

    /// Starts receiving the next message with `tag` from `src` into `buf` (which may be
    /// larger than the message).
    pub fn irecv(
        &'scope self,
        src: usize,
        tag: u64,
        buf: &'scope mut [u8],
    ) -> Result<RecvRequest<'scope>> {
        self.irecvv(src, tag, vec![buf])
    }

    /// Starts receiving one message scattered over `blocks` in order.
    pub fn irecvv(
        &'scope self,
        src: usize,
        tag: u64,
        blocks: Vec<&'scope mut [u8]>,
    ) -> Result<RecvRequest<'scope>> {
        self.irecv_inner(src, tag, blocks, false)
    }

    /// Like `irecv`, but the message must fill the buffers exactly (collectives use this to
    /// turn disagreeing counts into an error).
    pub(crate) fn irecv_exact(
        &'scope self,
        src: usize,
        tag: u64,
        buf: &'scope mut [u8],
    ) -> Result<RecvRequest<'scope>> {
        self.irecv_inner(src, tag, vec![buf], true)
    }

    fn irecv_inner(
        &'scope self,
        src: usize,
        tag: u64,
        blocks: Vec<&'scope mut [u8]>,
        exact: bool,
    ) -> Result<RecvRequest<'scope>> {
        let segs = blocks
            .into_iter()
            .map(|b| (b.as_mut_ptr(), b.len()))
            .collect();
        let id = self.track(self.engine.post_recv(src, tag, segs, exact)?);
        Ok(RecvRequest {
            engine: self.engine,
            id,
            done: None,
        })
    }
}

impl SendRequest<'_> {
    /// Makes progress; true once the data has left (the buffer may then be reused).
    pub fn test(&mut self) -> Result<bool> {
        if !self.engine.is_live(self.id) {
            return Ok(true);
        }
        Ok(self.engine.test(self.id)?.is_some())
    }

    /// Waits until the data has left, at most until `deadline`.
    pub fn wait(self, deadline: Instant) -> Result<()> {
        if !self.engine.is_live(self.id) {
            return Ok(());
        }
        self.engine.wait(self.id, deadline).map(|_| ())
    }
}

impl RecvRequest<'_> {
    /// Makes progress; `Some(length)` once the message has arrived.
    pub fn test(&mut self) -> Result<Option<usize>> {
        if self.done.is_none() {
            self.done = self.engine.test(self.id)?;
        }
        Ok(self.done.map(|n| n as usize))
    }

    /// Waits for the message, at most until `deadline`; returns its length.
    pub fn wait(self, deadline: Instant) -> Result<usize> {
        match self.done {
            Some(n) => Ok(n as usize),
            None => self.engine.wait(self.id, deadline).map(|n| n as usize),
        }
    }
}
