//! Window handles and the overflow-safe argument checks every backend shares.

use crate::error::{Error, Result};
use crate::id_map::IdMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// A registered window: the same size on every rank, addressed by (rank, offset).
///
/// A handle belongs to the transport that registered it; using it with another transport is
/// [`Error::InvalidUsage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    owner: u64,
    id: u64,
    len: usize,
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

impl Window {
    /// For backends: a fresh owner tag to stamp on the windows one transport registers.
    pub fn new_owner_tag() -> u64 {
        NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
    }

    /// For backends: the handle of window `id` (registration number) of `len` bytes.
    pub fn new(owner: u64, id: u64, len: usize) -> Window {
        Window { owner, id, len }
    }

    /// Size in bytes (the same on every rank).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Registration number, the same on every rank.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// For backends: checks the handle belongs to the transport with `owner` tag.
    pub fn check_owner(&self, owner: u64) -> Result<()> {
        if self.owner == owner {
            Ok(())
        } else {
            Err(Error::InvalidUsage(format!(
                "window #{} was registered by another transport",
                self.id
            )))
        }
    }
}

/// For backends: the windows one transport has registered, by registration number, with the
/// per-window state `V` the backend needs (its memory, its peers' mappings).
pub struct WindowTable<V> {
    owner: u64,
    map: RwLock<IdMap<V>>,
}

impl<V: Clone> Default for WindowTable<V> {
    fn default() -> Self {
        WindowTable {
            owner: Window::new_owner_tag(),
            map: RwLock::new(IdMap::default()),
        }
    }
}

impl<V: Clone> WindowTable<V> {
    /// An empty table with a fresh owner tag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records window `id` of `len` bytes and returns its handle.
    pub fn insert(&self, id: u64, len: usize, state: V) -> Window {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, state);
        Window::new(self.owner, id, len)
    }

    /// The state of a live window of this table.
    pub fn get(&self, win: &Window) -> Result<V> {
        win.check_owner(self.owner)?;
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&win.id())
            .cloned()
            .ok_or_else(|| Error::InvalidUsage(format!("window #{} is deregistered", win.id())))
    }

    /// Forgets a window, returning its state.
    pub fn remove(&self, win: Window) -> Result<V> {
        win.check_owner(self.owner)?;
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&win.id())
            .ok_or_else(|| Error::InvalidUsage(format!("window #{} is not registered", win.id())))
    }
}

/// Checks `offset..offset+len` lies inside a window of `win_len` bytes, without overflow.
pub fn check_range(win_len: usize, offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= win_len => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "range offset {offset} + length {len} exceeds window of {win_len} bytes"
        ))),
    }
}

/// Checks that `parts` laid end to end from `offset` fit a window of `win_len` bytes (their
/// total computed without overflow).
pub fn check_range_parts(win_len: usize, offset: usize, parts: &[&[u8]]) -> Result<()> {
    let total = parts
        .iter()
        .try_fold(0usize, |total, p| total.checked_add(p.len()))
        .ok_or_else(|| {
            Error::InvalidArgument("vectored put longer than the address space".into())
        })?;
    check_range(win_len, offset, total)
}

/// Checks `peer < world`.
pub fn check_peer(peer: usize, world: usize) -> Result<()> {
    if peer < world {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "peer rank {peer} >= world size {world}"
        )))
    }
}

/// Checks `index < count`.
pub fn check_signal(index: usize, count: usize) -> Result<()> {
    if index < count {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "signal index {index} >= {count} signals"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_are_overflow_safe() {
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(10, 10, 0).is_ok());
        assert!(check_range(10, 9, 2).is_err());
        assert!(check_range(10, usize::MAX, 1).is_err());
        assert!(check_range(0, 0, 0).is_ok());
        assert!(check_range(0, 1, 0).is_err());
    }
}
