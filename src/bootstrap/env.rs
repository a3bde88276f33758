//! Rank identity from explicit arguments or from the variables of common launchers.

use crate::error::{Error, Result};

/// Who this process is in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Rank among the processes on this host.
    pub local_rank: usize,
    /// Number of ranks on this host (the world size when the launcher does not say).
    pub local_size: usize,
    /// Where the identity came from (`explicit`, `xccl`, `torchrun`, `openmpi`, `pmi`, `slurm`).
    pub source: &'static str,
    /// The local rank and local size as the launcher gave them (`None`: it gave no local
    /// size), checked against the host names when the communicator is built.
    pub launcher_local: Option<(usize, usize)>,
}

/// The launchers whose variables are read, in order of precedence:
/// (source, rank, world size, local rank, local size).
const LAUNCHERS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "xccl",
        "XCCL_RANK",
        "XCCL_WORLD_SIZE",
        "XCCL_LOCAL_RANK",
        "XCCL_LOCAL_SIZE",
    ),
    (
        "torchrun",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
    ),
    (
        "openmpi",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    (
        "pmi",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALRANKID",
        "MPI_LOCALNRANKS",
    ),
    (
        "slurm",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "SLURM_NTASKS_PER_NODE",
    ),
];

fn parse(var: &str, value: &str) -> Result<usize> {
    value.trim().parse().map_err(|_| {
        Error::InvalidArgument(format!("{var}={value:?} is not a non-negative integer"))
    })
}

/// Resolves the rank identity: explicit `(rank, world)` first, then the first launcher whose
/// rank and size variables are both set, read through `get` (normally `std::env::var`).
/// A job with neither is a single rank.
pub fn detect_with(
    explicit: Option<(usize, usize)>,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<RankInfo> {
    let info = if let Some((rank, world_size)) = explicit {
        RankInfo {
            rank,
            world_size,
            local_rank: rank,
            local_size: world_size,
            source: "explicit",
            launcher_local: None,
        }
    } else {
        let found = LAUNCHERS.iter().find_map(|&(source, r, w, lr, ls)| {
            let (rv, wv) = (get(r)?, get(w)?);
            Some((source, r, rv, w, wv, lr, ls))
        });
        match found {
            None => RankInfo {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                local_size: 1,
                source: "single",
                launcher_local: None,
            },
            Some((source, r, rv, w, wv, lr, ls)) => {
                let rank = parse(r, &rv)?;
                let world_size = parse(w, &wv)?;
                let local_rank = get(lr).map(|v| parse(lr, &v)).transpose()?.unwrap_or(rank);
                // Slurm writes e.g. "4(x2)" per node; take the leading number when present.
                // A per-node list ("4(x2),3": nodes of different sizes) does not say this
                // node's size: taken as not given.
                let given_size = get(ls)
                    .filter(|v| !v.contains(','))
                    .and_then(|v| {
                        v.split(|c: char| !c.is_ascii_digit())
                            .next()
                            .map(str::to_owned)
                    })
                    .filter(|v| !v.is_empty())
                    .map(|v| parse(ls, &v))
                    .transpose()?;
                RankInfo {
                    rank,
                    world_size,
                    local_rank,
                    local_size: given_size.unwrap_or(world_size),
                    source,
                    launcher_local: given_size.map(|s| (local_rank, s)),
                }
            }
        }
    };
    if info.world_size == 0 || info.rank >= info.world_size {
        return Err(Error::InvalidArgument(format!(
            "rank {} is not below world size {} (from {})",
            info.rank, info.world_size, info.source
        )));
    }
    Ok(info)
}

/// [`detect_with`] reading the process environment.
pub fn detect(explicit: Option<(usize, usize)>) -> Result<RankInfo> {
    detect_with(explicit, &|k| std::env::var(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn precedence_and_sources() {
        let env = with(&[
            ("XCCL_RANK", "1"),
            ("XCCL_WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
        ]);
        let i = detect_with(None, &env).unwrap();
        assert_eq!((i.rank, i.world_size, i.source), (1, 4, "xccl"));
        let i = detect_with(Some((2, 3)), &env).unwrap();
        assert_eq!((i.rank, i.world_size, i.source), (2, 3, "explicit"));
        let env = with(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
        ]);
        let i = detect_with(None, &env).unwrap();
        assert_eq!(
            (i.rank, i.world_size, i.local_rank, i.local_size, i.source),
            (3, 8, 1, 2, "torchrun")
        );
        let env = with(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
        ]);
        assert_eq!(detect_with(None, &env).unwrap().source, "openmpi");
        let env = with(&[("PMI_RANK", "0"), ("PMI_SIZE", "2")]);
        assert_eq!(detect_with(None, &env).unwrap().source, "pmi");
        let env = with(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "6"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "2(x3)"),
        ]);
        let i = detect_with(None, &env).unwrap();
        assert_eq!(
            (i.rank, i.local_rank, i.local_size, i.source),
            (5, 1, 2, "slurm")
        );
        assert_eq!(detect_with(None, &with(&[])).unwrap().source, "single");
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(detect_with(None, &with(&[("XCCL_RANK", "x"), ("XCCL_WORLD_SIZE", "2")])).is_err());
        assert!(detect_with(None, &with(&[("XCCL_RANK", "2"), ("XCCL_WORLD_SIZE", "2")])).is_err());
        assert!(detect_with(Some((0, 0)), &with(&[])).is_err());
    }
}
