//! Reading other ranks' copies of a window in place, where the backend maps them here
//! (shared memory): what combine does instead of having rows sent.

use crate::error::{Error, Result};
use crate::transport::{Transport, Window};
use smallvec::SmallVec;

/// Every rank's copy of one window, as mapped into this process.
pub(super) struct PeerRows {
    bases: SmallVec<[*const u8; 8]>,
    len: usize,
}

impl PeerRows {
    /// The copies of `win` the backend maps here (none when `mapped` is false).
    pub fn new(t: &dyn Transport, win: &Window, mapped: bool) -> Result<Self> {
        let mut bases = SmallVec::new();
        for r in 0..t.world_size() {
            bases.push(match t.peer_ptr(r, win)? {
                Some(p) if mapped => p as *const u8,
                _ => std::ptr::null(),
            });
        }
        Ok(PeerRows {
            bases,
            len: win.len(),
        })
    }

    /// `len` bytes at `off` of rank `r`'s copy, bounds-checked.
    ///
    /// # Safety
    /// Rank `r` must not write the range while the slice lives: it announced the range (a
    /// signal the caller waited for) and, by the buffer's protocol, rewrites it only after
    /// this rank's next dispatch.
    pub unsafe fn row(&self, r: usize, off: usize, len: usize) -> Result<&[u8]> {
        let base = self.bases.get(r).copied().unwrap_or(std::ptr::null());
        if base.is_null() || off.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::InvalidUsage(format!(
                "rank {r}'s window is not mapped here (or {off}+{len} exceeds it)"
            )));
        }
        // SAFETY: `base` maps rank r's copy of the window (`self.len` bytes; the range was
        // checked above) for as long as the window is registered, which outlives the buffer
        // holding this; the caller guarantees nobody writes the range meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(base.add(off), len) })
    }
}
