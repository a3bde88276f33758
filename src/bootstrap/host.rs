//! Host identity: which host every rank runs on. Each rank names its host (`XCCL_HOST_ID`,
//! else the machine's boot id and hostname), the names go round the store, and ranks with
//! the same name share a host. A launcher's local-rank variables are checked against it.

use super::env::RankInfo;
use super::store::Store;
use crate::error::{Error, Result};
use std::time::Instant;

/// Longest `XCCL_HOST_ID` accepted.
const MAX_ID: usize = 128;

/// This process's host name for the job: `XCCL_HOST_ID` (read through `get`) if set — so
/// several hosts can be emulated on one machine — else the kernel's boot id and the hostname
/// (two machines never share a boot id; a container shares its machine's).
pub fn host_id(get: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    if let Some(id) = get("XCCL_HOST_ID") {
        let ok = !id.is_empty() && id.len() <= MAX_ID && id.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "XCCL_HOST_ID={id:?}: use 1 to {MAX_ID} printable characters without spaces"
            )));
        }
        return Ok(format!("id:{id}"));
    }
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Ok(format!("machine:{boot}/{name}"))
}

/// The host of every rank of a job: hosts are numbered in the order of their lowest rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    host_of: Vec<usize>,
}

impl Hosts {
    /// Every rank on one host.
    pub fn single(world: usize) -> Self {
        Hosts {
            host_of: vec![0; world],
        }
    }

    /// Hosts from each rank's host name, by rank.
    pub fn from_ids(ids: &[String]) -> Self {
        let mut seen: Vec<&String> = Vec::new();
        let host_of = ids
            .iter()
            .map(|id| match seen.iter().position(|s| *s == id) {
                Some(h) => h,
                None => {
                    seen.push(id);
                    seen.len() - 1
                }
            })
            .collect();
        Hosts { host_of }
    }

    /// Hosts from a table of host indices by rank (checked: numbered by lowest rank).
    pub fn from_table(host_of: Vec<usize>) -> Result<Self> {
        let mut next = 0;
        for (r, &h) in host_of.iter().enumerate() {
            if h > next {
                return Err(Error::InvalidArgument(format!(
                    "rank {r} on host {h} before any rank on host {next}"
                )));
            }
            if h == next {
                next += 1;
            }
        }
        Ok(Hosts { host_of })
    }

    /// The host of `rank`.
    pub fn host_of(&self, rank: usize) -> usize {
        self.host_of[rank]
    }

    /// Number of hosts.
    pub fn count(&self) -> usize {
        self.host_of.iter().max().map_or(0, |h| h + 1)
    }

    /// The ranks on host `h`, ascending.
    pub fn ranks_on(&self, h: usize) -> Vec<usize> {
        (0..self.host_of.len())
            .filter(|&r| self.host_of[r] == h)
            .collect()
    }

    /// Whether `a` and `b` share a host.
    pub fn same_host(&self, a: usize, b: usize) -> bool {
        self.host_of[a] == self.host_of[b]
    }

    /// `rank`'s index among the ranks of its host, and how many there are.
    pub fn local(&self, rank: usize) -> (usize, usize) {
        let h = self.host_of[rank];
        let index = self.host_of[..rank].iter().filter(|&&x| x == h).count();
        let size = self.host_of.iter().filter(|&&x| x == h).count();
        (index, size)
    }

    /// Ranks per host when every host holds the same number of consecutive ranks (the
    /// layout `ranks_per_host` options describe), else `None`.
    pub fn uniform_block(&self) -> Option<usize> {
        let n = self.host_of.len();
        let per = n / self.count().max(1);
        (per > 0 && (0..n).all(|r| self.host_of[r] == r / per)).then_some(per)
    }

    /// The table, by rank.
    pub fn table(&self) -> &[usize] {
        &self.host_of
    }
}

