//! What a collective object holds on its communicator — a window and a range of signal
//! words — and gives back when it closes or is dropped.

use crate::control::Kind;
use crate::error::Result;
use crate::transport::{MappedMem, PeerPath, SignalOp, Window};
use crate::Communicator;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

/// A window and signal words taken from a communicator by one collective object.
///
/// Taking one is collective: the window is registered on every rank, the words are reserved
/// (the same range on every rank) and cleared, and every rank's description of the object is
/// checked against the others' (`ConfigMismatch` otherwise). Closing is collective too: the
/// ranks drain (every put and signal a peer addressed to this object has landed), then the
/// window is deregistered and the words go back to the communicator for the next object.
/// An object whose last call failed half-way cannot drain (a peer may still be sending to
/// it): its words are retired instead of reused, and its window is deregistered at once.
///
/// ```
/// use std::time::Duration;
/// use xccl::{transport::loopback::Loopback, Communicator};
///
/// let ranks = Loopback::create(2).unwrap();
/// std::thread::scope(|s| {
///     for t in ranks {
///         s.spawn(move || {
///             let comm = Communicator::from_transport(Box::new(t), Duration::from_secs(10))?;
///             let before = comm.signals_in_use();
///             let lease = comm.lease("my object", 4096, 8, "version 1")?;
///             assert_eq!(lease.signals().len(), 8);
///             lease.close()?; // collective: every rank closes its lease
///             assert_eq!(comm.signals_in_use(), before);
///             Ok::<(), xccl::Error>(())
///         });
///     }
/// });
/// ```
pub struct Lease<'c> {
    comm: &'c Communicator,
    win: Option<Window>,
    signals: Range<usize>,
    /// A call is under way (set by [`Lease::enter`], cleared by [`Lease::leave`]); still set
    /// at the end means the last call failed half-way.
    busy: AtomicBool,
}

impl Communicator {
    /// Collective: takes a window of `len` bytes and `signals` signal words for an object
    /// described by `what` and `config` (see [`Lease`]).
    pub fn lease(&self, what: &str, len: usize, signals: usize, config: &str) -> Result<Lease<'_>> {
        let caps = self.transport().caps();
        if len > caps.max_window_len {
            return Err(crate::Error::InvalidArgument(format!(
                "{what} needs a window of {len} bytes; the {} backend's largest is {}",
                caps.backend, caps.max_window_len
            )));
        }
        let win = self.transport().register(len)?;
        let taken = self.pool().take(signals);
        let range = match taken {
            Ok(r) => r,
            Err(e) => {
                let _ = self.transport().deregister(win);
                return Err(e);
            }
        };
        let mut lease = Lease {
            comm: self,
            win: Some(win),
            signals: range.clone(),
            busy: AtomicBool::new(true),
        };
        // Words reused from an earlier object hold its last values: clear them before any
        // peer can signal them, which it does only after the agreement below.
        let me = self.rank();
        for i in range.clone() {
            self.transport().signal(me, i, SignalOp::Set, 0)?;
        }
        let full = format!("{config}; window {len} bytes; signals {range:?}");
        match self.agree(what, &full) {
            Ok(()) => {
                lease.busy.store(false, Ordering::Relaxed);
                Ok(lease)
            }
            Err(e @ crate::Error::ConfigMismatch(_)) => {
                // Every rank finished the agreement and refuses the object: nobody signals
                // the words, so they go back at once.
                lease.give_back_unused();
                Err(e)
            }
            // Otherwise a peer may not have got this far: dropping retires the words.
            Err(e) => Err(e),
        }
    }
}

impl<'c> Lease<'c> {
    /// The communicator.
    pub fn comm(&self) -> &'c Communicator {
        self.comm
    }

    /// The window.
    pub fn window(&self) -> &Window {
        self.win
            .as_ref()
            .expect("a lease holds its window until it closes")
    }

    /// The signal words, the same range on every rank.
    pub fn signals(&self) -> Range<usize> {
        self.signals.clone()
    }

    /// This rank's path to every rank's copy of the window (by rank), and its own copy: what
    /// an object reads and writes the window through.
    pub(crate) fn views(&self) -> Result<(Vec<PeerPath<'c>>, MappedMem)> {
        let t = self.comm.transport();
        Ok((t.paths(self.window())?, t.local_mem(self.window())?))
    }

    /// Marks the start of a call that talks to peers; until [`Lease::leave`], the object is
    /// not known to be quiet.
    pub fn enter(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// Marks the end of a call that completed on this rank.
    pub fn leave(&self) {
        self.busy.store(false, Ordering::Relaxed);
    }

    /// Collective: drains, deregisters the window and returns the signal words (see
    /// [`Lease`]), bounded by the communicator's deadline. Resources are given back (or
    /// retired) whatever happens; the error says why the end could not be agreed.
    pub fn close(mut self) -> Result<()> {
        self.release()
    }

    /// Gives everything back without draining: only when no peer can address the object.
    fn give_back_unused(&mut self) {
        if let Some(win) = self.win.take() {
            let _ = self.comm.transport().deregister(win);
            let range = std::mem::replace(&mut self.signals, 0..0);
            self.comm.pool().give_back(range);
        }
    }

    /// [`Lease::close`] for owners that close through `&mut`; later calls do nothing.
    pub(crate) fn release(&mut self) -> Result<()> {
        let Some(win) = self.win.take() else {
            return Ok(());
        };
        let comm = self.comm;
        let drained = if self.busy.load(Ordering::Relaxed) {
            Err(crate::Error::InvalidUsage(
                "closing an object whose last call failed: its signal words are retired".into(),
            ))
        } else {
            comm.exchange_words(Kind::Drain, [0; crate::control::WORDS])
                .map(|_| ())
        };
        let dereg = comm.transport().deregister(win);
        let range = std::mem::replace(&mut self.signals, 0..0);
        match drained {
            Ok(()) => comm.pool().give_back(range),
            Err(_) => comm.pool().retire(range),
        }
        drained.and(dereg)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(rank = self.comm.rank(), error = %e, "xccl: releasing an object");
        }
    }
}
