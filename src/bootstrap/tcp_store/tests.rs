//! The store's tests: requests, caps, hostile and slow clients, authentication.

use super::client::ANSWER_GRACE;
use super::*;
use crate::bootstrap::store::store_barrier;
use std::io::Read;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

/// The server's opening hello (25 bytes) as a raw client sees it.
fn skip_hello(s: &mut TcpStream) -> u8 {
    let mut hello = [0u8; 25];
    s.read_exact(&mut hello).unwrap();
    hello[24]
}

#[test]
fn clients_rendezvous_and_bad_frames_are_dropped() {
    let server = TcpStoreServer::bind("127.0.0.1:0", None).unwrap();
    let addr = server.addr().to_string();
    let d = deadline();
    // A client announcing a huge key is cut off; the store keeps serving others.
    let mut rogue = TcpStream::connect(&addr).unwrap();
    assert_eq!(skip_hello(&mut rogue), 0, "an open store");
    rogue.write_all(&[OP_SET, 0xff, 0xff, 0xff, 0xff]).unwrap();
    std::thread::scope(|s| {
        for _ in 0..3 {
            let addr = addr.clone();
            s.spawn(move || {
                let c = TcpStore::connect(&addr, None, d).unwrap();
                store_barrier(&c, "b", 3, d).unwrap();
            });
        }
    });
    let mut st = [0u8; 1];
    rogue.read_exact(&mut st).unwrap();
    assert_eq!(st[0], ST_BAD);
    let c = TcpStore::connect(&addr, None, d).unwrap();
    c.set("k", b"value").unwrap();
    assert_eq!(c.get("k", d).unwrap(), b"value");
    assert_eq!(c.add("n", 4).unwrap(), 4);
    assert!(matches!(
        c.get("nope", Instant::now() + Duration::from_millis(30)),
        Err(Error::Timeout { .. })
    ));
}

/// A store server that completed the handshake and then went silent (its process
/// stopped): a `get` fails with `Timeout` at its deadline (plus the answer grace), and the
/// connection is not reused.
#[test]
fn get_from_a_silent_server_times_out_at_its_deadline() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = silent.accept().unwrap();
        let mut hello = 0x5843_5354u32.to_le_bytes().to_vec();
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&[0u8; 17]);
        s.write_all(&hello).unwrap();
        s // held open, never answering
    });
    let c = TcpStore::connect(&addr, None, deadline()).unwrap();
    let budget = Duration::from_millis(300);
    let start = Instant::now();
    match c.get("k", start + budget) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took < budget + ANSWER_GRACE + Duration::from_millis(500),
        "get took {took:?} with a {budget:?} deadline"
    );
    assert!(
        c.set("k", b"v").is_err(),
        "a timed-out connection is not reused"
    );
    drop(server.join().unwrap());
}

/// With a secret, only clients that prove it are served: a stranger's client (no secret,
/// a wrong one, or raw bytes) reads nothing, and a rank with the secret refuses a store
/// that asks for none (it would not be the job's).
#[test]
fn a_secured_store_serves_only_clients_with_the_secret() {
    let secret = b"the job secret".as_slice();
    let server = TcpStoreServer::bind("127.0.0.1:0", Some(secret)).unwrap();
    let addr = server.addr().to_string();
    let rank = TcpStore::connect(&addr, Some(secret), deadline()).unwrap();
    rank.set("xccl/tcp/addr/0", b"127.0.0.1:1").unwrap();
    match TcpStore::connect(&addr, None, deadline()) {
        Err(Error::InvalidUsage(m)) => assert!(m.contains("requires the job secret"), "{m}"),
        other => panic!("no secret: {:?}", other.err()),
    }
    assert!(TcpStore::connect(&addr, Some(b"a guess"), deadline()).is_err());
    let mut raw = TcpStream::connect(&addr).unwrap();
    assert_eq!(skip_hello(&mut raw), 1, "a secured store");
    let mut get = vec![OP_GET];
    get.extend_from_slice(&15u32.to_le_bytes());
    get.extend_from_slice(b"xccl/tcp/addr/0");
    get.extend_from_slice(&8u32.to_le_bytes());
    get.extend_from_slice(&1000u64.to_le_bytes());
    let _ = raw.write_all(&[0u8; 48]); // a proof made without the secret
    let _ = raw.write_all(&get);
    let mut answer = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !answer.windows(11).any(|w| w == b"127.0.0.1:1"),
        "{answer:?}"
    );
    assert_eq!(
        rank.get("xccl/tcp/addr/0", deadline()).unwrap(),
        b"127.0.0.1:1"
    );
    let open = TcpStoreServer::bind("127.0.0.1:0", None).unwrap();
    let a = open.addr().to_string();
    assert!(TcpStore::connect(&a, Some(secret), deadline()).is_err());
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// What a client can take is bounded: connections that come and go are all released,
/// the bytes stored are capped, and a client that dawdles over the handshake is cut off.
#[test]
fn the_store_bounds_connections_bytes_and_handshakes() {
    let server = TcpStoreServer::bind("127.0.0.1:0", None).unwrap();
    let addr = server.addr().to_string();
    let fds = open_descriptors();
    for _ in 0..2000 {
        drop(TcpStore::connect(&addr, None, deadline()).unwrap());
    }
    let settle = Instant::now() + Duration::from_secs(10);
    while server.connections() > 0 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10)); // waiting for servers to see EOF
    }
    assert_eq!(server.connections(), 0, "connections still held");
    assert!(
        open_descriptors() <= fds + 8,
        "{fds} -> {} descriptors",
        open_descriptors()
    );
    let c = TcpStore::connect(&addr, None, deadline()).unwrap();
    let big = vec![7u8; MAX_VALUE];
    let mut stored = 0;
    let refused = (0..8).find_map(|i| match c.set(&format!("big{i}"), &big) {
        Ok(()) => {
            stored += big.len();
            None
        }
        Err(e) => Some(e),
    });
    assert!(stored <= MAX_STORED, "{stored} bytes stored");
    match refused {
        Some(Error::ProtocolViolation(m)) => assert!(m.contains("store full"), "{m}"),
        other => panic!("past the cap: {other:?}"),
    }
    c.set("big0", b"small").unwrap(); // overwriting frees room
    c.set("more", &big).unwrap();
    // A secured store cuts a client that says nothing at the handshake's deadline.
    let start = Instant::now();
    let mut b = [0u8; 1];
    let secured = TcpStoreServer::bind("127.0.0.1:0", Some(b"s".as_slice())).unwrap();
    let mut mute = TcpStream::connect(secured.addr()).unwrap();
    skip_hello(&mut mute);
    mute.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let cut = matches!(mute.read(&mut b), Ok(0) | Err(_));
    assert!(cut, "a mute client kept its handshake open");
    assert!(
        start.elapsed() < store_auth::HANDSHAKE_TIMEOUT + Duration::from_secs(1),
        "cut after {:?}",
        start.elapsed()
    );
}
