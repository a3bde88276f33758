//! A copy of a window mapped into this process (this rank's own, or a peer's over shared
//! memory), kept alive while the view lives: checked copies, one-word publish/observe with
//! their ordering, and read-only row views. The only place algorithms' window memory is
//! touched through a pointer.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A copy of a window mapped into this process, kept in memory for as long as the value
/// lives: a deregistration that races with an access frees the memory only after the access.
///
/// Every accessor checks its range against the window; words are 8-byte aligned offsets.
pub struct MappedMem {
    base: *mut u8,
    len: usize,
    _keep: Arc<dyn Send + Sync>,
}

// SAFETY: the view is a pointer into memory that stays mapped while `_keep` (Send + Sync)
// lives; every access through it is a raw copy or an atomic, which any thread may do.
unsafe impl Send for MappedMem {}
// SAFETY: as above: shared access never creates Rust references to the bytes except through
// the `unsafe` slice accessors, whose callers promise no concurrent writer.
unsafe impl Sync for MappedMem {}

impl MappedMem {
    /// For backends: the window memory at `base`, `len` bytes, which stays valid while `keep`
    /// lives.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes for as long as `keep` (and
    /// every clone of it) is alive, and 8-byte aligned.
    pub unsafe fn new(base: *mut u8, len: usize, keep: Arc<dyn Send + Sync>) -> Self {
        debug_assert_eq!(base as usize % 8, 0, "window memory must be word aligned");
        MappedMem {
            base,
            len,
            _keep: keep,
        }
    }

    /// Size of the window in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the memory, for this module's siblings (the default local accessors).
    pub(crate) fn ptr_at(&self, offset: usize, len: usize) -> Result<*mut u8> {
        super::check_range(self.len, offset, len)?;
        // SAFETY: `offset + len <= self.len` (checked), inside the mapping.
        Ok(unsafe { self.base.add(offset) })
    }

    /// Copies `data` to `offset` with ordinary stores (`data` may lie in this very window).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        let dst = self.ptr_at(offset, data.len())?;
        // SAFETY: range checked, memory kept alive by `_keep`; the overlap-safe copy covers a
        // source inside the same window. Concurrent peers' raw copies only make the value
        // unspecified, which the contract allows until a signal announces it.
        unsafe { crate::copy::copy_any(dst, data.as_ptr(), data.len()) };
        Ok(())
    }

    /// Copies `data` to `offset` with non-temporal stores where the CPU has them (bulk data
    /// another core reads next). They are not ordered by a later Release store:
    /// [`crate::copy::store_fence`] must run before the data is published, which
    /// [`super::PeerPath`] does.
    pub(crate) fn write_streaming(&self, offset: usize, data: &[u8]) -> Result<()> {
        let dst = self.ptr_at(offset, data.len())?;
        let (d, s) = (dst as usize, data.as_ptr() as usize);
        if d < s.saturating_add(data.len()) && s < d.saturating_add(data.len()) {
            return self.write(offset, data);
        }
        // SAFETY: range checked, memory alive, the ranges were just found disjoint.
        unsafe { crate::copy::copy_streaming(dst, data.as_ptr(), data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes from `offset`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = self.ptr_at(offset, out.len())?;
        // SAFETY: as in `write`; `out` may alias nothing here (it is a `&mut`), but a slice of
        // this window handed out earlier could, so the overlap-safe copy is used.
        unsafe { crate::copy::copy_any(out.as_mut_ptr(), src, out.len()) };
        Ok(())
    }

    /// The 64-bit word at `offset`, checked (in range, 8-byte aligned).
    pub(crate) fn word(&self, offset: usize) -> Result<&AtomicU64> {
        if offset % 8 != 0 {
            return Err(Error::InvalidArgument(format!(
                "word offset {offset} is not 8-byte aligned"
            )));
        }
        let p = self.ptr_at(offset, 8)?;
        // SAFETY: in range and aligned (the base is word aligned, `new`); the word is only
        // ever accessed atomically by the protocol that owns it, and lives while `self` does.
        Ok(unsafe { AtomicU64::from_ptr(p as *mut u64) })
    }

    /// Stores `value` into the word at `offset` with Release: everything this thread wrote
    /// before (ordinary stores, and streaming ones once fenced) is visible to a thread that
    /// observes the value.
    ///
    /// SYNC POINT: partner of the Acquire load in [`MappedMem::observe`].
    pub fn publish(&self, offset: usize, value: u64) -> Result<()> {
        self.word(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Loads the word at `offset` with Acquire: once it shows a published value, every write
    /// the publisher made before publishing it is visible here.
    ///
    /// SYNC POINT: partner of the Release store in [`MappedMem::publish`].
    pub fn observe(&self, offset: usize) -> Result<u64> {
        Ok(self.word(offset)?.load(Ordering::Acquire))
    }

    /// A bounds-checked view of `len` bytes at `offset`, without copying.
    ///
    /// # Safety
    /// No one may write `offset..offset+len` while the slice lives: it was announced (a signal
    /// the caller waited for) and, by the caller's protocol, is not rewritten before the
    /// caller lets the writer know it may be.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> Result<&[u8]> {
        let p = self.ptr_at(offset, len)?;
        // SAFETY: range checked, memory alive while `self` is; no concurrent writer (caller).
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// A bounds-checked mutable view of `len` bytes at `offset`.
    ///
    /// # Safety
    /// As [`MappedMem::slice`], and no other reference to the range may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: usize, len: usize) -> Result<&mut [u8]> {
        let p = self.ptr_at(offset, len)?;
        // SAFETY: range checked; exclusivity is the caller's promise.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of `words` fresh words, with the memory it keeps alive.
    fn mem(words: usize) -> MappedMem {
        let v: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
        let base = v.as_ptr() as *mut u8;
        // SAFETY: `words * 8` bytes, word aligned, alive while the view holds the Arc; the
        // test touches them only through the view.
        unsafe { MappedMem::new(base, words * 8, v) }
    }

    #[test]
    fn accessors_check_range_and_alignment() {
        let m = mem(4);
        m.write(8, &[1, 2, 3]).unwrap();
        let mut out = [0u8; 3];
        m.read(8, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3]);
        assert!(m.write(30, &[0; 3]).is_err());
        assert!(m.read(usize::MAX, &mut out).is_err());
        m.publish(24, 7).unwrap();
        assert_eq!(m.observe(24).unwrap(), 7);
        assert!(m.publish(4, 1).is_err(), "unaligned word");
        assert!(m.observe(32).is_err(), "word past the end");
        m.write_streaming(0, &[9; 32]).unwrap();
        crate::copy::store_fence();
        // SAFETY: no writer meanwhile.
        assert_eq!(unsafe { m.slice(0, 32) }.unwrap(), &[9; 32]);
    }
}
