//! Registered memory regions: page-aligned, zeroed, addressed by offset; allocated here or
//! borrowed from memory another owner keeps mapped (a shared-memory segment).

use crate::error::{Error, Result};
use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Who frees a region's memory.
enum Backing {
    /// Allocated by [`Region::new`] with this layout.
    Owned(Layout),
    /// Borrowed by [`Region::borrowed`]: the value keeps the memory valid until dropped.
    Borrowed(#[allow(dead_code)] Box<dyn Send + Sync>),
}

/// A registered region of local memory that peers write into and read from.
pub struct Region {
    ptr: *mut u8,
    len: usize,
    backing: Backing,
}

// SAFETY: the region is plain memory accessed through raw copies by the progress threads and
// the owner under the protocol's visibility rules (data is defined after its signal).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Allocates `len` zeroed, page-aligned bytes.
    pub fn new(len: usize) -> Result<Region> {
        let layout = Layout::from_size_align(len.max(1), 4096)
            .map_err(|_| Error::Invalid(format!("region of {len} bytes is too large")))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::io(
                format!("allocating a {len}-byte region"),
                std::io::ErrorKind::OutOfMemory.into(),
            ));
        }
        Ok(Region {
            ptr,
            len,
            backing: Backing::Owned(layout),
        })
    }

    /// A region over memory someone else owns: `len` bytes at `ptr`, kept valid by `keep`
    /// until the region drops (a mapping other processes share, so that bytes written over
    /// the network land where local peers read them).
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes while `keep` lives, and be touched
    /// by others only under the protocol's rules (data is defined after its signal).
    pub unsafe fn borrowed(ptr: *mut u8, len: usize, keep: Box<dyn Send + Sync>) -> Region {
        Region {
            ptr,
            len,
            backing: Backing::Borrowed(keep),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start of the memory.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Checks `offset..offset+len` lies inside, overflow-safe.
    pub fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(()),
            _ => Err(Error::Protocol(format!(
                "range offset {offset} + length {len} exceeds region of {} bytes",
                self.len
            ))),
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let Backing::Owned(layout) = self.backing {
            // SAFETY: allocated in `new` with this layout; freed once.
            unsafe { dealloc(self.ptr, layout) }
        }
    }
}
