//! Adapter of the `xccl-shm` crate to the transport contract: processes on one host map each
//! other's `memfd` windows; a put is one `memcpy` into the peer's mapping, a signal an atomic
//! on the peer's signal page with a shared-futex wake.

use super::{
    check_peer, check_range, check_signal, Caps, Cmp, MappedMem, PathKind, SignalOp, Transport,
    Window, WindowTable,
};
use crate::error::{Error, Result};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xccl_shm::{Mesh, Segment, SegmentState, SignalArray, WaitOutcome, WaitPolicy};

/// Default number of signal words per rank.
pub const DEFAULT_SIGNALS: usize = 4096;
/// Every rank's mapping of one window (index = rank).
type Segments = Arc<Vec<Segment>>;

/// Registration number of the signal segment; windows count up from 1.
const SIGNAL_TAG: u64 = 0;

/// How to build a shared-memory transport.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// Job id shared by all ranks (letters, digits, `-`, `_`); distinct jobs never meet.
    pub job_id: String,
    /// This rank.
    pub rank: usize,
    /// Number of ranks (all on this host).
    pub world: usize,
    /// Signal words per rank.
    pub num_signals: usize,
    /// Deadline for collective setup calls (connecting, `register`).
    pub setup_timeout: Duration,
    /// How waits spend time; defaults from the number of ranks and cores.
    pub wait_policy: Option<WaitPolicy>,
    /// Busy threads besides the ranks that the default wait policy counts against the cores
    /// (a TCP node's progress beside a hybrid rank): waits spin only when all have a core.
    pub other_load: usize,
}

impl ShmOptions {
    /// Options with defaults for `rank` of `world` in job `job_id`.
    pub fn new(job_id: impl Into<String>, rank: usize, world: usize) -> Self {
        ShmOptions {
            job_id: job_id.into(),
            rank,
            world,
            num_signals: DEFAULT_SIGNALS,
            setup_timeout: Duration::from_secs(60),
            wait_policy: None,
            other_load: 0,
        }
    }
}

/// Peer liveness as seen by this rank; updated by the mesh watcher thread.
struct Liveness {
    /// 0 when all peers live, else 1 + the first failed rank.
    first_failed: AtomicUsize,
    departed: Vec<AtomicBool>,
}

/// One rank of a shared-memory job.
pub struct ShmTransport {
    rank: usize,
    world: usize,
    num_signals: usize,
    setup_timeout: Duration,
    policy: WaitPolicy,
    /// Every rank's signal segment (index = rank), kept mapped for the transport's life.
    signal_segs: Vec<Arc<Segment>>,
    signals: Vec<SignalArray>,
    liveness: Arc<Liveness>,
    /// `close` began here: no new operation starts.
    closing: AtomicBool,
    next_reg: AtomicU64,
    windows: WindowTable<Segments>,
    /// Dropped last (declared last): after a completed `close`, peers see our state `Closed`
    /// before our links close; without it they see a rank that left, a failure.
    mesh: Mesh,
}

impl ShmTransport {
    /// Collective: connects to every local rank of the job. `barrier` must return once every
    /// rank has called this far (it runs once, after this rank's socket is bound); a store
    /// barrier does.
    pub fn new(opts: ShmOptions, barrier: &mut dyn FnMut() -> Result<()>) -> Result<Self> {
        let start = Instant::now();
        Self::connect(opts, barrier).map_err(|e| e.waited_since(start))
    }

