//! `memfd` shared segments: creation with reserved space, sealing, header checks, mapping.

use crate::error::{Error, Result};
use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{
    fallocate, fcntl_add_seals, fcntl_get_seals, memfd_create, FallocateFlags, MemfdFlags,
    SealFlags,
};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes before the data area: one page, so data is page-aligned in every mapping.
pub const HEADER_LEN: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"XCCLSEG1");
const VERSION: u32 = 1;
/// Mappings up to this size are pre-faulted (`MAP_POPULATE`) so the first put does not pay
/// page faults; larger ones fault lazily to keep setup time bounded.
const POPULATE_LIMIT: usize = 1 << 30;

/// Life state of the process that created a segment, kept in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum SegmentState {
    /// Creator is alive and using it.
    Active = 0,
    /// Creator closed it in an orderly way.
    Closed = 1,
}

/// The segment header as laid out in the first page. Fields are atomics because other
/// processes read them concurrently.
#[repr(C)]
struct Header {
    /// Written last with Release (partner: the Acquire load in [`Segment::open`]).
    magic: AtomicU64,
    version: AtomicU32,
    header_len: AtomicU32,
    data_len: AtomicU64,
    state: AtomicU64,
    /// Free word for the user: `xccl` keeps its abort flag here.
    user: AtomicU64,
}

