//! Node tests that need its internals: bounded handshakes, stalled senders, blocked writes.

use super::setup::handshake_limit;
use super::*;
use std::io::Write;

/// Runs `body` on its own thread and fails the test if it has not finished in 30 s (the
/// hangs these tests look for must fail them, not stall the suite).
fn watchdog(body: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        body();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p)
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung for 30 s"),
    }
}

/// Rank 0 as a real node; rank 1 played by hand over an authenticated socket.
fn node_and_raw_peer(peer_timeout: Duration) -> (Node, TcpStream) {
    let (node, raw, _) = node_raw_peer_and_addr(peer_timeout);
    (node, raw)
}

/// As `node_and_raw_peer`, with the node's listening address.
fn node_raw_peer_and_addr(peer_timeout: Duration) -> (Node, TcpStream, SocketAddr) {
    let secret = b"stalled peer test secret".to_vec();
    let mut cfg = Config::new(0, 2, secret.clone());
    cfg.peer_timeout = peer_timeout;
    cfg.heartbeat = Duration::from_millis(100);
    let listening = Listening::bind(cfg).unwrap();
    let addr = listening.local_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let peer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        auth::connect(&mut s, &secret, 1, 2, 0).unwrap();
        s
    });
    let node = listening.connect(&[addr, addr], deadline).unwrap();
    (node, peer.join().unwrap(), addr)
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// A client that drips its hello a byte at a time is cut off once the whole handshake's
/// deadline passes, however short each gap; many silent clients at once hold at most a
/// bounded number of handshake threads; the job's own link keeps working throughout.
#[test]
fn slow_and_many_unauthenticated_clients_are_bounded() {
    watchdog(|| {
        let (node, mut raw, addr) = node_raw_peer_and_addr(Duration::from_secs(60));
        let mut drip = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        let cut = loop {
            if drip.write_all(&[0x48]).is_err() {
                break start.elapsed();
            }
            let mut b = [0u8; 1];
            drip.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            match drip.read(&mut b) {
                Ok(0) => break start.elapsed(),
                Ok(_) => panic!("the server answered a partial hello"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => break start.elapsed(),
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "a drip of bytes kept the handshake open"
            );
        };
        assert!(
            cut < auth::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
            "cut after {cut:?}"
        );
        let before = threads_named("xccl-tcp-auth");
        let silent: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut most = 0;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            most = most.max(threads_named("xccl-tcp-auth"));
            std::thread::sleep(Duration::from_millis(10)); // sampling, not syncing
        }
        assert!(
            most <= before + handshake_limit(2),
            "{most} handshake threads for 100 silent clients"
        );
        drop(silent);
        // The job's link still works: a signal from the raw peer lands.
        let mut f = Frame::new(Kind::Signal);
        f.a = 3;
        f.b = 1;
        raw.write_all(&f.encode()).unwrap();
        node.wait(3, |v| v == 1, Instant::now() + Duration::from_secs(5))
            .unwrap();
    });
}

/// A peer that stops in the middle of a frame: a caller's wait still ends at its own
/// deadline (it must not block inside the frame), and the peer is declared failed within
/// the peer timeout (bytes of a frame that never completes are not liveness).
#[test]
fn a_sender_stopped_mid_frame_neither_stalls_waits_nor_stays_alive() {
    watchdog(|| {
        let peer_timeout = Duration::from_millis(1500);
        let (node, mut raw) = node_and_raw_peer(peer_timeout);
        node.register(1, 1 << 20).unwrap();
        let mut f = Frame::new(Kind::Write);
        f.region = 1;
        f.len = 1 << 20;
        f.flags = FLAG_SIGNAL;
        f.a = 0;
        f.b = 1;
        raw.write_all(&f.encode()).unwrap();
        raw.write_all(&[7u8; 1000]).unwrap(); // and nothing more: stopped mid-frame
        let stopped_at = Instant::now();
        let wait = Duration::from_millis(300);
        let r = node.wait(0, |v| v >= 1, Instant::now() + wait);
        let took = stopped_at.elapsed();
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert!(
            took < wait + Duration::from_millis(500),
            "a {wait:?} wait took {took:?}"
        );
        // Then the peer is failed, within the peer timeout (plus a heartbeat's slack).
        let r = node.wait(0, |v| v >= 1, Instant::now() + Duration::from_secs(20));
        let took = stopped_at.elapsed();
        assert!(matches!(r, Err(Error::PeerFailed { rank: 1, .. })), "{r:?}");
        assert!(
            took < peer_timeout + Duration::from_secs(1),
            "failed after {took:?} with a {peer_timeout:?} peer timeout"
        );
        drop(raw);
    });
}

/// A peer that stops reading: a write streaming to it ends with `PeerFailed` once the peer
/// has been silent for the peer timeout, and `abort` from another thread returns at once
/// while that write is blocked.
#[test]
fn a_write_blocked_on_a_peer_that_stopped_reading_ends() {
    watchdog(|| {
        let peer_timeout = Duration::from_millis(1500);
        let (node, raw) = node_and_raw_peer(peer_timeout);
        let data = vec![1u8; 1 << 20];
        let start = Instant::now();
        let r = loop {
            // The raw peer reads nothing: the socket fills, then the write blocks.
            if let Err(e) = node.write(1, 1, 0, &data, None) {
                break e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "writes never blocked"
            );
        };
        let took = start.elapsed();
        assert!(matches!(r, Error::PeerFailed { rank: 1, .. }), "{r:?}");
        assert!(
            took < peer_timeout + Duration::from_secs(2),
            "ended after {took:?}"
        );
        drop(raw);
    });
}

#[test]
fn abort_returns_while_a_write_is_blocked() {
    watchdog(|| {
        let (node, raw) = node_and_raw_peer(Duration::from_secs(60));
        let node = Arc::new(node);
        let writer = {
            let node = node.clone();
            std::thread::spawn(move || {
                let data = vec![1u8; 1 << 20];
                loop {
                    if let Err(e) = node.write(1, 1, 0, &data, None) {
                        return (e, Instant::now());
                    }
                }
            })
        };
        // Wait until the writer is stuck: the node's last successful send stops moving.
        let mut last = node.shared.last_sent[1].load(Ordering::Relaxed);
        let mut still = Instant::now();
        while still.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(20)); // sampling a counter, not syncing
            let now = node.shared.last_sent[1].load(Ordering::Relaxed);
            if now != last {
                last = now;
                still = Instant::now();
            }
        }
        let before = Instant::now();
        node.abort();
        let abort_took = before.elapsed();
        let (e, ended) = writer.join().unwrap();
        assert!(
            abort_took < Duration::from_millis(500),
            "abort took {abort_took:?}"
        );
        assert!(matches!(e, Error::Aborted), "{e:?}");
        let write_took = ended.duration_since(before);
        assert!(
            write_took < Duration::from_secs(1),
            "the write ended {write_took:?} after abort"
        );
        drop(raw);
    });
}