    fn connect(opts: ShmOptions, barrier: &mut dyn FnMut() -> Result<()>) -> Result<Self> {
        if opts.num_signals == 0 {
            return Err(Error::InvalidArgument(
                "num_signals must be at least 1".into(),
            ));
        }
        let deadline = Instant::now() + opts.setup_timeout;
        let mut barrier_err = None;
        let mut mesh = Mesh::establish(&opts.job_id, opts.rank, opts.world, deadline, &mut || {
            barrier().map_err(|e| {
                let msg = e.to_string();
                barrier_err = Some(e);
                xccl_shm::Error::Timeout(msg)
            })
        })
        .map_err(|e| barrier_err.take().unwrap_or_else(|| e.into()))?;

        // One line past the caller's words counts the peers that have begun closing.
        let sig_bytes = SignalArray::bytes_for(opts.num_signals + 1);
        let own = Segment::create(&format!("sig-r{}", opts.rank), sig_bytes)?;
        let received = mesh.exchange(
            SIGNAL_TAG,
            own.fd().expect("created here"),
            sig_bytes as u64,
            deadline,
        )?;
        let mut own = Some(own);
        let mut signal_segs = Vec::with_capacity(opts.world);
        for (peer, entry) in received.into_iter().enumerate() {
            match entry {
                None => signal_segs.push(Arc::new(own.take().expect("own rank appears once"))),
                Some((fd, len)) => {
                    if len != sig_bytes as u64 {
                        return Err(Error::ConfigMismatch(format!(
                            "rank {peer} has {} signal words, rank {} has {}",
                            (len as usize / xccl_shm::SIGNAL_LINE).saturating_sub(1),
                            opts.rank,
                            opts.num_signals
                        )));
                    }
                    signal_segs.push(Arc::new(Segment::open(fd.as_fd(), sig_bytes)?));
                }
            }
        }
        let signals: Vec<SignalArray> = signal_segs
            .iter()
            // SAFETY: each data area is page-aligned, `bytes_for(num_signals + 1)` long (checked
            // by `Segment::open`), lives as long as `signal_segs` which outlives every use of
            // these views, and every process touches it only through the atomics of the lines.
            .map(|s| unsafe { SignalArray::from_raw(s.data_ptr(), opts.num_signals + 1) })
            .collect();

        let liveness = Arc::new(Liveness {
            first_failed: AtomicUsize::new(0),
            departed: (0..opts.world).map(|_| AtomicBool::new(false)).collect(),
        });
        let hook_live = liveness.clone();
        let hook_segs = signal_segs.clone();
        let own_signals = signals[opts.rank];
        let me = opts.rank;
        mesh.watch(Arc::new(move |peer| {
            if hook_segs[peer].state() == SegmentState::Closed {
                hook_live.departed[peer].store(true, Ordering::SeqCst);
                tracing::debug!(rank = me, peer, "shm peer closed its transport");
            } else {
                // SeqCst: ordered before the wakes below (partner: waiters' interruption check
                // after their SeqCst `waiters` increment in `SignalArray::wait_until`).
                let _ = hook_live.first_failed.compare_exchange(
                    0,
                    peer + 1,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                tracing::warn!(rank = me, peer, "shm peer died");
                own_signals.wake_every();
            }
        }))?;

        // CPUs of the machine, not of this process's affinity mask: a launcher that pins each
        // rank to its own CPU has not oversubscribed anything.
        // SAFETY: sysconf has no preconditions.
        let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        Ok(ShmTransport {
            rank: opts.rank,
            world: opts.world,
            num_signals: opts.num_signals,
            setup_timeout: opts.setup_timeout,
            policy: opts
                .wait_policy
                .unwrap_or_else(|| WaitPolicy::for_load(opts.world + opts.other_load, cores)),
            signal_segs,
            signals,
            liveness,
            closing: AtomicBool::new(false),
            next_reg: AtomicU64::new(1),
            windows: WindowTable::new(),
            mesh,
        })
    }

    /// Aborted here or by a peer (the flag lives in our own signal segment's header).
    fn aborted(&self) -> bool {
        // Acquire: partner of the SeqCst compare-exchange in `abort` (this or another process).
        self.signal_segs[self.rank]
            .user_word()
            .load(Ordering::Acquire)
            != 0
    }

    fn failed_peer(&self) -> Option<usize> {
        match self.liveness.first_failed.load(Ordering::SeqCst) {
            0 => None,
            r => Some(r - 1),
        }
    }

    /// Why every operation must stop, if it must (abort, a failed peer).
    pub(crate) fn interruption(&self) -> Option<Error> {
        if self.aborted() {
            return Some(Error::Aborted);
        }
        self.failed_peer().map(|rank| Error::PeerFailed { rank })
    }

    fn check_live(&self, peer: Option<usize>) -> Result<()> {
        if let Some(e) = self.interruption() {
            return Err(e);
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::InvalidUsage(format!(
                "shm rank {} is closed",
                self.rank
            )));
        }
        if let Some(p) = peer {
            // A peer finishes closing only after this rank began to: reaching one that did
            // means it is gone.
            if p != self.rank && self.liveness.departed[p].load(Ordering::Relaxed) {
                return Err(Error::PeerFailed { rank: p });
            }
        }
        Ok(())
    }

