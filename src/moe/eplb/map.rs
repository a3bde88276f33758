//! The placement map: a fixed number of physical expert slots per rank, each holding one
//! logical expert (or nothing), every logical expert in at least one slot.

use crate::error::{Error, Result};

/// Marks an empty slot in [`ExpertMap`]'s table.
const EMPTY: u32 = u32::MAX;

/// Physical expert slots and the logical expert each holds: slot `s` lives on rank
/// `s / slots_per_rank`. Every logical expert has at least one replica, and the replicas
/// of one expert are on different ranks. A map is a plain value: every rank must hold the
/// same one (a buffer checks that when it takes one), and its `version` is stamped on every
/// dispatch so a rank still on another map is refused.
///
/// ```
/// use xccl::moe::ExpertMap;
/// // 4 experts on 2 ranks with 3 slots each: expert 0 is hot and has a replica on each rank.
/// let map = ExpertMap::new(4, 2, vec![Some(0), Some(1), Some(2), Some(0), Some(3), None], 1)?;
/// assert_eq!(map.replicas(0), &[0, 3]);
/// assert_eq!(map.rank_of_slot(4), 1);
/// assert_eq!(map.logical(4), Some(3));
/// # Ok::<(), xccl::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertMap {
    experts: usize,
    ranks: usize,
    slots_per_rank: usize,
    /// The logical expert of every slot, `EMPTY` for none.
    slots: Vec<u32>,
    version: u64,
    /// Per logical expert `e`: its slots, ascending, are
    /// `replica_slots[replica_start[e]..replica_start[e + 1]]` (derived from `slots`; one flat
    /// table, read by every dispatch).
    replica_start: Vec<u32>,
    replica_slots: Vec<u32>,
    /// Slot `e` holds expert `e`, for every expert, and no slot holds another.
    identity: bool,
}

