//! Routing to replicas: each (token, logical expert) of a dispatch resolved to one physical
//! slot of the [`ExpertMap`], by a [`ReplicaPolicy`].

use super::map::ExpertMap;
use crate::error::{Error, Result};
use crate::moe::layout::chosen_expert;

/// How a dispatch picks one replica of a logical expert for each (token, expert).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicaPolicy {
    /// The `j`-th row of expert `e` a rank sends in a call goes to replica
    /// `(j + rank) mod replicas(e)`: no communication, the same choice on every run, and
    /// each rank splits its rows of an expert over the replicas evenly (within one).
    #[default]
    Rotate,
    /// The replica on this rank if there is one, else those on this host (rotating among
    /// them as `Rotate` does), else all of them (rotating). Needs
    /// [`crate::moe::MoeConfig::ranks_per_host`].
    LocalFirst,
    /// Keep each token on as few ranks as it can: experts with one replica fix where the
    /// token goes; each other expert takes a replica on this rank or on a rank the token
    /// already goes to (rotating among them), else any replica (rotating). Fewer bytes than
    /// `Rotate`, a less even split.
    FewestRanks,
}

/// An expert map as one rank routes through it: the map, the rank of every slot (the
/// placement dispatch lays tokens out by) and this rank's logical experts, ascending, with
/// the slot of each.
#[derive(Debug, Clone)]
pub(crate) struct Routing {
    pub map: ExpertMap,
    pub slot_rank: Vec<usize>,
    pub local_experts: Vec<usize>,
    pub local_slots: Vec<usize>,
}

impl Routing {
    /// The tables of `map` for rank `me`.
    pub fn new(map: ExpertMap, me: usize) -> Self {
        let spr = map.slots_per_rank();
        let mut local: Vec<(usize, usize)> = (me * spr..(me + 1) * spr)
            .filter_map(|s| map.logical(s).map(|e| (e, s)))
            .collect();
        local.sort_unstable();
        Routing {
            slot_rank: (0..map.slot_count()).map(|s| map.rank_of_slot(s)).collect(),
            local_experts: local.iter().map(|&(e, _)| e).collect(),
            local_slots: local.iter().map(|&(_, s)| s).collect(),
            map,
        }
    }
}

/// Per-buffer routing state, reused by every call: the slots a call resolved to and the
/// per-expert row counters of the call.
#[derive(Debug, Default)]
pub(crate) struct Router {
    /// Rows of each logical expert this call has routed so far.
    seen: Vec<u32>,
    /// The call's `topk_idx` with slots for logical experts (`-1` kept).
    pub slots: Vec<i64>,
    /// Scratch: the replicas a choice rotates over.
    candidates: Vec<u32>,
    /// Scratch (`FewestRanks`): the ranks the current token goes to.
    visits: Vec<usize>,
}

impl Router {
    /// Resolves `topk_idx` (logical experts, `-1` = none; `topk` per token) into
    /// [`Router::slots`], checking every id and that no token names an expert twice.
    pub fn resolve(
        &mut self,
        map: &ExpertMap,
        policy: ReplicaPolicy,
        (me, ranks_per_host): (usize, Option<usize>),
        topk_idx: &[i64],
        topk: usize,
    ) -> Result<()> {
        let experts = map.experts();
        if topk == 0 || topk_idx.len() % topk != 0 {
            return Err(Error::InvalidArgument(format!(
                "topk_idx has {} entries, not a multiple of top-k {topk}",
                topk_idx.len()
            )));
        }
        self.seen.clear();
        self.seen.resize(experts, 0);
        self.slots.clear();
        for (t, row) in topk_idx.chunks(topk).enumerate() {
            if policy == ReplicaPolicy::FewestRanks {
                self.visits.clear();
                self.visits.push(me);
                for &e in row {
                    if let Ok(e) = usize::try_from(e) {
                        if let [only] = map.replicas(e) {
                            self.visits.push(map.rank_of_slot(*only as usize));
                        }
                    }
                }
            }
            for j in 0..row.len() {
                let Some(e) = chosen_expert(t, row, j, experts)? else {
                    self.slots.push(-1);
                    continue;
                };
                let reps = map.replicas(e);
                if let [only] = reps {
                    self.slots.push(*only as i64);
                    continue;
                }
                let turn = self.seen[e] as usize + me;
                self.seen[e] += 1;
                let slot = self.choose(map, policy, reps, turn, (me, ranks_per_host));
                self.slots.push(slot as i64);
            }
        }
        Ok(())
    }
}

