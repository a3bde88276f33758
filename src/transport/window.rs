//! Window handles, the table that checks them against their registration, and the
//! overflow-safe argument checks every backend shares.

use crate::error::{Error, Result};
use crate::id_map::IdMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// A registered window: the same size on every rank, addressed by (rank, offset).
///
/// A handle belongs to the transport that registered it; using it with another transport, or
/// after it was deregistered, is [`Error::InvalidUsage`]. Handles are made only by
/// registration ([`WindowTable::insert`]), and every use is checked against the registration.
///
/// ```compile_fail
/// // No handle can be made by hand (it could claim any length).
/// let forged = xccl::transport::Window::new(1, 1, 1 << 40);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    owner: u64,
    id: u64,
    len: usize,
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

impl Window {
    /// A fresh owner tag to stamp on the windows one transport registers.
    fn new_owner_tag() -> u64 {
        NEXT_OWNER.fetch_add(1, Ordering::Relaxed)
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

/// For backends: the windows one transport has registered, by registration number, with their
/// length and the per-window state `V` the backend needs (its memory, its peers' mappings).
pub struct WindowTable<V> {
    owner: u64,
    map: RwLock<IdMap<(usize, V)>>,
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
            .insert(id, (len, state));
        Window {
            owner: self.owner,
            id,
            len,
        }
    }

    /// The state of a live window of this table, once the handle is checked against the
    /// registration (owner, number and length): a handle that does not match is refused.
    pub fn get(&self, win: &Window) -> Result<V> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        self.checked(&map, win).cloned()
    }

    /// Forgets a window, returning its state (operations already holding the state keep the
    /// memory alive until they finish).
    pub fn remove(&self, win: Window) -> Result<V> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.checked(&map, &win)?;
        Ok(map.remove(&win.id()).expect("checked above").1)
    }

    /// `win`'s state in `map`, if the handle matches its registration.
    fn checked<'m>(&self, map: &'m IdMap<(usize, V)>, win: &Window) -> Result<&'m V> {
        win.check_owner(self.owner)?;
        match map.get(&win.id()) {
            Some((len, state)) if *len == win.len() => Ok(state),
            Some((len, _)) => Err(Error::InvalidUsage(format!(
                "window #{} handle says {} bytes, its registration {len}",
                win.id(),
                win.len()
            ))),
            None => Err(Error::InvalidUsage(format!(
                "window #{} is not registered",
                win.id()
            ))),
        }
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
        // A job of one rank addressing another is most often a program started on its own.
        let hint = match world {
            1 => {
                ": this job has one rank (a program started without a launcher runs alone); \
                 start N ranks with `xccl-run --np N -- PROGRAM`, or under mpirun, srun or \
                 torchrun"
            }
            _ => "",
        };
        Err(Error::InvalidArgument(format!(
            "peer rank {peer} >= world size {world}{hint}"
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

    /// A handle whose length differs from its registration (rebuilt by hand, 2^40 bytes) is
    /// refused instead of opening the memory past the window's end.
    #[test]
    fn handles_are_checked_against_their_registration() {
        let table = WindowTable::new();
        let win = table.insert(1, 4096, 7u32);
        assert_eq!(table.get(&win).unwrap(), 7);
        let forged = Window {
            len: 1 << 40,
            ..win
        };
        assert!(matches!(table.get(&forged), Err(Error::InvalidUsage(_))));
        assert!(matches!(table.remove(forged), Err(Error::InvalidUsage(_))));
        let other = WindowTable::<u32>::new();
        assert!(matches!(other.get(&win), Err(Error::InvalidUsage(_))));
        assert_eq!(table.remove(win).unwrap(), 7);
        assert!(matches!(table.get(&win), Err(Error::InvalidUsage(_))));
    }

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