    fn segments(&self, win: &Window) -> Result<Segments> {
        self.windows.get(win)
    }

    /// `register`: every step all-or-none across the ranks.
    fn register_window(&self, len: usize) -> Result<Window> {
        self.check_live(None)?;
        let id = self.next_reg.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.setup_timeout;
        // Each step goes on only if it worked on every rank: a rank that cannot reserve or map
        // its part fails `register` everywhere, never leaving the others with a window it
        // does not have.
        let created = Segment::create(&format!("w{id}-r{}", self.rank), len).map_err(Error::from);
        let verdict = self.mesh.agree(id << 1, created.is_ok(), deadline)?;
        let own = all_or_none(id, "reserve its segment", created, &verdict)?;
        let received =
            self.mesh
                .exchange(id, own.fd().expect("created here"), len as u64, deadline)?;
        let lens: Vec<u64> = received
            .iter()
            .map(|e| e.as_ref().map_or(len as u64, |(_, l)| *l))
            .collect();
        if lens.iter().any(|&l| l != len as u64) {
            return Err(Error::ConfigMismatch(format!(
                "register #{id}: ranks asked for window sizes {lens:?}"
            )));
        }
        let mut own = Some(own);
        let opened: Result<Vec<Segment>> = received
            .into_iter()
            .map(|entry| match entry {
                None => Ok(own.take().expect("own rank appears once")),
                Some((fd, _)) => Ok(Segment::open(fd.as_fd(), len)?),
            })
            .collect();
        let verdict = self.mesh.agree(id << 1 | 1, opened.is_ok(), deadline)?;
        let segs = all_or_none(id, "map its peers' segments", opened, &verdict)?;
        Ok(self.windows.insert(id, len, Arc::new(segs)))
    }

    /// The window's mappings (kept mapped while the caller holds them) and the checked
    /// address in `peer`'s.
    fn remote(
        &self,
        peer: usize,
        win: &Window,
        offset: usize,
        len: usize,
    ) -> Result<(Segments, *mut u8)> {
        check_peer(peer, self.world)?;
        check_range(win.len(), offset, len)?;
        let segs = self.segments(win)?;
        self.check_live(Some(peer))?;
        // SAFETY: the range lies inside the data area (checked against the window length that
        // `Segment::open` verified); the returned Arc keeps the mapping alive while used.
        let at = unsafe { segs[peer].data_ptr().add(offset) };
        Ok((segs, at))
    }

    /// [`Transport::wait`] that also ends, with `also`'s error, once `also` returns one (a
    /// failure seen by another transport of the same rank).
    pub(crate) fn wait_or(
        &self,
        index: usize,
        cmp: Cmp,
        value: u64,
        deadline: Instant,
        also: &dyn Fn() -> Option<Error>,
    ) -> Result<u64> {
        check_signal(index, self.num_signals)?;
        self.check_live(None)?;
        if let Some(e) = also() {
            return Err(e);
        }
        let start = Instant::now();
        let out = self.signals[self.rank].wait_until(
            index,
            |v| cmp.holds(v, value),
            deadline,
            &self.policy,
            || self.check_live(None).err().or_else(also),
        );
        match out {
            WaitOutcome::Ready(v) => Ok(v),
            WaitOutcome::Interrupted(e) => Err(e),
            WaitOutcome::TimedOut(v) => Err(Error::Timeout {
                op: format!("wait on signal {index} for {cmp:?} {value} (last seen {v})"),
                waited: start.elapsed(),
            }),
        }
    }

