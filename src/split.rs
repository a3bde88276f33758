//! New communicators from an existing one: `split` by colour and key, and `dup`. The parent's
//! control exchange decides the groups and carries the one all-gather each backend needs to
//! build the group's transport, so no rendezvous store is involved.

use crate::control::{Kind, WORDS};
use crate::error::{Error, Result};
use crate::transport::GroupSpec;
use crate::Communicator;
use std::sync::atomic::Ordering;

/// The colour word of a rank that joins no group.
const NO_COLOUR: u64 = u64::MAX;
/// Flags of the setup exchange: the rank is in no group, it gives its words, or its backend
/// failed before it could.
const SETUP_NONE: u64 = 0;
const SETUP_OK: u64 = 1;
const SETUP_FAILED: u64 = 2;

impl Communicator {
    /// Collective over this communicator: ranks that give the same `colour` form a new
    /// communicator, ordered by `key` (ties by rank here); `None` joins none and returns
    /// `None`. The new one has its own transport of the same backend and settings, its own
    /// signals and windows, and is used and closed independently of this one, which stays
    /// usable meanwhile (as with `MPI_Comm_split`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use xccl::{transport::loopback::Loopback, Communicator};
    ///
    /// let ranks = Loopback::create(4).unwrap();
    /// std::thread::scope(|s| {
    ///     for t in ranks {
    ///         s.spawn(move || {
    ///             let comm = Communicator::from_transport(Box::new(t), Duration::from_secs(10))?;
    ///             let half = comm.split(Some(comm.rank() as u32 % 2), 0)?.unwrap();
    ///             assert_eq!((half.rank(), half.world_size()), (comm.rank() / 2, 2));
    ///             half.barrier()?;
    ///             Ok::<(), xccl::Error>(())
    ///         });
    ///     }
    /// });
    /// ```
    pub fn split(&self, colour: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let colour = colour.map_or(NO_COLOUR, u64::from);
        let mut id = [0u8; 16];
        crate::bootstrap::fill_random(&mut id);
        let id = [
            u64::from_le_bytes(id[..8].try_into().expect("8")),
            u64::from_le_bytes(id[8..].try_into().expect("8")),
        ];
        let seq = self.splits.fetch_add(1, Ordering::Relaxed);
        let all = self.exchange_words(Kind::Split, [colour, key as u64, id[0], id[1]])?;
        if colour == NO_COLOUR {
            // Still part of the parent's collective: the members' setup exchange.
            self.exchange_words(Kind::SplitSetup, [SETUP_NONE; WORDS])?;
            return Ok(None);
        }
        let mut members: Vec<usize> = (0..all.len()).filter(|&r| all[r][0] == colour).collect();
        members.sort_by_key(|&r| (all[r][1] as i64, r));
        let rank = members
            .iter()
            .position(|&r| r == self.rank())
            .expect("a member");
        let first = all[members[0]];
        let group = GroupSpec {
            members: members.clone(),
            rank,
            id: [first[2] ^ seq, first[3]],
        };
        let mut exchanged = false;
        let built = {
            let mut exchange = |words: [u64; 2]| -> Result<Vec<[u64; 2]>> {
                if exchanged {
                    return Err(Error::InvalidUsage(
                        "a backend's split may exchange only once".into(),
                    ));
                }
                exchanged = true;
                self.group_exchange(&members, [SETUP_OK, words[0], words[1], 0])
            };
            self.transport().split(&group, &mut exchange)
        };
        if !exchanged {
            // The backend failed before its exchange; the others still wait for it.
            let _ = self.group_exchange(&members, [SETUP_FAILED, 0, 0, 0]);
        }
        let transport = built?;
        // The members' hosts as the parent knows them, renumbered.
        let ids: Vec<String> = (members.iter())
            .map(|&m| self.hosts().host_of(m).to_string())
            .collect();
        let hosts = crate::bootstrap::Hosts::from_ids(&ids);
        let (local_rank, local_size) = hosts.local(rank);
        let info = crate::bootstrap::RankInfo {
            rank,
            world_size: members.len(),
            local_rank,
            local_size,
            source: "split",
            launcher_local: None,
        };
        Communicator::with_info(transport, info, hosts, self.timeout()).map(Some)
    }

    /// Collective: a new communicator of the same ranks in the same order, independent of
    /// this one (for a library that wants its own).
    pub fn dup(&self) -> Result<Communicator> {
        Ok(self
            .split(Some(0), self.rank() as i64)?
            .expect("every rank gives colour 0"))
    }

    /// The setup exchange of a split: the parent's all-gather, read for `members` only; a
    /// member whose backend failed fails everyone's.
    fn group_exchange(&self, members: &[usize], words: [u64; WORDS]) -> Result<Vec<[u64; 2]>> {
        let all = self.exchange_words(Kind::SplitSetup, words)?;
        members
            .iter()
            .map(|&r| match all[r][0] {
                SETUP_OK => Ok([all[r][1], all[r][2]]),
                _ => Err(Error::InvalidUsage(format!(
                    "rank {r} could not set up its part of the split"
                ))),
            })
            .collect()
    }
}
