//! How much memory this process may still take: the machine's available memory and, tighter
//! where set, the limits of every memory cgroup it belongs to (v1 and v2), so that reserving a
//! segment past them fails with a clear error instead of summoning the OOM killer.

use std::path::{Path, PathBuf};

/// Bytes this process can still take, and what bounds them; `None` when nothing is known.
pub fn available() -> Option<(u64, &'static str)> {
    let machine = machine_available().map(|b| (b, "available on the machine"));
    let cgroup = cgroup_headroom().map(|b| (b, "left under the memory cgroup's limit"));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(if c.0 < m.0 { c } else { m }),
        (m, c) => m.or(c),
    }
}

fn machine_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

/// The least headroom (limit minus usage) over this process's memory cgroup and its
/// ancestors; `None` when no limit is set or nothing can be read.
fn cgroup_headroom() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut least: Option<u64> = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let found = if controllers.is_empty() {
            // cgroup v2: one hierarchy, where it is mounted.
            ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .iter()
                .filter_map(|root| headroom_along(root, path, "memory.max", "memory.current"))
                .min()
        } else if controllers.split(',').any(|c| c == "memory") {
            headroom_along(
                "/sys/fs/cgroup/memory",
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            None
        };
        if let Some(h) = found {
            least = Some(least.map_or(h, |l| l.min(h)));
        }
    }
    least
}

/// The least `limit - usage` from `root/path` up to `root`.
fn headroom_along(root: &str, path: &str, limit: &str, usage: &str) -> Option<u64> {
    let root = Path::new(root);
    let mut dir: PathBuf = root.join(path.trim_start_matches('/'));
    let mut least: Option<u64> = None;
    loop {
        if let (Some(l), Some(u)) = (number(&dir.join(limit)), number(&dir.join(usage))) {
            let h = l.saturating_sub(u);
            least = Some(least.map_or(h, |x| x.min(h)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return least;
        }
    }
}

/// A limit or usage file's number; `None` for "max", absent files and unlimited values.
fn number(file: &Path) -> Option<u64> {
    let v: u64 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    // cgroup v1 writes "no limit" as a huge page-rounded number.
    (v < 1 << 62).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_memory_is_known_and_positive() {
        let (bytes, why) = available().expect("/proc/meminfo is readable on Linux");
        assert!(bytes > 0, "{bytes} bytes {why}");
    }

    #[test]
    fn headroom_is_the_least_along_the_path() {
        let root = std::env::temp_dir().join(format!("xccl-headroom-{}", std::process::id()));
        let leaf = root.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        let write = |dir: &Path, limit: &str, usage: &str| {
            std::fs::write(dir.join("memory.max"), limit).unwrap();
            std::fs::write(dir.join("memory.current"), usage).unwrap();
        };
        write(&root, "max\n", "100\n");
        write(&root.join("a"), "1000\n", "900\n");
        write(&leaf, "5000\n", "10\n");
        let h = headroom_along(
            root.to_str().unwrap(),
            "/a/b",
            "memory.max",
            "memory.current",
        );
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(h, Some(100));
    }
}