/// A shared-memory segment: header page plus `data_len` bytes, mapped read-write.
///
/// Created with [`Segment::create`] in one process and opened from its descriptor with
/// [`Segment::open`] in others (the descriptor travels over a [`crate::Mesh`]).
pub struct Segment {
    /// Kept only by the creator, who passes it on; an opened segment needs just its mapping.
    file: Option<File>,
    map: MmapRaw,
    data_len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through raw pointers or atomics
// whose rules the users of `data_ptr` uphold. Moving or sharing the handle between threads is
// no different from sharing it between processes.
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` only exposes atomics and raw pointers.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a segment of `data_len` data bytes (0 allowed). The space is reserved now: a
    /// full memory file system fails here with an error naming the size, not later with SIGBUS.
    pub fn create(name: &str, data_len: usize) -> Result<Segment> {
        let total = HEADER_LEN
            .checked_add(data_len)
            .ok_or_else(|| Error::Invalid(format!("segment size {data_len} overflows")))?;
        check_available(name, total)?;
        if name.contains('\0') {
            return Err(Error::Invalid(format!(
                "segment name {name:?} contains NUL"
            )));
        }
        let file = File::from(
            memfd_create(
                format!("xccl-{name}"),
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )
            .map_err(|e| Error::io(format!("memfd_create(memfd:xccl-{name})"), e.into()))?,
        );
        if let Err(err) = fallocate(&file, FallocateFlags::empty(), 0, total as u64) {
            return Err(Error::io(
                format!(
                    "cannot reserve {total} bytes ({:.1} MiB) of shared memory for memfd:xccl-{name} \
                     (is the memory or the memory cgroup full?)",
                    total as f64 / (1 << 20) as f64
                ),
                err.into(),
            ));
        }
        fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| Error::io(format!("sealing memfd:xccl-{name}"), e.into()))?;
        let map = map_file(&file, total)?;
        let seg = Segment {
            file: Some(file),
            map,
            data_len,
        };
        let h = seg.header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.header_len.store(HEADER_LEN as u32, Ordering::Relaxed);
        h.data_len.store(data_len as u64, Ordering::Relaxed);
        h.state
            .store(SegmentState::Active as u64, Ordering::Relaxed);
        // Release: publishes the fields above (partner: Acquire load of `magic` in `open`).
        h.magic.store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Maps a segment received from another process, checking everything before use: the
    /// descriptor is a sealed memfd of exactly the expected size, and the header's magic,
    /// version and sizes match.
    pub fn open(fd: BorrowedFd<'_>, expected_data_len: usize) -> Result<Segment> {
        let total = HEADER_LEN
            .checked_add(expected_data_len)
            .ok_or_else(|| Error::Invalid(format!("segment size {expected_data_len} overflows")))?;
        let file = File::from(
            fd.try_clone_to_owned()
                .map_err(|e| Error::io("duplicating a segment descriptor", e))?,
        );
        // Both seals: a segment the sender could still shrink would turn our next access past
        // its new end into SIGBUS.
        let needed = SealFlags::SHRINK | SealFlags::GROW;
        match fcntl_get_seals(&file) {
            Ok(seals) if seals.contains(needed) => {}
            seals => {
                return Err(Error::Protocol(format!(
                    "received segment is not a memfd sealed against shrinking and growing \
                     (seals {seals:?})"
                )))
            }
        }
        let actual = file
            .metadata()
            .map_err(|e| Error::io("fstat on a received segment", e))?
            .len();
        if actual != total as u64 {
            return Err(Error::Protocol(format!(
                "received segment has {actual} bytes, expected {total}"
            )));
        }
        let map = map_file(&file, total)?;
        let seg = Segment {
            file: None,
            map,
            data_len: expected_data_len,
        };
        let h = seg.header();
        // Acquire: partner of the Release store of `magic` in `create`.
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(Error::Protocol(format!("bad segment magic {magic:#x}")));
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(Error::Protocol(format!(
                "segment version {version}, this library speaks {VERSION}"
            )));
        }
        let hl = h.header_len.load(Ordering::Relaxed) as usize;
        let dl = h.data_len.load(Ordering::Relaxed);
        if hl != HEADER_LEN || dl != expected_data_len as u64 {
            return Err(Error::Protocol(format!(
                "segment header says header {hl} / data {dl} bytes, expected {HEADER_LEN} / {expected_data_len}"
            )));
        }
        Ok(seg)
    }

    /// The descriptor, to pass to peers: `None` for a segment opened from another process
    /// (its descriptor is closed once mapped, so many windows do not use up descriptors).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }

    /// Number of data bytes.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// Start of the data area (page-aligned). Valid for `data_len()` bytes while `self` lives;
    /// other processes may write it concurrently, so access it with raw copies or atomics only.
    pub fn data_ptr(&self) -> *mut u8 {
        // SAFETY: the mapping is HEADER_LEN + data_len bytes long, so the offset stays inside.
        unsafe { self.map.as_mut_ptr().add(HEADER_LEN) }
    }

    /// The creator's life state as recorded in the header.
    pub fn state(&self) -> SegmentState {
        // Acquire: partner of the Release store in `set_state` (possibly in another process).
        match self.header().state.load(Ordering::Acquire) {
            0 => SegmentState::Active,
            _ => SegmentState::Closed,
        }
    }

    /// Records the creator's life state (call on orderly close, before the process exits).
    pub fn set_state(&self, s: SegmentState) {
        // Release: partner of the Acquire load in `state`.
        self.header().state.store(s as u64, Ordering::Release);
    }

    /// A free 64-bit word in the header, shared by every process mapping the segment.
    pub fn user_word(&self) -> &AtomicU64 {
        &self.header().user
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts page-aligned and is at least HEADER_LEN bytes, enough for
        // `Header`; all its fields are atomics, so shared concurrent access is sound.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }
}

/// Refuses a segment larger than the memory this process may still take (the machine's and
/// its memory cgroups' limits): reserving it would only summon the OOM killer instead of
/// failing with a clear message.
fn check_available(name: &str, total: usize) -> Result<()> {
    match crate::headroom::available() {
        Some((bytes, why)) if total as u64 > bytes => Err(Error::io(
            format!(
                "cannot reserve {total} bytes ({:.1} MiB) of shared memory for memfd:xccl-{name}: \
                 only {:.1} MiB {why}",
                total as f64 / (1 << 20) as f64,
                bytes as f64 / (1 << 20) as f64
            ),
            rustix::io::Errno::NOMEM.into(),
        )),
        _ => Ok(()),
    }
}

fn map_file(file: &File, total: usize) -> Result<MmapRaw> {
    let mut opts = MmapOptions::new();
    opts.len(total);
    if total <= POPULATE_LIMIT {
        opts.populate();
    }
    opts.map_raw(file)
        .map_err(|e| Error::io(format!("mapping a {total}-byte segment"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_checks_size_and_sees_writes() {
        let a = Segment::create("t", 10).unwrap();
        assert!(Segment::open(a.fd().unwrap(), 11).is_err());
        let b = Segment::open(a.fd().unwrap(), 10).unwrap();
        // SAFETY: both mappings are 10 data bytes long and no other thread touches them.
        unsafe {
            a.data_ptr().write(7);
            assert_eq!(b.data_ptr().read(), 7);
        }
        assert_eq!(b.state(), SegmentState::Active);
        a.set_state(SegmentState::Closed);
        assert_eq!(b.state(), SegmentState::Closed);
    }

    #[test]
    fn oversized_segment_fails_clearly_at_creation() {
        let err = Segment::create("huge", 1 << 50)
            .err()
            .expect("1 PiB cannot be reserved");
        let msg = err.to_string();
        assert!(
            msg.contains("cannot reserve") && msg.contains("memfd:xccl-huge"),
            "{msg}"
        );
    }

    /// A peer's memfd sealed against growing only (it could still shrink it under us and kill
    /// this process with SIGBUS) is refused.
    #[test]
    fn open_rejects_a_memfd_that_can_still_shrink() {
        for seals in [SealFlags::GROW, SealFlags::SHRINK, SealFlags::empty()] {
            let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
            let file = File::from(memfd_create("xccl-test-seal", flags).unwrap());
            file.set_len((HEADER_LEN + 4096) as u64).unwrap();
            // A valid header, so that the seals are all that is wrong with it.
            let genuine = Segment::create("test-seal-header", 4096).unwrap();
            // SAFETY: the mapping is at least HEADER_LEN bytes long and lives while read.
            let header = unsafe { std::slice::from_raw_parts(genuine.map.as_ptr(), HEADER_LEN) };
            std::os::unix::fs::FileExt::write_all_at(&file, header, 0).unwrap();
            let ok = Segment::open(genuine.fd().unwrap(), 4096);
            assert!(ok.is_ok(), "the genuine segment opens");
            if !seals.is_empty() {
                fcntl_add_seals(&file, seals).unwrap();
            }
            let err = Segment::open(file.as_fd(), 4096).err().expect("refused");
            assert!(matches!(err, Error::Protocol(_)), "seals {seals:?}: {err}");
        }
    }

    #[test]
    fn open_rejects_unsealed_file() {
        let f = File::open("/proc/self/exe").unwrap();
        let err = Segment::open(f.as_fd(), 0).err().unwrap();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
    }
}
