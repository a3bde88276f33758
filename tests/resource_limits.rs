//! Registration under resource limits, across real processes: a window that does not fit a
//! rank's memory cgroup is refused with a clear error (not an OOM kill), and a rank that cannot
//! map or allocate its part of a window makes `register` fail on every rank.

#[macro_use]
mod common;

use common::{assert_no_leaks, rank_comm, skips_forbidden, Job, SERIAL};
use std::path::{Path, PathBuf};
use std::time::Duration;
use xccl::Error;

const MIB: usize = 1 << 20;
/// Names the per-rank cgroup directory prefix a `cgroup_register` rank moves itself into.
const CGROUP_VAR: &str = "XCCL_TEST_CGROUP";
/// Address space (MiB past what it already uses) rank 1 of `address_limit` keeps.
const HEADROOM_VAR: &str = "XCCL_TEST_AS_HEADROOM_MIB";

scenarios! {
    "cgroup_register" => cgroup_register,
    "address_limit" => address_limit,
}

fn expect_refused(r: xccl::Result<xccl::transport::Window>, rank: usize) {
    match r {
        Err(e @ Error::System { .. }) => println!("REFUSED {rank}: {e}"),
        other => panic!("rank {rank}: expected a System error, got {other:?}"),
    }
}

/// Each rank lives in its own 256 MiB memory cgroup and registers two 200 MiB windows: the
/// first fits, the second is refused on every rank; a small one still works afterwards.
fn cgroup_register() {
    let prefix = std::env::var(CGROUP_VAR).unwrap();
    let rank: usize = std::env::var("XCCL_RANK").unwrap().parse().unwrap();
    let procs = format!("{prefix}-r{rank}/cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string()).unwrap();
    let comm = rank_comm(Duration::from_secs(30));
    let first = comm.register(200 * MIB).expect("the first window fits");
    expect_refused(comm.register(200 * MIB), comm.rank());
    comm.register(MIB)
        .expect("a small window after the refusal");
    comm.transport().deregister(first).unwrap();
    comm.close().unwrap();
}

fn vm_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: usize = status
        .lines()
        .find(|l| l.starts_with("VmSize:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Rank 1 limits its address space; both register a 200 MiB window, which rank 1 cannot
/// hold: every rank must get the error, none a window the other lacks.
fn address_limit() {
    let comm = rank_comm(Duration::from_secs(30));
    let headroom: usize = std::env::var(HEADROOM_VAR).unwrap().parse().unwrap();
    comm.barrier().unwrap();
    if comm.rank() == 1 {
        let limit = (vm_size() + headroom * MIB) as libc::rlim_t;
        let lim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit for this process.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
    }
    expect_refused(comm.register(200 * MIB), comm.rank());
    comm.close().unwrap();
}

/// This process's memory cgroup directory: `(dir, v2)`.
fn own_memory_cgroup() -> Option<(PathBuf, bool)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(rel);
            if dir.join("memory.limit_in_bytes").exists() {
                return Some((dir, false));
            }
        } else if controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let dir = Path::new(root).join(rel);
                let ctl = std::fs::read_to_string(dir.join("cgroup.subtree_control"));
                if ctl.is_ok_and(|c| c.split_whitespace().any(|w| w == "memory")) {
                    return Some((dir, true));
                }
            }
        }
    }
    None
}

/// Makes one 256 MiB memory cgroup per rank under this process's own; `None` (with why)
/// where the machine does not allow it.
fn make_cgroups(mark: &str, ranks: usize) -> Result<Vec<PathBuf>, String> {
    let (base, v2) = own_memory_cgroup().ok_or("no writable memory cgroup hierarchy")?;
    let mut made = Vec::new();
    for r in 0..ranks {
        let dir = base.join(format!("xccl-test-{mark}-r{r}"));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        made.push(dir.clone());
        let (file, value) = if v2 {
            ("memory.max", "268435456")
        } else {
            ("memory.limit_in_bytes", "268435456")
        };
        std::fs::write(dir.join(file), value)
            .map_err(|e| format!("limiting {}: {e}", dir.display()))?;
        if v2 {
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        } else {
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), "268435456");
        }
    }
    Ok(made)
}

#[test]
fn a_window_past_the_memory_cgroup_limit_is_refused_on_every_rank() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mark = format!(
        "{}-{}",
        std::process::id(),
        xccl::bootstrap::random_job_id()
    );
    let dirs = match make_cgroups(&mark, 2) {
        Ok(d) => d,
        Err(why) => {
            assert!(!skips_forbidden(), "cannot run the cgroup test: {why}");
            eprintln!("skipped: {why}");
            return;
        }
    };
    let prefix = dirs[0]
        .to_string_lossy()
        .trim_end_matches("-r0")
        .to_string();
    let mut job = Job::start(2, "cgroup_register", &[(CGROUP_VAR, prefix)]);
    let st = job.wait_all(Duration::from_secs(120));
    let job_mark = job.mark.clone();
    drop(job);
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
    for (r, s) in st.iter().enumerate() {
        assert!(s.success(), "rank {r}: {s:?} (an OOM kill is signal 9)");
    }
    assert_no_leaks(&job_mark);
}

fn address_limit_on_one_rank_fails_every_rank(backend: &str, headroom_mib: usize) {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut job = Job::start(
        2,
        "address_limit",
        &[
            ("XCCL_BACKEND", backend.to_string()),
            (HEADROOM_VAR, headroom_mib.to_string()),
        ],
    );
    job.expect_from(&[0, 1], "REFUSED", Duration::from_secs(60));
    let st = job.wait_all(Duration::from_secs(60));
    for (r, s) in st.iter().enumerate() {
        assert!(s.success(), "{backend} rank {r}: {s:?}");
    }
    let mark = job.mark.clone();
    drop(job);
    assert_no_leaks(&mark);
}

/// Over shared memory rank 1 holds its own 200 MiB segment but cannot map rank 0's.
#[test]
fn shm_register_failing_on_one_rank_fails_on_every_rank() {
    address_limit_on_one_rank_fails_every_rank("shm", 300);
}

/// Over TCP rank 1 cannot allocate its 200 MiB region.
#[test]
fn tcp_register_failing_on_one_rank_fails_on_every_rank() {
    address_limit_on_one_rank_fails_every_rank("tcp", 100);
}