/// Collective through `store`: publishes this rank's host name with the local rank and size
/// its launcher gave, reads every rank's, and checks every rank's launcher against the
/// names ([`cross_check`]), so that a contradiction fails every rank alike.
pub fn exchange(store: &dyn Store, info: &RankInfo, id: &str, deadline: Instant) -> Result<Hosts> {
    let local = match info.launcher_local {
        Some((r, s)) => format!("{r} {s}"),
        None => "- -".to_string(),
    };
    store.set(
        &format!("host/{}", info.rank),
        format!("{local} {id}").as_bytes(),
    )?;
    let mut ids = Vec::with_capacity(info.world_size);
    let mut claims = Vec::with_capacity(info.world_size);
    for r in 0..info.world_size {
        let v = store.get(&format!("host/{r}"), deadline)?;
        let text = String::from_utf8_lossy(&v).into_owned();
        let bad = || Error::ProtocolViolation(format!("rank {r} published host entry {text:?}"));
        let mut parts = text.splitn(3, ' ');
        let (lr, ls, id) = match (parts.next(), parts.next(), parts.next()) {
            (Some(lr), Some(ls), Some(id)) if id.len() <= MAX_ID + 64 => (lr, ls, id),
            _ => return Err(bad()),
        };
        claims.push(match (lr.parse::<usize>(), ls.parse::<usize>()) {
            (Ok(lr), Ok(ls)) => Some((lr, ls)),
            _ if lr == "-" && ls == "-" => None,
            _ => return Err(bad()),
        });
        ids.push(id.to_string());
    }
    let hosts = Hosts::from_ids(&ids);
    for (r, claim) in claims.into_iter().enumerate() {
        check_claim(r, claim, info.source, &hosts)?;
    }
    Ok(hosts)
}

/// Checks the launcher's local rank and local size (when it gave them) against the hosts:
/// a contradiction is `ConfigMismatch` naming both.
pub fn cross_check(info: &RankInfo, hosts: &Hosts) -> Result<()> {
    check_claim(info.rank, info.launcher_local, info.source, hosts)
}

/// [`cross_check`] of what `source` said of `rank`: its local rank and size, if anything.
fn check_claim(
    rank: usize,
    claim: Option<(usize, usize)>,
    source: &str,
    hosts: &Hosts,
) -> Result<()> {
    let Some((launcher_rank, launcher_size)) = claim else {
        return Ok(());
    };
    let (index, size) = hosts.local(rank);
    if launcher_size != size || launcher_rank != index {
        return Err(Error::ConfigMismatch(format!(
            "the launcher ({}) puts rank {} at local rank {launcher_rank} of {launcher_size} \
             on its host, the host names (XCCL_HOST_ID or the machine's) at {index} of {size} \
             (hosts by rank: {:?})",
            source,
            rank,
            hosts.table()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_group_ranks() {
        let ids: Vec<String> = ["b", "a", "b", "c", "a"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let h = Hosts::from_ids(&ids);
        assert_eq!(h.table(), &[0, 1, 0, 2, 1]);
        assert_eq!((h.count(), h.ranks_on(1)), (3, vec![1, 4]));
        assert_eq!((h.local(2), h.local(4)), ((1, 2), (1, 2)));
        assert!(h.same_host(0, 2) && !h.same_host(0, 1));
        assert_eq!(h.uniform_block(), None);
        let blocks = Hosts::from_table(vec![0, 0, 1, 1, 2, 2]).unwrap();
        assert_eq!(blocks.uniform_block(), Some(2));
        assert!(Hosts::from_table(vec![1, 0]).is_err());
        assert_eq!(Hosts::single(3).uniform_block(), Some(3));
    }

    #[test]
    fn host_ids_from_the_environment() {
        let id = |v: Option<&str>| {
            let v = v.map(str::to_string);
            host_id(&move |k| (k == "XCCL_HOST_ID").then(|| v.clone()).flatten())
        };
        assert_eq!(id(Some("node-7")).unwrap(), "id:node-7");
        assert!(id(Some("")).is_err() && id(Some("a b")).is_err());
        assert!(id(Some(&"x".repeat(129))).is_err());
        let machine = id(None).unwrap();
        assert!(
            machine.starts_with("machine:") && machine.len() > 10,
            "{machine}"
        );
        assert_eq!(
            machine,
            id(None).unwrap(),
            "the same machine, the same name"
        );
    }

    #[test]
    fn launcher_local_ranks_are_checked() {
        let hosts = Hosts::from_table(vec![0, 0, 1, 1]).unwrap();
        let mut info = RankInfo {
            rank: 3,
            world_size: 4,
            local_rank: 1,
            local_size: 2,
            source: "openmpi",
            launcher_local: Some((1, 2)),
        };
        cross_check(&info, &hosts).unwrap();
        info.launcher_local = Some((3, 4)); // the launcher thinks one host of four
        assert!(matches!(
            cross_check(&info, &hosts),
            Err(Error::ConfigMismatch(_))
        ));
        info.launcher_local = None; // the launcher said nothing
        cross_check(&info, &hosts).unwrap();
    }
}
