//! Multi-process test harness: starts ranks as child processes of the test binary (which
//! re-enters itself in the ignored `worker` test), watches them with a deadline, and checks
//! afterwards that no process or shared-memory segment of the job is left.

#![allow(dead_code)]

pub mod low_latency;
pub mod moe_rows;
pub mod netns;
pub mod workload;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use xccl::bootstrap::TcpStoreServer;

/// Environment variable naming the scenario a worker runs.
pub const SCENARIO: &str = "XCCL_TEST_SCENARIO";
/// Environment variable marking every process of a test job (for the stray-process check).
pub const MARK: &str = "XCCL_TEST_JOB";

/// Multi-process tests run one at a time: 8 ranks on 2 cores is load enough, and the leak
/// check must not see another test's live job.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// The entry point of a test binary's rank processes (the binary re-enters itself as
/// `worker`): runs the function of the scenario named in [`SCENARIO`].
///
/// `scenarios! { "name" => function, ... }`
#[macro_export]
macro_rules! scenarios {
    ($($name:literal => $run:expr),* $(,)?) => {
        #[test]
        #[ignore = "entry point of the rank processes that the other tests start"]
        fn worker() {
            let Ok(scenario) = std::env::var($crate::common::SCENARIO) else {
                return;
            };
            match scenario.as_str() {
                $($name => $run(),)*
                other => panic!("unknown scenario {other}"),
            }
        }
    };
}

/// A rank of a [`Job`]: its communicator, built from the environment with `timeout`.
pub fn rank_comm(timeout: Duration) -> xccl::Communicator {
    xccl::Communicator::builder()
        .timeout(timeout)
        .build()
        .expect("building the rank's communicator")
}

/// Arguments that make the test binary run only the `worker` entry point.
pub fn worker_args() -> Vec<String> {
    [
        "worker",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Environment variables a rank must not inherit (so that only what the test sets counts).
pub const LAUNCHER_VARS: &[&str] = &[
    "XCCL_RANK",
    "XCCL_WORLD_SIZE",
    "XCCL_LOCAL_RANK",
    "XCCL_LOCAL_SIZE",
    "XCCL_STORE",
    "XCCL_STORE_SERVER",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PMI_RANK",
    "PMI_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_JOB_ID",
];

/// A running multi-process job.
pub struct Job {
    pub mark: String,
    pub children: Vec<Child>,
    pub lines: mpsc::Receiver<(usize, String)>,
    /// The job secret its ranks get (as `xccl-run` gives one) and its store demands.
    pub secret: Option<String>,
    _store: TcpStoreServer,
}

impl Job {
    /// Starts `n` ranks running `scenario`, with a fresh TCP store served by the test and a
    /// job secret, as `xccl-run` starts a job.
    pub fn start(n: usize, scenario: &str, extra: &[(&str, String)]) -> Job {
        Self::start_with(n, scenario, extra, Some(xccl::bootstrap::random_job_id()))
    }

    /// As [`Job::start`]; without a secret the ranks get none and the store is open (as under
    /// a launcher that knows nothing of xccl).
    pub fn start_with(
        n: usize,
        scenario: &str,
        extra: &[(&str, String)],
        secret: Option<String>,
    ) -> Job {
        Self::start_each(
            n,
            scenario,
            &|_| {
                extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect()
            },
            secret,
        )
    }

    /// As [`Job::start_with`], each rank's extra environment given by `extra(rank)`.
    pub fn start_each(
        n: usize,
        scenario: &str,
        extra: &dyn Fn(usize) -> Vec<(String, String)>,
        secret: Option<String>,
    ) -> Job {
        let store = TcpStoreServer::bind("127.0.0.1:0", secret.as_deref().map(str::as_bytes))
            .expect("store");
        let mark = format!(
            "{}-{}",
            std::process::id(),
            xccl::bootstrap::random_job_id()
        );
        let exe = std::env::current_exe().expect("test binary path");
        let (tx, lines) = mpsc::channel();
        let mut children = Vec::new();
        for rank in 0..n {
            let mut cmd = Command::new(&exe);
            cmd.args(worker_args());
            for v in LAUNCHER_VARS {
                cmd.env_remove(v);
            }
            cmd.env(SCENARIO, scenario)
                .env(MARK, &mark)
                .env("XCCL_RANK", rank.to_string())
                .env("XCCL_WORLD_SIZE", n.to_string())
                .env("XCCL_STORE", format!("tcp://{}", store.addr()))
                .env("XCCL_STORE_SERVER", "external")
                .env_remove("XCCL_JOB_SECRET")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .stdin(Stdio::null());
            if let Some(secret) = &secret {
                cmd.env("XCCL_JOB_SECRET", secret);
            }
            for (k, v) in extra(rank) {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().expect("spawn rank");
            let out = child.stdout.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("[{rank}] {line}");
                    let _ = tx.send((rank, line));
                }
            });
            children.push(child);
        }
        Job {
            mark,
            children,
            lines,
            secret,
            _store: store,
        }
    }

    /// The address of the job's rendezvous store.
    pub fn store_addr(&self) -> String {
        self._store.addr().to_string()
    }

    /// A client of the job's store, as a rank connects to it (with the job secret).
    pub fn store(&self) -> xccl::bootstrap::TcpStore {
        let deadline = Instant::now() + Duration::from_secs(10);
        let secret = self.secret.as_deref().map(str::as_bytes);
        xccl::bootstrap::TcpStore::connect(&self.store_addr(), secret, deadline)
            .expect("connecting to the job's store")
    }

    /// Waits until every rank in `ranks` has printed a line starting with `word`.
    pub fn expect_from(&self, ranks: &[usize], word: &str, limit: Duration) {
        let end = Instant::now() + limit;
        let mut missing: Vec<usize> = ranks.to_vec();
        while !missing.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((r, l)) if l.starts_with(word) => missing.retain(|&m| m != r),
                Ok(_) => {}
                Err(_) => panic!("ranks {missing:?} did not print {word:?} within {limit:?}"),
            }
        }
    }

    /// Waits for every rank to exit, at most `limit` (then kills them all and fails).
    pub fn wait_all(&mut self, limit: Duration) -> Vec<ExitStatus> {
        let end = Instant::now() + limit;
        let mut out = vec![None; self.children.len()];
        loop {
            for (i, c) in self.children.iter_mut().enumerate() {
                if out[i].is_none() {
                    out[i] = c.try_wait().expect("try_wait");
                }
            }
            if out.iter().all(Option::is_some) {
                return out.into_iter().map(Option::unwrap).collect();
            }
            if Instant::now() >= end {
                self.kill_all();
                panic!("job still running after {limit:?}: hang");
            }
            std::thread::sleep(Duration::from_millis(5)); // polling child exit, not synchronisation
        }
    }

    /// Sends SIGKILL to rank `r`.
    pub fn kill(&mut self, r: usize) {
        let _ = self.children[r].kill();
    }

    /// SIGKILLs and reaps every rank.
    pub fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn environ_has(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| {
            env.split(|&b| b == 0)
                .any(|kv| kv.starts_with(needle.as_bytes()))
        })
        .unwrap_or(false)
}