impl Router {
    /// The replica among `reps` (at least two) for this rank's `turn`-th row of their expert.
    fn choose(
        &mut self,
        map: &ExpertMap,
        policy: ReplicaPolicy,
        reps: &[u32],
        turn: usize,
        (me, ranks_per_host): (usize, Option<usize>),
    ) -> u32 {
        let rank = |s: u32| map.rank_of_slot(s as usize);
        self.candidates.clear();
        match policy {
            ReplicaPolicy::Rotate => {}
            ReplicaPolicy::FewestRanks => {
                let visits = &self.visits;
                (self.candidates).extend(reps.iter().filter(|&&s| visits.contains(&rank(s))));
            }
            ReplicaPolicy::LocalFirst => {
                if let Some(&s) = reps.iter().find(|&&s| rank(s) == me) {
                    return s;
                }
                if let Some(h) = ranks_per_host {
                    (self.candidates).extend(reps.iter().filter(|&&s| rank(s) / h == me / h));
                }
            }
        }
        let s = match self.candidates.is_empty() {
            true => reps[turn % reps.len()],
            false => self.candidates[turn % self.candidates.len()],
        };
        if policy == ReplicaPolicy::FewestRanks {
            self.visits.push(rank(s));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ExpertMap {
        // 3 experts on 4 ranks of 2 slots (2 hosts of 2 ranks); expert 0 on every rank.
        let s = |e| Some(e);
        ExpertMap::new(
            3,
            4,
            vec![s(0), s(1), s(0), s(2), s(0), None, s(0), None],
            0,
        )
        .unwrap()
    }

    #[test]
    fn rotate_splits_evenly_and_local_first_stays_close() {
        let m = map();
        let mut r = Router::default();
        // 8 tokens of top-1 expert 0 from rank 1: its 4 replicas get 2 each.
        let idx = vec![0i64; 8];
        r.resolve(&m, ReplicaPolicy::Rotate, (1, None), &idx, 1)
            .unwrap();
        let mut per = [0; 8];
        for &s in &r.slots {
            per[s as usize] += 1;
        }
        assert_eq!(per, [2, 0, 2, 0, 2, 0, 2, 0]);
        assert_eq!(r.slots[0], 2); // (0 + rank 1) mod 4 = replica 1 = slot 2
                                   // Local first: rank 1 holds expert 0 in slot 2; expert 2 is on rank 1 as well.
        r.resolve(
            &m,
            ReplicaPolicy::LocalFirst,
            (1, Some(2)),
            &[0, 2, 1, -1],
            2,
        )
        .unwrap();
        assert_eq!(r.slots, vec![2, 3, 1, -1]);
        // Rank 3 (host 1) has no expert 2 on its host: any replica (the only one).
        r.resolve(&m, ReplicaPolicy::LocalFirst, (3, Some(2)), &[2, 0], 2)
            .unwrap();
        assert_eq!(r.slots, vec![3, 6]);
    }

    #[test]
    fn bad_ids_are_refused() {
        let m = map();
        let mut r = Router::default();
        assert!(r
            .resolve(&m, ReplicaPolicy::Rotate, (0, None), &[3, 0], 2)
            .is_err());
        assert!(r
            .resolve(&m, ReplicaPolicy::Rotate, (0, None), &[1, 1], 2)
            .is_err());
        assert!(r
            .resolve(&m, ReplicaPolicy::Rotate, (0, None), &[-2, 1], 2)
            .is_err());
        assert!(r
            .resolve(&m, ReplicaPolicy::Rotate, (0, None), &[1, 1, 0], 2)
            .is_err());
    }
}
