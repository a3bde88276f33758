//! Checks of a backend's split: the suite runs on the even ranks split from twice as many,
//! while every parent rank stays alive and busy.

use super::*;

/// Splits `parents` (ranks of one backend, built in this process) into its even and its odd
/// ranks with [`Transport::split`], each rank on its own thread, and returns the even group's
/// transports by new rank: run the suite on them to check a backend's split. Every parent
/// rank stays alive, and keeps putting and signalling on the parent from a thread of its
/// own, until the returned transports (the odd group's too) are dropped.
pub fn evens_of(parents: Vec<Box<dyn Transport>>) -> Vec<Box<dyn Transport>> {
    use crate::transport::GroupSpec;
    let n = parents.len();
    // Fresh group ids: suites running side by side in one process never meet.
    let mut id = [0u8; 16];
    crate::bootstrap::fill_random(&mut id);
    let id = u64::from_le_bytes(id[..8].try_into().expect("8 bytes"));
    // One all-gather per group: each member's words by new rank.
    type Gather = (Mutex<Vec<Option<[u64; 2]>>>, std::sync::Condvar);
    let gathers: Arc<[Gather; 2]> = Arc::new([
        (Mutex::new(vec![None; n.div_ceil(2)]), Default::default()),
        (Mutex::new(vec![None; n / 2]), Default::default()),
    ]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = parents
        .into_iter()
        .enumerate()
        .map(|(r, parent)| {
            let gathers = gathers.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let colour = r % 2;
                let group = GroupSpec {
                    members: (0..n).filter(|m| m % 2 == colour).collect(),
                    rank: r / 2,
                    id: [id, colour as u64],
                };
                let (slots, cv) = &gathers[colour];
                let mut exchange = |words: [u64; 2]| {
                    let mut all = slots.lock().unwrap_or_else(|p| p.into_inner());
                    all[group.rank] = Some(words);
                    cv.notify_all();
                    let (all, _) = cv
                        .wait_timeout_while(all, WAIT, |all| all.iter().any(Option::is_none))
                        .unwrap_or_else(|p| p.into_inner());
                    all.iter()
                        .map(|w| w.ok_or(Error::InvalidUsage("a member never came".into())))
                        .collect()
                };
                let child = parent.split(&group, &mut exchange).expect("split");
                let parent: Arc<dyn Transport> = Arc::from(parent);
                let busy = std::thread::spawn({
                    let (parent, stop) = (parent.clone(), stop.clone());
                    move || keep_busy(&*parent, &stop)
                });
                (colour, group.rank, child, (parent, busy))
            })
        })
        .collect();
    let done: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("a splitting rank"))
        .collect();
    // The parents and their threads go when the last child does.
    let parents = Arc::new(Parents {
        stop,
        ranks: Mutex::new(done.iter().map(|(.., p)| p.0.clone()).collect()),
        threads: Mutex::new(Vec::new()),
    });
    let mut evens = Vec::new();
    for (colour, rank, child, (_, busy)) in done {
        parents
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(busy);
        let child: Box<dyn Transport> = Box::new(WithParent {
            child,
            _parents: parents.clone(),
        });
        if colour == 0 {
            evens.push((rank, child));
        }
    }
    evens.sort_by_key(|(rank, _)| *rank);
    evens.into_iter().map(|(_, t)| t).collect()
}

/// Traffic on a parent while its children are tested: every parent rank registers a window
/// (collectively) and then puts into its right neighbour and signals it, paced, until told
/// to stop or the parent fails.
pub(super) fn keep_busy(parent: &dyn Transport, stop: &std::sync::atomic::AtomicBool) {
    let (me, n) = (parent.rank(), parent.world_size());
    let Ok(win) = parent.register(4096) else {
        return;
    };
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let to = (me + 1) % n;
        let ok = parent.put(to, &win, 0, &i.to_le_bytes()).is_ok()
            && parent.signal(to, 0, SignalOp::Add, 1).is_ok()
            && parent.signal_value(0).is_ok();
        if !ok {
            return;
        }
        i += 1;
        // Pacing of background traffic, not synchronisation.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The parents of a split and their busy threads, stopped and dropped with the last child.
pub(super) struct Parents {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ranks: Mutex<Vec<Arc<dyn Transport>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Parents {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        self.ranks.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// A child transport that keeps its parents alive: every call goes to the child.
pub(super) struct WithParent {
    child: Box<dyn Transport>,
    _parents: Arc<Parents>,
}

impl Transport for WithParent {
    crate::forward_transport!(child; rank, world_size, caps, register, deregister, put,
        put_vectored, get, signal, put_signal, put_signal_then, wait, signal_value, flush, abort, close,
        local_mem, path_kind, map_peer, arrivals, wait_arrivals);
}
