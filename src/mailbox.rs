//! The epoch mailbox: how a rank tells each peer, once per call, what it sent (a count and
//! where it starts): one slot per (kind, source) in the receiver's window, two
//! epochs of them so a call never overwrites a slot a peer may still read, and one signal
//! word per (kind, source) set to the call number after the slot. `Exchange` and both MoE
//! modes announce through it.
//!
//! A slot is a header of little-endian words: the call number, then the caller's words. A
//! receiver waits for the source's signal to reach the call, then checks the slot's call
//! number: a slot or a signal from another call is a [`Error::ProtocolViolation`], never a
//! value used.

use crate::error::{Error, Result};
use crate::size::Sizer;
use crate::transport::{Cmp, MappedMem, PeerPath, SignalOp, Transport};
use std::time::Instant;

/// Slots are cache-line aligned, so no two sources share a line.
const LINE: usize = 64;
/// Most words a slot's header carries after the call number.
pub(crate) const MAX_WORDS: usize = 4;

/// Where the mailbox lies: in a window from `at`, with its signal words from `signals`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mailbox {
    at: usize,
    signals: usize,
    kinds: usize,
    world: usize,
    words: usize,
    stride: usize,
}

impl Mailbox {
    /// A mailbox of `kinds` kinds for `world` sources, slots of `words` words, from offset
    /// `at` of a window; its signal words are placed with
    /// [`Mailbox::at_signals`] once the object's lease is taken.
    pub fn new(
        size: &Sizer<'_>,
        at: usize,
        kinds: usize,
        world: usize,
        words: usize,
    ) -> Result<Self> {
        assert!(
            words <= MAX_WORDS,
            "a mailbox slot carries at most {MAX_WORDS} words"
        );
        let header = size.mul(&[words + 1, 8])?;
        let stride = size.round_up(header, LINE)?;
        size.mul(&[2, kinds, world, stride])?;
        Ok(Mailbox {
            at,
            signals: 0,
            kinds,
            world,
            words,
            stride,
        })
    }

    /// The same mailbox with its [`Mailbox::signal_count`] signal words from `start`.
    pub fn at_signals(self, start: usize) -> Self {
        Mailbox {
            signals: start,
            ..self
        }
    }

    /// Bytes of window it takes (both epochs).
    pub fn len(&self) -> usize {
        2 * self.kinds * self.world * self.stride
    }

    /// Signal words it takes.
    pub fn signal_count(&self) -> usize {
        self.kinds * self.world
    }

    /// Bytes of a slot's header (the call number and the caller's words).
    pub fn header_len(&self) -> usize {
        8 * (self.words + 1)
    }

    /// Offset of `src`'s slot of `kind` for call `epoch`.
    pub fn slot_off(&self, epoch: u64, kind: usize, src: usize) -> usize {
        let parity = (epoch % 2) as usize;
        self.at + ((parity * self.kinds + kind) * self.world + src) * self.stride
    }

    fn signal(&self, kind: usize, src: usize) -> usize {
        self.signals + kind * self.world + src
    }

    /// Posts this rank's (`me`) slot of `kind` for call `epoch` to `path`'s peer: writes the
    /// header (`epoch`, `words`) into `slot` (scratch of at least the header's length), puts
    /// it and sets the signal, one transfer over the network.
    pub fn post(
        &self,
        path: &PeerPath<'_>,
        me: usize,
        kind: usize,
        epoch: u64,
        words: &[u64],
        slot: &mut [u8],
    ) -> Result<()> {
        let header = self.header_len();
        if words.len() != self.words || slot.len() < header || slot.len() > self.stride {
            return Err(Error::InvalidUsage(format!(
                "mailbox slot of {} bytes with {} words (slots hold {} words, {} bytes)",
                slot.len(),
                words.len(),
                self.words,
                self.stride
            )));
        }
        slot[..8].copy_from_slice(&epoch.to_le_bytes());
        for (i, w) in words.iter().enumerate() {
            slot[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        path.put_signal(
            self.slot_off(epoch, kind, me),
            slot,
            self.signal(kind, me),
            SignalOp::Set,
            epoch,
        )
    }

    /// Waits (until `deadline`) for `src`'s slot of `kind` for call `epoch` in `own` (this
    /// rank's copy of the window) and returns its
    /// words (the first [`Mailbox::new`]'s `words` of the array), checked to belong to this
    /// call.
    pub fn collect(
        &self,
        t: &dyn Transport,
        own: &MappedMem,
        kind: usize,
        src: usize,
        epoch: u64,
        deadline: Instant,
    ) -> Result<[u64; MAX_WORDS]> {
        // Most slots are in by the time a receiver looks: one load, and the full wait (its
        // liveness check and clock) only when the signal is not there yet.
        let sig = self.signal(kind, src);
        let v = match t.signal_value(sig)? {
            v if v >= epoch => v,
            _ => t.wait(sig, Cmp::Ge, epoch, deadline)?,
        };
        let mut buf = [0u8; 8 * (MAX_WORDS + 1)];
        let header = &mut buf[..self.header_len()];
        own.read(self.slot_off(epoch, kind, src), header)?;
        let word = |i: usize| u64::from_le_bytes(header[8 * i..8 * i + 8].try_into().expect("8"));
        // A peer can be one call ahead (it finished this one and posted the next into the
        // other epoch's slot), never two.
        if word(0) != epoch || v > epoch.saturating_add(1) {
            return Err(Error::ProtocolViolation(format!(
                "rank {src} announced call {} (signal {v}) during call {epoch}",
                word(0)
            )));
        }
        let mut words = [0u64; MAX_WORDS];
        for (i, w) in words.iter_mut().enumerate().take(self.words) {
            *w = word(i + 1);
        }
        Ok(words)
    }
}