    /// This rank's signal words as a sink for signals that arrive over the network: they
    /// land in the words local peers update and wake the same waiters.
    #[cfg(feature = "tcp")]
    pub(crate) fn signal_sink(&self) -> Arc<dyn xccl_tcp::SignalSink> {
        Arc::new(ShmSignalSink {
            words: self.signals[self.rank],
            _seg: self.signal_segs[self.rank].clone(),
            num_signals: self.num_signals,
        })
    }
}

/// This rank's shared-memory signal words, applied by the TCP node (see
/// [`ShmTransport::signal_sink`]).
#[cfg(feature = "tcp")]
struct ShmSignalSink {
    words: SignalArray,
    /// Keeps the words mapped.
    _seg: Arc<Segment>,
    num_signals: usize,
}

#[cfg(feature = "tcp")]
impl xccl_tcp::SignalSink for ShmSignalSink {
    fn load(&self, index: usize) -> u64 {
        self.words.load(index)
    }

    fn apply(&self, index: usize, set: bool, value: u64) {
        // The node checked `index` against the signal count, the same as ours; the close
        // word past them is never reachable from the network.
        debug_assert!(index < self.num_signals);
        // SeqCst update, after the node's progress thread copied the writes this signal
        // follows (partner: the Acquire/SeqCst loads of waiters in `wait_until`).
        match set {
            true => self.words.set(index, value),
            false => {
                self.words.add(index, value);
            }
        }
    }

    fn wake(&self) {
        self.words.wake_every();
    }
}

/// This rank's outcome of a registration step, failed if the step failed on any rank
/// (`verdict[r]` is rank r's outcome).
fn all_or_none<T>(id: u64, step: &str, mine: Result<T>, verdict: &[bool]) -> Result<T> {
    let value = mine?;
    match verdict.iter().position(|&ok| !ok) {
        None => Ok(value),
        Some(rank) => Err(Error::System {
            context: format!("register #{id}: rank {rank} could not {step}"),
            source: std::io::Error::other("the window exists on no rank"),
        }),
    }
}

/// Builds `world` shm ranks as threads of this process (each with its own segments and
/// links, exactly as separate processes would have): for tests and in-process benchmarks.
pub fn in_process(world: usize, num_signals: usize) -> Result<Vec<ShmTransport>> {
    in_process_with(world, num_signals, Duration::from_secs(60))
}

/// [`in_process`] whose collective calls give up after `setup_timeout`.
pub fn in_process_with(
    world: usize,
    num_signals: usize,
    setup_timeout: Duration,
) -> Result<Vec<ShmTransport>> {
    use crate::bootstrap::{random_job_id, store_barrier, MemStore};
    let store = MemStore::new();
    let job = random_job_id();
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (store, job) = (&store, &job);
                s.spawn(move || {
                    let mut opts = ShmOptions::new(job.clone(), rank, world);
                    opts.num_signals = num_signals;
                    opts.setup_timeout = setup_timeout;
                    ShmTransport::new(opts, &mut || store_barrier(store, "mesh", world, deadline))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("setup thread panicked"))
            .collect()
    })
}

impl Transport for ShmTransport {
    fn split(
        &self,
        group: &super::GroupSpec,
        exchange: &mut super::GroupExchange<'_>,
    ) -> Result<Box<dyn Transport>> {
        self.check_live(None)?;
        let job = format!("s{:016x}{:016x}", group.id[0], group.id[1]);
        let mut opts = ShmOptions::new(job, group.rank, group.members.len());
        opts.num_signals = self.num_signals;
        opts.setup_timeout = self.setup_timeout;
        Ok(Box::new(ShmTransport::new(opts, &mut || {
            exchange([0, 0]).map(|_| ())
        })?))
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn caps(&self) -> Caps {
        Caps {
            backend: "shm",
            num_signals: self.num_signals,
            max_window_len: isize::MAX as usize - xccl_shm::HEADER_LEN,
        }
    }

    fn register(&self, len: usize) -> Result<Window> {
        let start = Instant::now();
        self.register_window(len).map_err(|e| e.waited_since(start))
    }

    fn deregister(&self, win: Window) -> Result<()> {
        self.windows.remove(win).map(|_| ())
    }

    fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
        let (_keep, dst) = self.remote(peer, win, offset, data.len())?;
        // SAFETY: `dst` is valid for `data.len()` bytes (`remote`); `data` is caller memory
        // that may itself be a local window slice overlapping the destination when
        // peer == self, which `copy_any` handles.
        unsafe { crate::copy::copy_any(dst, data.as_ptr(), data.len()) };
        Ok(())
    }

    fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
        let (_keep, src) = self.remote(peer, win, offset, out.len())?;
        // SAFETY: as in `put`, direction reversed.
        unsafe { crate::copy::copy_any(out.as_mut_ptr(), src, out.len()) };
        Ok(())
    }

    fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
        check_peer(peer, self.world)?;
        check_signal(index, self.num_signals)?;
        self.check_live(Some(peer))?;
        // The SeqCst update inside add/set releases every earlier put to this peer
        // (partner: the Acquire/SeqCst loads in `wait_until` on the peer).
        match op {
            SignalOp::Add => {
                self.signals[peer].add(index, value);
            }
            SignalOp::Set => self.signals[peer].set(index, value),
        }
        Ok(())
    }

    fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64> {
        self.wait_or(index, cmp, value, deadline, &|| None)
    }

    fn signal_value(&self, index: usize) -> Result<u64> {
        check_signal(index, self.num_signals)?;
        Ok(self.signals[self.rank].load(index))
    }

    fn flush(&self, peer: usize) -> Result<()> {
        check_peer(peer, self.world)?;
        self.check_live(Some(peer))?;
        // Puts are synchronous stores into the peer's mapping; a full fence completes them.
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    fn abort(&self) {
        let tag = self.rank as u64 + 1;
        for (r, seg) in self.signal_segs.iter().enumerate() {
            // SeqCst: ordered before the wakes (partner: the Acquire load in `aborted` and the
            // waiters' SeqCst `waiters` increment).
            let _ = seg
                .user_word()
                .compare_exchange(0, tag, Ordering::SeqCst, Ordering::SeqCst);
            self.signals[r].wake_every();
        }
        tracing::warn!(rank = self.rank, "shm transport aborted");
    }

    fn close(&self, deadline: Instant) -> Result<()> {
        let word = self.num_signals;
        if !self.closing.swap(true, Ordering::SeqCst) {
            for peer in (0..self.world).filter(|&p| p != self.rank) {
                // SeqCst add: ordered after every earlier put to the peer (partner: the
                // Acquire loads of the peer's wait below).
                self.signals[peer].add(word, 1);
            }
        }
        let start = Instant::now();
        let need = self.world as u64 - 1;
        match self.signals[self.rank].wait_until(
            word,
            |v| v >= need,
            deadline,
            &self.policy,
            || self.interruption(),
        ) {
            WaitOutcome::Ready(_) => {
                // Every peer has begun closing: none addresses this rank any more, so leaving
                // is orderly (peers that see our links close read `Closed`, not a death).
                self.signal_segs[self.rank].set_state(SegmentState::Closed);
                Ok(())
            }
            WaitOutcome::Interrupted(e) => {
                // The job already failed (a death or an abort every rank sees for itself):
                // leaving now must not be taken for one more failure naming this rank.
                self.signal_segs[self.rank].set_state(SegmentState::Closed);
                Err(e)
            }
            // Peers that are alive have not closed: leaving is a failure they must see.
            WaitOutcome::TimedOut(v) => Err(Error::Timeout {
                op: format!("closing: {v} of {need} peers have closed"),
                waited: start.elapsed(),
            }),
        }
    }

    fn path_kind(&self, peer: usize) -> Result<PathKind> {
        check_peer(peer, self.world)?;
        Ok(PathKind::Mapped)
    }

    fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
        check_peer(peer, self.world)?;
        let segs = self.segments(win)?;
        let base = segs[peer].data_ptr();
        // SAFETY: the data area is `win.len()` bytes, page aligned, and stays mapped while
        // `segs` lives.
        Ok(Some(unsafe { MappedMem::new(base, win.len(), segs) }))
    }

    fn local_mem(&self, win: &Window) -> Result<MappedMem> {
        Ok(self.map_peer(self.rank, win)?.expect("shm maps every rank"))
    }
}
