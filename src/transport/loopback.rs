//! The loopback backend: ranks are threads of one process sharing plain memory. It is the
//! reference every other backend is compared with, so it favours obviousness over speed.

use super::{
    check_peer, check_range, check_signal, Caps, Cmp, MappedMem, PathKind, SignalOp, Transport,
    Window, WindowTable,
};
use crate::error::{Error, Result};
use crossbeam_utils::CachePadded;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Default number of signal words per rank.
pub const DEFAULT_SIGNALS: usize = 4096;
const PAGE: usize = 4096;

/// Page-aligned zeroed memory for one rank's copy of one window.
struct Buf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory accessed through raw copies by the ranks' threads under
// the transport's visibility rules; the pointer is owned and freed once, in Drop.
unsafe impl Send for Buf {}
// SAFETY: as above.
unsafe impl Sync for Buf {}

impl Buf {
    fn new(len: usize) -> Result<Buf> {
        let layout = Layout::from_size_align(len.max(1), PAGE)
            .map_err(|_| Error::InvalidArgument(format!("window of {len} bytes is too large")))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::system(
                format!("allocating a {len}-byte loopback window"),
                std::io::Error::from(std::io::ErrorKind::OutOfMemory),
            ));
        }
        Ok(Buf { ptr, layout })
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed only here.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// One pending collective registration, keyed by registration number.
#[derive(Default)]
struct Registration {
    lens: Vec<Option<usize>>,
    bufs: Vec<Option<Arc<Buf>>>,
    joined: usize,
    taken: usize,
}

struct RankState {
    signals: Box<[CachePadded<AtomicU64>]>,
    waiters: AtomicUsize,
    park: Mutex<u64>,
    wake: Condvar,
}

struct Fabric {
    world: usize,
    num_signals: usize,
    ranks: Vec<RankState>,
    aborted: AtomicBool,
    regs: Mutex<HashMap<u64, Registration>>,
    regs_cv: Condvar,
    setup_timeout: Duration,
    /// Ranks that have begun `close`; `close_cv` tells of every change.
    closed: Mutex<usize>,
    close_cv: Condvar,
    /// Fabrics of groups split from this one, by group id: the group's first member makes
    /// it, every member takes its own rank out.
    groups: Mutex<HashMap<[u64; 2], Vec<Option<Loopback>>>>,
}

impl Fabric {
    fn wake(&self, rank: usize) {
        let r = &self.ranks[rank];
        // SeqCst: pairs with the waiter's SeqCst `waiters` increment in `wait`, so either the
        // waiter sees our update or we see the waiter and notify under the lock.
        if r.waiters.load(Ordering::SeqCst) != 0 {
            let mut g = r.park.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            r.wake.notify_all();
        }
    }
}

/// One rank of a loopback fabric. Create all ranks at once with [`Loopback::create`] and
/// move each to its own thread.
pub struct Loopback {
    fabric: Arc<Fabric>,
    rank: usize,
    next_reg: AtomicU64,
    windows: WindowTable<Arc<[Arc<Buf>]>>,
    closing: AtomicBool,
}

impl Loopback {
    /// Creates `world` connected ranks with the default number of signals.
    pub fn create(world: usize) -> Result<Vec<Loopback>> {
        Self::create_with(world, DEFAULT_SIGNALS, Duration::from_secs(60))
    }

    /// Creates `world` ranks with `num_signals` signal words each; collective calls
    /// (`register`) give up after `setup_timeout`.
    pub fn create_with(
        world: usize,
        num_signals: usize,
        setup_timeout: Duration,
    ) -> Result<Vec<Loopback>> {
        if world == 0 {
            return Err(Error::InvalidArgument("world size 0".into()));
        }
        let ranks = (0..world)
            .map(|_| RankState {
                signals: (0..num_signals)
                    .map(|_| CachePadded::new(AtomicU64::new(0)))
                    .collect(),
                waiters: AtomicUsize::new(0),
                park: Mutex::new(0),
                wake: Condvar::new(),
            })
            .collect();
        let fabric = Arc::new(Fabric {
            world,
            num_signals,
            ranks,
            aborted: AtomicBool::new(false),
            regs: Mutex::new(HashMap::new()),
            regs_cv: Condvar::new(),
            setup_timeout,
            closed: Mutex::new(0),
            close_cv: Condvar::new(),
            groups: Mutex::new(HashMap::new()),
        });
        Ok((0..world)
            .map(|rank| Loopback {
                fabric: fabric.clone(),
                rank,
                next_reg: AtomicU64::new(1),
                windows: WindowTable::new(),
                closing: AtomicBool::new(false),
            })
            .collect())
    }

