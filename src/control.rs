//! The communicator's control exchange: an all-gather of a few words per rank over a small
//! window, used to agree on objects' configurations, to drain before giving resources back
//! and to split. Each source sets its own signal word to the call number after its slot; the
//! window holds two calls' worth of one slot per source, so a call never overwrites a slot a
//! peer may still read (a rank starts call k+2 only after every peer has sent it call k+1,
//! which each does after reading call k).

use crate::error::{Error, Result};
use crate::transport::{Cmp, SignalOp};
use crate::Communicator;

/// Words each rank contributes to one exchange.
pub(crate) const WORDS: usize = 4;
/// One slot: the call number, then the words (a cache line).
const SLOT: usize = 64;

/// What an exchange is for; ranks that make different kinds of call at the same point have
/// called collectives in different orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Kind {
    Agree = 1,
    Drain = 2,
    Split = 3,
    SplitSetup = 4,
    Choose = 5,
}

/// Bytes of the control window for `world` ranks.
pub(crate) fn window_len(world: usize) -> usize {
    2 * world.max(1) * SLOT
}

impl Communicator {
    fn slot_off(&self, call: u64, src: usize) -> usize {
        ((call % 2) as usize * self.world_size() + src) * SLOT
    }

    /// Collective: every rank contributes `words` and gets every rank's, by rank. Doubles as
    /// a barrier that also drains: when it returns, every signal and put any peer addressed
    /// to this rank before its own call has been applied (each peer's signal travels after
    /// them on the same ordered path).
    pub(crate) fn exchange_words(
        &self,
        kind: Kind,
        words: [u64; WORDS],
    ) -> Result<Vec<[u64; WORDS]>> {
        let (me, n) = (self.rank(), self.world_size());
        let t = self.transport();
        let ctl = self.control_window()?;
        let call = self
            .ctl_epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let sig = self.control_signals();
        let mut slot = [0u8; 8 * (WORDS + 2)];
        slot[..8].copy_from_slice(&call.to_le_bytes());
        slot[8..16].copy_from_slice(&(kind as u64).to_le_bytes());
        for (i, w) in words.iter().enumerate() {
            slot[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        for step in 1..n {
            let dst = (me + step) % n;
            let off = self.slot_off(call, me);
            t.put_signal(dst, &ctl, off, &slot, sig + me, SignalOp::Set, call)?;
        }
        let mut out = vec![[0u64; WORDS]; n];
        out[me] = words;
        let deadline = self.deadline();
        // The first peer that made another kind of call (reported once every slot is in).
        let mut other_kind = None;
        for step in 1..n {
            let src = (me + n - step) % n;
            t.wait(sig + src, Cmp::Ge, call, deadline)?;
            let mut got = [0u8; 8 * (WORDS + 2)];
            t.read_local(&ctl, self.slot_off(call, src), &mut got)?;
            let word = |i: usize| u64::from_le_bytes(got[8 * i..8 * i + 8].try_into().expect("8"));
            if word(0) != call {
                return Err(Error::ProtocolViolation(format!(
                    "rank {src} sent control call {} during call {call}",
                    word(0)
                )));
            }
            if word(1) != kind as u64 && other_kind.is_none() {
                other_kind = Some((src, word(1)));
            }
            for (i, o) in out[src].iter_mut().enumerate() {
                *o = word(2 + i);
            }
        }
        if let Some((src, k)) = other_kind {
            return Err(Error::InvalidUsage(format!(
                "collective calls out of order: this rank ({me}) made a {kind:?} call while \
                 rank {src} made another kind ({k})"
            )));
        }
        Ok(out)
    }

    /// Collective: checks that every rank describes `what` the same way (`config`, any text
    /// that pins it down), else `ConfigMismatch` on every rank, naming which ranks differ.
    ///
    /// ```no_run
    /// let comm = xccl::Communicator::from_env()?;
    /// comm.agree("model", "layers=61 hidden=7168")?;
    /// # Ok::<(), xccl::Error>(())
    /// ```
    pub fn agree(&self, what: &str, config: &str) -> Result<()> {
        let hash = fingerprint(config);
        let all = self.exchange_words(Kind::Agree, [hash, 0, 0, 0])?;
        if all.iter().all(|w| w[0] == hash) {
            return Ok(());
        }
        let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
        for (r, w) in all.iter().enumerate() {
            match groups.iter_mut().find(|(h, _)| *h == w[0]) {
                Some((_, ranks)) => ranks.push(r),
                None => groups.push((w[0], vec![r])),
            }
        }
        let sides: Vec<String> = groups.iter().map(|(_, r)| format!("{r:?}")).collect();
        Err(Error::ConfigMismatch(format!(
            "{what} differs across ranks (ranks {} each describe it another way); rank {} has \
             [{config}]",
            sides.join(" vs "),
            self.rank()
        )))
    }

    /// Collective: true on every rank when every rank passes the same `text` and `able`,
    /// false on every rank otherwise (a choice every rank then makes alike, where
    /// [`Communicator::agree`] would fail).
    pub(crate) fn all_able(&self, text: &str, able: bool) -> Result<bool> {
        let hash = fingerprint(text);
        let all = self.exchange_words(Kind::Choose, [hash, u64::from(able), 0, 0])?;
        Ok(all.iter().all(|w| w[0] == hash && w[1] == 1))
    }
}

/// A 64-bit digest of a configuration text.
pub(crate) fn fingerprint(text: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(text.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}
