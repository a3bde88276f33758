//! Setting up: binding the listener, connecting to lower ranks and accepting higher ones,
//! the authenticated handshake, and starting the threads.

use super::*;

/// A node whose listener is bound but whose links are not up yet.
pub struct Listening {
    cfg: Config,
    listener: TcpListener,
    sink: Option<Arc<dyn SignalSink>>,
}

impl Listening {
    /// Binds the listener (publish [`Listening::local_addr`] to the peers).
    pub fn bind(cfg: Config) -> Result<Self> {
        if cfg.rank >= cfg.world || cfg.num_signals == 0 || cfg.secret.is_empty() {
            return Err(Error::Invalid(format!(
                "rank {} of {}, {} signals, secret of {} bytes",
                cfg.rank,
                cfg.world,
                cfg.num_signals,
                cfg.secret.len()
            )));
        }
        let listener = TcpListener::bind(cfg.bind)
            .map_err(|e| Error::io(format!("binding {}", cfg.bind), e))?;
        Ok(Listening {
            cfg,
            listener,
            sink: None,
        })
    }

    /// Signals from peers land in `sink`'s words instead of the node's own (see
    /// [`SignalSink`]); it must have at least the configured number of words.
    pub fn with_signal_sink(mut self, sink: Arc<dyn SignalSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))
    }

    /// Collective: connects to every peer (`addrs[r]` is rank r's listener; this rank's
    /// entry is ignored), authenticating each link, and starts the progress threads.
    pub fn connect(self, addrs: &[SocketAddr], deadline: Instant) -> Result<Node> {
        let cfg = self.cfg.clone();
        let (me, n) = (cfg.rank, cfg.world);
        if addrs.len() != n {
            return Err(Error::Invalid(format!(
                "{} addresses for {n} ranks",
                addrs.len()
            )));
        }
        let shared = Arc::new(Shared::new(cfg, self.sink)?);
        let mut threads = Vec::new();
        // Acceptor: authenticates every incoming connection; links of the mesh go to setup,
        // anything else (duplicates, late or rogue clients) is refused.
        let (tx, rx) = mpsc::channel::<(usize, TcpStream)>();
        self.listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("listener", e))?;
        let acc_shared = shared.clone();
        let listener = self.listener;
        threads.push(
            std::thread::Builder::new()
                .name(format!("xccl-tcp-accept-{me}"))
                .spawn(move || accept_loop(listener, acc_shared, tx))
                .map_err(|e| Error::io("spawning the acceptor", e))?,
        );
        let links = gather_links(&shared, addrs, rx, deadline)?;
        for (peer, link) in links.into_iter().enumerate() {
            if let Some(s) = link {
                threads.push(start_link(&shared, peer, s)?);
            }
        }
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("xccl-tcp-beat-{me}"))
                .spawn(move || heartbeat(sh))
                .map_err(|e| Error::io("spawning the heartbeat", e))?,
        );
        Ok(Node { shared, threads })
    }
}

pub(super) fn connect_to(
    cfg: &Config,
    peer: usize,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(2);
    loop {
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| Error::io(format!("connecting to rank {peer} at {addr}"), e))
            .and_then(|mut s| {
                let _ = s.set_nodelay(true);
                auth::connect(
                    &mut s,
                    &cfg.secret,
                    cfg.rank as u32,
                    cfg.world as u32,
                    peer as u32,
                )?;
                Ok(s)
            });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e @ Error::Protocol(_)) => return Err(e),
            Err(e) if Instant::now() + backoff >= deadline => return Err(e),
            Err(_) => {
                std::thread::sleep(backoff); // retry pacing while the peer starts listening
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
    }
}

/// Handshakes in progress at once beyond which new connections are closed unread.
pub(super) fn handshake_limit(world: usize) -> usize {
    (2 * world).max(16)
}