/// Descriptors of xccl memfd segments that process `pid` holds open.
pub fn xccl_memfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_string_lossy().contains("memfd:xccl-"))
                .count()
        })
        .unwrap_or(0)
}

/// Fails if any process of a test job (marked in its environment) is still alive, if one of
/// them still holds an xccl segment, or if /dev/shm holds xccl files.
pub fn assert_no_leaks(mark: &str) {
    let me = std::process::id();
    let stray: Vec<u32> = processes()
        .into_iter()
        .filter(|&p| p != me && environ_has(p, &format!("{MARK}={mark}")))
        .collect();
    assert!(
        stray.is_empty(),
        "processes of the job still running: {stray:?}"
    );
    let holders: Vec<u32> = processes()
        .into_iter()
        .filter(|&p| p != me && environ_has(p, &format!("{MARK}=")) && xccl_memfds(p) > 0)
        .collect();
    assert!(
        holders.is_empty(),
        "test processes still holding xccl segments: {holders:?}"
    );
    let shm: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.contains("xccl"))
                .collect()
        })
        .unwrap_or_default();
    assert!(shm.is_empty(), "/dev/shm holds xccl files: {shm:?}");
}

/// True when tests that need an optional tool must not skip (CI sets it).
pub fn skips_forbidden() -> bool {
    std::env::var("XCCL_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// The in-process fabrics collective tests run over.
#[derive(Debug, Clone, Copy)]
pub enum Fabric {
    Loopback,
    Shm,
    Tcp,
    /// Shared memory with only the even ranks mapped to each other: every other path goes
    /// through the transport's puts (path kinds differ by peer).
    Mixed,
    /// The hybrid backend on two emulated hosts (the first half of the ranks, rounded up, on
    /// one): shared memory within each, TCP between them.
    Hybrid,
}

/// Rank r's emulated host when `world` ranks are spread over two hosts.
pub fn two_hosts(world: usize) -> Vec<usize> {
    (0..world).map(|r| r * 2 / world).collect()
}

/// `world` connected communicators of one fabric, ranks as threads of this process.
pub fn comms(fabric: Fabric, world: usize) -> Vec<xccl::Communicator> {
    use xccl::transport::Transport;
    let ts: Vec<Box<dyn Transport>> = match fabric {
        Fabric::Loopback => xccl::transport::loopback::Loopback::create(world)
            .unwrap()
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect(),
        Fabric::Shm => xccl::transport::shm::in_process(world, 4096)
            .unwrap()
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect(),
        Fabric::Tcp => xccl::transport::tcp::in_process(world, 4096)
            .unwrap()
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect(),
        Fabric::Mixed => xccl::transport::partly_mapped::PartlyMapped::wrap_all(
            xccl::transport::shm::in_process(world, 4096).unwrap(),
        ),
        Fabric::Hybrid => xccl::transport::hybrid::in_process(&two_hosts(world), 4096)
            .unwrap()
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect(),
    };
    ts.into_iter()
        .map(|t| xccl::Communicator::from_transport(t, Duration::from_secs(60)).unwrap())
        .collect()
}

/// Runs `body` on every rank (a thread each) under a watchdog: a panic or a hang aborts every
/// rank and fails the test with the rank's message.
pub fn run_comms<F>(fabric: Fabric, world: usize, body: F)
where
    F: Fn(&xccl::Communicator) + Send + Sync + 'static,
{
    run_on(comms(fabric, world), &format!("{fabric:?}"), body)
}

/// `run_comms` on the hybrid backend with rank r on emulated host `host_of[r]`.
pub fn run_on_hosts<F>(host_of: &[usize], body: F)
where
    F: Fn(&xccl::Communicator) + Send + Sync + 'static,
{
    let comms = xccl::transport::hybrid::in_process(host_of, 4096)
        .unwrap()
        .into_iter()
        .map(|t| {
            let timeout = Duration::from_secs(60);
            xccl::Communicator::from_transport_on_hosts(Box::new(t), host_of, timeout).unwrap()
        })
        .collect();
    run_on(comms, &format!("hosts {host_of:?}"), body)
}

/// Runs `body` on every communicator of `comms` (a thread each) under the watchdog of
/// `run_comms`.
fn run_on<F>(comms: Vec<xccl::Communicator>, label: &str, body: F)
where
    F: Fn(&xccl::Communicator) + Send + Sync + 'static,
{
    use std::sync::Arc;
    let world = comms.len();
    let comms: Vec<Arc<xccl::Communicator>> = comms.into_iter().map(Arc::new).collect();
    let body = Arc::new(body);
    let (tx, rx) = mpsc::channel();
    for c in &comms {
        let (c, body, tx) = (c.clone(), body.clone(), tx.clone());
        std::thread::spawn(move || {
            // Every rank closes when its body is done, as a program would: the collective
            // close must let ranks that finish at different times all complete.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                body(&c);
                c.close().expect("closing the communicator");
            }));
            let msg = r.err().map(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            });
            let _ = tx.send((c.rank(), msg));
        });
    }
    let end = Instant::now() + Duration::from_secs(240);
    for _ in 0..world {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok((_, None)) => {}
            Ok((rank, Some(msg))) => {
                comms.iter().for_each(|c| c.abort());
                panic!("{label} world {world}: rank {rank} failed: {msg}");
            }
            Err(_) => {
                comms.iter().for_each(|c| c.abort());
                panic!("{label} world {world}: ranks hung");
            }
        }
    }
}