    fn bufs(&self, win: &Window) -> Result<Arc<[Arc<Buf>]>> {
        self.windows.get(win)
    }

    fn check_live(&self) -> Result<()> {
        if self.fabric.aborted.load(Ordering::SeqCst) {
            Err(Error::Aborted)
        } else if self.closing.load(Ordering::SeqCst) {
            Err(Error::InvalidUsage(format!(
                "loopback rank {} is closed",
                self.rank
            )))
        } else {
            Ok(())
        }
    }

    /// The peer's buffer (kept alive while the caller holds it) and the checked address.
    fn remote(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        len: usize,
    ) -> Result<(Arc<Buf>, *mut u8)> {
        check_peer(peer, self.fabric.world)?;
        check_range(win.len(), offset, len)?;
        let buf = self.bufs(win)?[peer].clone();
        self.check_live()?;
        // SAFETY: the range was checked against the window length, which every rank's buffer
        // has; the returned Arc keeps the buffer alive while the caller uses the address.
        let at = unsafe { buf.ptr.add(offset) };
        Ok((buf, at))
    }
}

impl Transport for Loopback {
    fn split(
        &self,
        group: &super::GroupSpec,
        exchange: &mut super::GroupExchange<'_>,
    ) -> Result<Box<dyn Transport>> {
        self.check_live()?;
        let groups = || self.fabric.groups.lock().unwrap_or_else(|p| p.into_inner());
        if group.rank == 0 {
            let ranks = Loopback::create_with(
                group.members.len(),
                self.fabric.num_signals,
                self.fabric.setup_timeout,
            )?;
            groups().insert(group.id, ranks.into_iter().map(Some).collect());
        }
        // Every member waits here until the first one has made the fabric.
        exchange([0, 0])?;
        let mut map = groups();
        let mine = map
            .get_mut(&group.id)
            .and_then(|ranks| ranks.get_mut(group.rank))
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::InvalidUsage("loopback split: no fabric for this group".into())
            })?;
        if map[&group.id].iter().all(Option::is_none) {
            map.remove(&group.id);
        }
        Ok(Box::new(mine))
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.fabric.world
    }

    fn caps(&self) -> Caps {
        Caps {
            backend: "loopback",
            num_signals: self.fabric.num_signals,
            max_window_len: isize::MAX as usize - PAGE,
        }
    }

    fn register(&self, len: usize) -> Result<Window> {
        self.check_live()?;
        let id = self.next_reg.fetch_add(1, Ordering::Relaxed);
        let buf = Arc::new(Buf::new(len)?);
        let f = &*self.fabric;
        let deadline = Instant::now() + f.setup_timeout;
        let mut regs = f.regs.lock().unwrap_or_else(|p| p.into_inner());
        {
            let r = regs.entry(id).or_default();
            if r.lens.is_empty() {
                r.lens = vec![None; f.world];
                r.bufs = vec![None; f.world];
            }
            r.lens[self.rank] = Some(len);
            r.bufs[self.rank] = Some(buf);
            r.joined += 1;
        }
        f.regs_cv.notify_all();
        loop {
            if regs[&id].joined == f.world {
                break;
            }
            if f.aborted.load(Ordering::SeqCst) {
                return Err(Error::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: format!("register #{id}"),
                    waited: f.setup_timeout,
                });
            }
            let slice = (deadline - now).min(Duration::from_millis(50));
            regs = f
                .regs_cv
                .wait_timeout(regs, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let r = regs.get_mut(&id).expect("present");
        let lens: Vec<usize> = r.lens.iter().map(|l| l.expect("joined")).collect();
        let bufs: Arc<[Arc<Buf>]> = r.bufs.iter().map(|b| b.clone().expect("joined")).collect();
        r.taken += 1;
        if r.taken == f.world {
            regs.remove(&id);
        }
        drop(regs);
        if lens.iter().any(|&l| l != len) {
            return Err(Error::ConfigMismatch(format!(
                "register #{id}: ranks asked for window sizes {lens:?}"
            )));
        }
        Ok(self.windows.insert(id, len, bufs))
    }

    fn deregister(&self, win: Window) -> Result<()> {
        self.windows.remove(win).map(|_| ())
    }

    fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
        let (_keep, dst) = self.remote(peer, win, offset, data.len())?;
        // SAFETY: `dst` is valid for `data.len()` bytes (checked in `remote`); `data` is a
        // caller slice, possibly of window memory, so the overlap-safe copy is used.
        unsafe { crate::copy::copy_any(dst, data.as_ptr(), data.len()) };
        Ok(())
    }

    fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
        let (_keep, src) = self.remote(peer, win, offset, out.len())?;
        // SAFETY: as in `put`, with the direction reversed.
        unsafe { crate::copy::copy_any(out.as_mut_ptr(), src, out.len()) };
        Ok(())
    }

    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        check_peer(peer, self.fabric.world)?;
        check_signal(index, self.fabric.num_signals)?;
        self.check_live()?;
        let w = &self.fabric.ranks[peer].signals[index];
        // SeqCst (includes Release): publishes earlier puts; partner of the Acquire/SeqCst
        // loads in `wait`.
        match op {
            SignalOp::Set => w.store(value, Ordering::SeqCst),
            SignalOp::Add => {
                w.fetch_add(value, Ordering::SeqCst);
            }
        }
        self.fabric.wake(peer);
        Ok(())
    }

    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64> {
        check_signal(index, self.fabric.num_signals)?;
        let me = &self.fabric.ranks[self.rank];
        let w = &me.signals[index];
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            self.check_live()?;
            // Acquire: partner of the SeqCst store/RMW in `signal`.
            let v = w.load(Ordering::Acquire);
            if cmp.holds(v, value) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    op: format!("wait on signal {index}"),
                    waited: start.elapsed(),
                });
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
                continue;
            }
            // Park: announce ourselves, then re-check under the lock the waker takes.
            me.waiters.fetch_add(1, Ordering::SeqCst);
            let g = me.park.lock().unwrap_or_else(|p| p.into_inner());
            let v = w.load(Ordering::SeqCst);
            if !cmp.holds(v, value) && !self.fabric.aborted.load(Ordering::SeqCst) {
                let slice = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(20));
                let _ = me.wake.wait_timeout(g, slice);
            } else {
                drop(g);
            }
            me.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn signal_value(&self, index: usize) -> Result<u64> {
        check_signal(index, self.fabric.num_signals)?;
        Ok(self.fabric.ranks[self.rank].signals[index].load(Ordering::Acquire))
    }

    fn flush(&self, peer: usize) -> Result<()> {
        check_peer(peer, self.fabric.world)?;
        self.check_live()?;
        // Puts are synchronous copies; a fence orders them before anything that follows.
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    fn abort(&self) {
        self.fabric.aborted.store(true, Ordering::SeqCst);
        for r in 0..self.fabric.world {
            self.fabric.wake(r);
        }
        self.fabric.regs_cv.notify_all();
        let _g = self.fabric.closed.lock().unwrap_or_else(|p| p.into_inner());
        self.fabric.close_cv.notify_all();
    }

    fn close(&self, deadline: Instant) -> Result<()> {
        let f = &*self.fabric;
        let start = Instant::now();
        let mut closed = f.closed.lock().unwrap_or_else(|p| p.into_inner());
        if !self.closing.swap(true, Ordering::SeqCst) {
            *closed += 1;
            f.close_cv.notify_all();
        }
        while *closed < f.world {
            if f.aborted.load(Ordering::SeqCst) {
                return Err(Error::Aborted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    op: format!("closing: {} of {} ranks have closed", *closed, f.world),
                    waited: start.elapsed(),
                });
            }
            closed = f
                .close_cv
                .wait_timeout(closed, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    fn path_kind(&self, peer: usize) -> Result<PathKind> {
        check_peer(peer, self.fabric.world)?;
        Ok(PathKind::Mapped)
    }

    fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
        check_peer(peer, self.fabric.world)?;
        let buf = self.bufs(win)?[peer].clone();
        // SAFETY: the buffer is `win.len()` bytes (at least), page aligned, and lives while
        // `buf` does.
        Ok(Some(unsafe { MappedMem::new(buf.ptr, win.len(), buf) }))
    }

    fn local_mem(&self, win: &Window) -> Result<MappedMem> {
        Ok(self
            .map_peer(self.rank, win)?
            .expect("loopback maps every rank"))
    }
}