impl ExpertMap {
    /// A map of `experts` logical experts over `ranks` ranks, `slots.len() / ranks` slots
    /// per rank, slot `s` holding `slots[s]`. Refused (`InvalidArgument`): no ranks or
    /// slots, a slot count that is not a multiple of `ranks`, an expert id out of range, an
    /// expert without a replica, two replicas of one expert on one rank.
    pub fn new(
        experts: usize,
        ranks: usize,
        slots: Vec<Option<usize>>,
        version: u64,
    ) -> Result<Self> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("expert map: {what}")));
        if experts == 0 || ranks == 0 || slots.is_empty() || slots.len() % ranks != 0 {
            return bad(format!(
                "{} slots for {ranks} ranks and {experts} experts (need at least one of each, \
                 and the same number of slots on every rank)",
                slots.len()
            ));
        }
        if experts > super::super::config::MAX_EXPERTS || slots.len() > u32::MAX as usize / 2 {
            return bad(format!("{experts} experts in {} slots", slots.len()));
        }
        let slots_per_rank = slots.len() / ranks;
        let mut replicas = vec![Vec::new(); experts];
        for (s, e) in slots.iter().enumerate() {
            let Some(e) = *e else { continue };
            if e >= experts {
                return bad(format!("slot {s} holds expert {e} of {experts}"));
            }
            let reps: &mut Vec<u32> = &mut replicas[e];
            if let Some(&other) = reps.last() {
                if other as usize / slots_per_rank == s / slots_per_rank {
                    return bad(format!(
                        "expert {e} twice on rank {} (slots {other} and {s})",
                        s / slots_per_rank
                    ));
                }
            }
            reps.push(s as u32);
        }
        if let Some(e) = replicas.iter().position(Vec::is_empty) {
            return bad(format!("expert {e} has no replica"));
        }
        let mut replica_start = Vec::with_capacity(experts + 1);
        replica_start.push(0);
        for r in &replicas {
            replica_start.push(replica_start[replica_start.len() - 1] + r.len() as u32);
        }
        Ok(ExpertMap {
            experts,
            ranks,
            slots_per_rank,
            slots: slots
                .iter()
                .map(|e| e.map_or(EMPTY, |e| e as u32))
                .collect(),
            version,
            replica_start,
            identity: replicas
                .iter()
                .enumerate()
                .all(|(e, r)| r[..] == [e as u32]),
            replica_slots: replicas.concat(),
        })
    }

    /// The map of a placement without replicas: expert `e` on rank `placement[e]`, each
    /// rank's experts in id order in its first slots, as many slots per rank as the fullest
    /// rank needs (the others' last slots empty).
    pub fn from_placement(placement: &[usize], ranks: usize) -> Result<Self> {
        let mut per_rank = vec![Vec::new(); ranks];
        for (e, &r) in placement.iter().enumerate() {
            match per_rank.get_mut(r) {
                Some(list) => list.push(e),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "expert {e} placed on rank {r} of {ranks}"
                    )))
                }
            }
        }
        let spr = per_rank.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut slots = vec![None; ranks * spr];
        for (r, list) in per_rank.iter().enumerate() {
            for (j, &e) in list.iter().enumerate() {
                slots[r * spr + j] = Some(e);
            }
        }
        ExpertMap::new(placement.len(), ranks, slots, 0)
    }

    /// Whether slot `e` holds expert `e` for every expert and nothing else is held (the
    /// contiguous placement): dispatch then needs no routing pass.
    pub fn is_identity(&self) -> bool {
        self.identity
    }

    /// Logical experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Slots on every rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    /// Slots in all (`ranks × slots_per_rank`).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The version the map was made with (stamped on every dispatch through it).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The same map under another version.
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// The logical expert in slot `s` (`None`: empty, or no such slot).
    pub fn logical(&self, s: usize) -> Option<usize> {
        self.slots
            .get(s)
            .filter(|&&e| e != EMPTY)
            .map(|&e| e as usize)
    }

    /// The rank slot `s` lives on.
    pub fn rank_of_slot(&self, s: usize) -> usize {
        s / self.slots_per_rank
    }

    /// The slots holding logical expert `e`, ascending (empty for an unknown expert).
    pub fn replicas(&self, e: usize) -> &[u32] {
        match self.replica_start.get(e..e + 2) {
            Some(&[from, to]) => &self.replica_slots[from as usize..to as usize],
            _ => &[],
        }
    }

    /// The logical experts on rank `r`, in slot order (empty slots skipped).
    pub fn experts_on(&self, r: usize) -> impl Iterator<Item = usize> + '_ {
        let spr = self.slots_per_rank;
        (r * spr..(r + 1) * spr).filter_map(|s| self.logical(s))
    }

    /// Every slot's expert, as given to [`ExpertMap::new`].
    pub fn slots(&self) -> Vec<Option<usize>> {
        (0..self.slots.len()).map(|s| self.logical(s)).collect()
    }

    /// Replicas beyond the first of each expert.
    pub fn extra_replicas(&self) -> usize {
        self.replica_slots.len() - self.experts
    }

    /// A 64-bit digest of the whole map (experts, ranks, slots, version): ranks holding maps
    /// with the same fingerprint hold the same map.
    pub fn fingerprint(&self) -> u64 {
        let mut text = format!(
            "expert map v{} {} experts {} ranks {} slots:",
            self.version, self.experts, self.ranks, self.slots_per_rank
        );
        for &e in &self.slots {
            text.push_str(&format!(" {}", e as i64 - (e == EMPTY) as i64 * (1 << 32)));
        }
        crate::control::fingerprint(&text)
    }

    /// Each rank's expected load when every expert's `load` is split evenly over its
    /// replicas (what rotating routing does). `load` has one entry per logical expert.
    pub fn rank_loads(&self, load: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.ranks];
        for (s, &e) in self.slots.iter().enumerate() {
            if e != EMPTY {
                let e = e as usize;
                out[self.rank_of_slot(s)] += load[e] / self.replicas(e).len() as f64;
            }
        }
        out
    }

    /// Slots whose expert differs from `old`'s (every slot when the shapes differ): the
    /// slots whose weights must move to switch from `old` to this map.
    pub fn changed_slots(&self, old: &ExpertMap) -> Vec<usize> {
        if old.slots.len() != self.slots.len() || old.ranks != self.ranks {
            return (0..self.slots.len()).collect();
        }
        (0..self.slots.len())
            .filter(|&s| self.slots[s] != old.slots[s] && self.slots[s] != EMPTY)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_maps_are_refused() {
        // No replica for expert 2.
        assert!(ExpertMap::new(3, 2, vec![Some(0), Some(1), Some(0), None], 0).is_err());
        // Expert id out of range.
        assert!(ExpertMap::new(2, 1, vec![Some(0), Some(2)], 0).is_err());
        // Two replicas on one rank.
        assert!(ExpertMap::new(2, 1, vec![Some(0), Some(0), Some(1)], 0).is_err());
        // Slots that do not divide over the ranks.
        assert!(ExpertMap::new(2, 2, vec![Some(0), Some(1), None], 0).is_err());
        assert!(ExpertMap::new(1, 0, vec![], 0).is_err());
    }

    #[test]
    fn placement_maps_and_fingerprints() {
        let m = ExpertMap::from_placement(&[0, 1, 0, 1, 1], 2).unwrap();
        assert_eq!(m.slots_per_rank(), 3);
        assert_eq!(m.experts_on(0).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(m.experts_on(1).collect::<Vec<_>>(), vec![1, 3, 4]);
        assert_eq!(m.logical(2), None);
        assert_eq!(m.rank_loads(&[1.0, 2.0, 3.0, 4.0, 5.0]), vec![4.0, 11.0]);
        let v2 = m.clone().with_version(2);
        assert_ne!(m.fingerprint(), v2.fingerprint());
        assert_eq!(m.fingerprint(), m.clone().fingerprint());
        assert!(m.changed_slots(&m).is_empty());
        assert!(ExpertMap::from_placement(&[0, 2], 2).is_err());
    }
}