/// Busy loops on every core (what a shared CI runner, or a host running its model's compute,
/// looks like) for as long as the value lives.
pub struct BusyLoops {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    /// One spinning thread per core of the machine.
    pub fn on_every_core() -> BusyLoops {
        use std::sync::atomic::{AtomicBool, Ordering};
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `body` on the communicators split from a parent of `2 × world` ranks (even ranks in
/// one, odd in the other: two groups of `world`), while every parent rank keeps using the
/// parent meanwhile (all-to-all-v calls, each checked) from another thread. Watchdog and
/// close as in [`run_comms`].
pub fn run_split_comms<F>(fabric: Fabric, world: usize, body: F)
where
    F: Fn(&xccl::Communicator) + Send + Sync + 'static,
{
    run_comms(fabric, 2 * world, move |parent| {
        let me = parent.rank();
        let child = parent
            .split(Some(me as u32 % 2), me as i64)
            .expect("split")
            .expect("every rank has a colour");
        assert_eq!(
            (child.rank(), child.world_size()),
            (me / 2, world),
            "ranks of the split"
        );
        std::thread::scope(|s| {
            let busy_parent = s.spawn(|| use_parent(parent, 200));
            body(&child);
            busy_parent.join().expect("the parent's work");
        });
        child.close().expect("closing the split communicator");
    });
}

/// `calls` all-to-all-v calls on `comm`, every block checked.
fn use_parent(comm: &xccl::Communicator, calls: usize) {
    let (me, n) = (comm.rank(), comm.world_size());
    let mut ex = xccl::coll::Exchange::new(comm, 256).expect("parent exchange");
    for call in 0..calls {
        let block = |src: usize, dst: usize| vec![(src * 31 + dst * 7 + call) as u8; 64 + dst];
        let send: Vec<u8> = (0..n).flat_map(|d| block(me, d)).collect();
        let counts: Vec<usize> = (0..n).map(|d| 64 + d).collect();
        let displs: Vec<usize> = (0..n).map(|d| (0..d).map(|j| 64 + j).sum()).collect();
        let view = ex
            .alltoallv(&send, &counts, &displs)
            .expect("parent all-to-all-v");
        for src in 0..n {
            assert_eq!(
                view.block(src),
                &block(src, me)[..],
                "parent call {call} from {src}"
            );
        }
    }
}