pub(super) fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<(usize, TcpStream)>,
) {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let limit = handshake_limit(shared.cfg.world);
    let mut backoff = Duration::from_millis(5);
    // Handshake threads, joined before the loop returns (each ends by the handshake's own
    // deadline), so the node leaves no thread behind.
    let mut auth_threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        // Ended handshakes are joined as they go (their stacks go with them).
        let mut i = 0;
        while i < auth_threads.len() {
            if auth_threads[i].is_finished() {
                let _ = auth_threads.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
        match listener.accept() {
            Ok((s, from)) => {
                backoff = Duration::from_millis(5);
                if handshakes.fetch_add(1, Ordering::SeqCst) >= limit {
                    handshakes.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(rank = shared.cfg.rank, %from, "xccl-tcp: too many handshakes at once; connection closed");
                    continue; // dropping `s` closes it
                }
                let (sh, tx, busy) = (shared.clone(), tx.clone(), handshakes.clone());
                let spawned = std::thread::Builder::new().name("xccl-tcp-auth".into()).spawn(move || {
                    let mut s = s;
                    let _ = s.set_nonblocking(false);
                    let cfg = &sh.cfg;
                    let r = auth::accept(&mut s, &cfg.secret, cfg.rank as u32, cfg.world as u32);
                    busy.fetch_sub(1, Ordering::SeqCst);
                    match r {
                        Ok(peer) => {
                            if tx.send((peer as usize, s)).is_err() {
                                tracing::warn!(rank = cfg.rank, %from, peer, "xccl-tcp: refused a late connection");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(rank = cfg.rank, %from, error = %e, "xccl-tcp: refused a connection");
                        }
                    }
                });
                match spawned {
                    Ok(h) => auth_threads.push(h),
                    Err(_) => {
                        handshakes.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // A 50 ms timeout bounds how late `stop` is seen.
                let wait = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 50_000_000,
                };
                let mut p = [rustix::event::PollFd::new(
                    &listener,
                    rustix::event::PollFlags::IN,
                )];
                let _ = rustix::event::poll(&mut p, Some(&wait));
            }
            Err(e) => {
                // Out of descriptors or memory: the connection stays queued, so retrying at
                // once would spin. Back off, and say so.
                tracing::warn!(rank = shared.cfg.rank, error = %e, "xccl-tcp: accept failed; backing off");
                std::thread::sleep(backoff); // pacing of retries after an error
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
    for h in auth_threads {
        let _ = h.join();
    }
}

/// The mesh's links, by peer: connections to every lower rank, and the authenticated ones
/// the acceptor hands over from every higher rank, within `deadline`.
fn gather_links(
    shared: &Arc<Shared>,
    addrs: &[SocketAddr],
    rx: mpsc::Receiver<(usize, TcpStream)>,
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>> {
    let (me, n) = (shared.cfg.rank, shared.cfg.world);
    let mut links: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    for (peer, link) in links.iter_mut().enumerate().take(me) {
        *link = Some(connect_to(&shared.cfg, peer, addrs[peer], deadline)?);
    }
    let mut missing = n - me - 1;
    while missing > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((peer, s)) if peer > me && links[peer].is_none() => {
                links[peer] = Some(s);
                missing -= 1;
            }
            Ok(_) => {}
            Err(_) => {
                shared.stop.store(true, Ordering::SeqCst);
                return Err(Error::Timeout(format!(
                    "rank {me} waiting for {missing} higher ranks to connect"
                )));
            }
        }
    }
    Ok(links) // dropping `rx`: later connections are refused
}

/// Puts `peer`'s link to work: its writer (woken every `WRITE_SLICE` to see whether a
/// blocked write was interrupted), its reader, and the progress thread that reads it.
fn start_link(shared: &Arc<Shared>, peer: usize, s: TcpStream) -> Result<JoinHandle<()>> {
    let _ = s.set_nodelay(true);
    let reader = s.try_clone().map_err(|e| Error::io("cloning a link", e))?;
    let _ = reader.set_read_timeout(Some(shared.cfg.heartbeat));
    s.set_write_timeout(Some(WRITE_SLICE))
        .map_err(|e| Error::io("send timeout of a link", e))?;
    *shared.writers[peer]
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(s);
    shared.rx_fd[peer].store(reader.as_raw_fd(), Ordering::Relaxed);
    *shared.rx[peer].lock().unwrap_or_else(|p| p.into_inner()) = Some(RxLink::new(reader));
    shared.last_recv[peer].store(shared.now_us(), Ordering::Relaxed);
    let sh = shared.clone();
    std::thread::Builder::new()
        .name(format!("xccl-tcp-{}<{peer}", shared.cfg.rank))
        .spawn(move || progress(sh, peer))
        .map_err(|e| Error::io("spawning a progress thread", e))
}
