//! Network namespaces for tests: two namespaces joined by a veth pair (root and iproute2
//! needed), deleted with their veth ends when the guard drops.

use std::process::Command;

/// Runs `ip` with `args`; true on success.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One side of the pair: its namespace, its veth end and that end's address.
#[derive(Debug, Clone)]
pub struct Side {
    pub ns: String,
    pub dev: String,
    pub addr: String,
}

/// Two namespaces joined by a veth pair, deleted on drop.
pub struct VethPair {
    pub sides: [Side; 2],
}

impl VethPair {
    /// Makes the pair (names from `id`, addresses 10.231.x.1 and .2/24); `None` where
    /// namespaces cannot be made (not root, no iproute2): the caller skips, or fails under
    /// `XCCL_REQUIRE_ALL=1`.
    pub fn new(id: u32) -> Option<VethPair> {
        let octet = 1 + id % 250;
        let side = |tag: &str, host: u32| Side {
            ns: format!("xccl{tag}{id}"),
            dev: format!("xv{tag}{id}"),
            addr: format!("10.231.{octet}.{host}"),
        };
        let (a, b) = (side("a", 1), side("b", 2));
        if !ip(&["netns", "add", &a.ns]) {
            return None;
        }
        let pair = VethPair { sides: [a, b] };
        let [a, b] = &pair.sides;
        let (a_cidr, b_cidr) = (format!("{}/24", a.addr), format!("{}/24", b.addr));
        for args in [
            vec!["netns", "add", &b.ns],
            vec![
                "link", "add", &a.dev, "type", "veth", "peer", "name", &b.dev,
            ],
            vec!["link", "set", &a.dev, "netns", &a.ns],
            vec!["link", "set", &b.dev, "netns", &b.ns],
            vec!["-n", &a.ns, "addr", "add", &a_cidr, "dev", &a.dev],
            vec!["-n", &b.ns, "addr", "add", &b_cidr, "dev", &b.dev],
            vec!["-n", &a.ns, "link", "set", &a.dev, "up"],
            vec!["-n", &b.ns, "link", "set", &b.dev, "up"],
            // Ranks of one namespace reach each other's listeners on its own address,
            // which goes through its loopback device.
            vec!["-n", &a.ns, "link", "set", "lo", "up"],
            vec!["-n", &b.ns, "link", "set", "lo", "up"],
        ] {
            assert!(ip(&args), "ip {args:?} failed");
        }
        Some(pair)
    }

    /// Takes side `i`'s veth end down: the link between the namespaces is cut.
    pub fn cut(&self, i: usize) -> bool {
        let s = &self.sides[i];
        ip(&["-n", &s.ns, "link", "set", &s.dev, "down"])
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for s in &self.sides {
            ip(&["netns", "del", &s.ns]);
        }
    }
}

/// Creates the pair or, where that is impossible, prints why and returns `None` (a failure
/// instead when `XCCL_REQUIRE_ALL=1`).
pub fn veth_pair_or_skip(id: u32) -> Option<VethPair> {
    let pair = VethPair::new(id);
    if pair.is_none() {
        assert!(
            !super::skips_forbidden(),
            "cannot create network namespaces and XCCL_REQUIRE_ALL=1"
        );
        eprintln!("SKIPPED: cannot create network namespaces here (needs root and iproute2)");
    }
    pair
}

/// Rank processes of this test binary started inside network namespaces, their stdout lines
/// gathered (and echoed to stderr with the rank).
pub struct NsJob {
    pub kids: Vec<std::process::Child>,
    lines: std::sync::mpsc::Receiver<(usize, String)>,
}

impl NsJob {
    /// Starts rank r of `namespaces.len()` in `namespaces[r]`, running `scenario` with the
    /// job mark `mark`, a file store in `store_dir` and `env(r)` added.
    pub fn start(
        namespaces: &[&str],
        scenario: &str,
        mark: &str,
        store_dir: &std::path::Path,
        env: &dyn Fn(usize) -> Vec<(String, String)>,
    ) -> NsJob {
        let n = namespaces.len();
        let mut kids = Vec::with_capacity(n);
        for (rank, ns) in namespaces.iter().enumerate() {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns])
                .arg(std::env::current_exe().unwrap())
                .args(super::worker_args());
            for v in super::LAUNCHER_VARS {
                cmd.env_remove(v);
            }
            cmd.env(super::SCENARIO, scenario)
                .env(super::MARK, mark)
                .env("XCCL_RANK", rank.to_string())
                .env("XCCL_WORLD_SIZE", n.to_string())
                .env("XCCL_STORE", format!("file://{}", store_dir.display()))
                .env_remove("XCCL_BACKEND")
                .stdout(std::process::Stdio::piped());
            for (k, v) in env(rank) {
                cmd.env(k, v);
            }
            kids.push(cmd.spawn().unwrap());
        }
        let (tx, lines) = std::sync::mpsc::channel();
        for (rank, k) in kids.iter_mut().enumerate() {
            let out = k.stdout.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("[{rank}] {line}");
                    let _ = tx.send((rank, line));
                }
            });
        }
        NsJob { kids, lines }
    }

    /// Every rank's first line starting with `word`, and when the last came; a rank that
    /// prints none within `limit` kills the job and fails the test (the watchdog).
    pub fn wait_for(
        &mut self,
        word: &str,
        limit: std::time::Duration,
    ) -> (std::time::Instant, Vec<String>) {
        let end = std::time::Instant::now() + limit;
        let mut seen: Vec<Option<String>> = vec![None; self.kids.len()];
        while seen.iter().any(Option::is_none) {
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(std::time::Instant::now()))
            {
                Ok((r, l)) if l.starts_with(word) && seen[r].is_none() => seen[r] = Some(l),
                Ok(_) => {}
                Err(_) => {
                    self.kill();
                    panic!("ranks did not all print {word:?} within {limit:?}: {seen:?}");
                }
            }
        }
        (
            std::time::Instant::now(),
            seen.into_iter().flatten().collect(),
        )
    }

    /// Waits for every rank to exit; true when all succeeded.
    pub fn all_succeed(&mut self) -> bool {
        self.kids.iter_mut().all(|k| k.wait().unwrap().success())
    }

    fn kill(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}
