//! Moving expert weights when the map changes: each slot whose expert changes gets that
//! expert's weights from a rank that held it under the old map, over point-to-point
//! messages; unchanged slots move nothing.

use super::map::ExpertMap;
use crate::error::{Error, Result};
use crate::p2p::P2p;

/// Tags of weight messages: this prefix, then the slot.
const TAG: u64 = 0xE9_1B << 48;

/// Where the weights of one changing slot come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightMove {
    /// The slot that changes (on `to`).
    pub slot: usize,
    /// The logical expert it holds under the new map.
    pub expert: usize,
    /// The rank sending the weights (held the expert under the old map; `to` itself when
    /// it already held the expert in another slot).
    pub from: usize,
    /// The rank of the slot.
    pub to: usize,
}

/// The moves that switch from `old` to `new` (the same experts and ranks), in slot order;
/// every rank computes the same list. A slot whose new expert its rank already held reads
/// it locally; otherwise the old replicas take turns by slot.
pub fn weight_moves(old: &ExpertMap, new: &ExpertMap) -> Result<Vec<WeightMove>> {
    if old.experts() != new.experts() || old.ranks() != new.ranks() {
        return Err(Error::InvalidArgument(format!(
            "moving weights from a map of {} experts on {} ranks to one of {} on {}",
            old.experts(),
            old.ranks(),
            new.experts(),
            new.ranks()
        )));
    }
    let same_shape = old.slots_per_rank() == new.slots_per_rank();
    let mut moves = Vec::new();
    for slot in 0..new.slot_count() {
        let Some(expert) = new.logical(slot) else {
            continue;
        };
        if same_shape && old.logical(slot) == Some(expert) {
            continue;
        }
        let to = new.rank_of_slot(slot);
        let held: Vec<usize> = old
            .replicas(expert)
            .iter()
            .map(|&s| old.rank_of_slot(s as usize))
            .collect();
        let from = match held.contains(&to) {
            true => to,
            false => held[slot % held.len()],
        };
        moves.push(WeightMove {
            slot,
            expert,
            from,
            to,
        });
    }
    Ok(moves)
}

/// Collective: moves expert weights so that every slot of `new` on this rank holds its
/// expert's weights, `bytes` per expert. `weights(e)` gives this rank's copy of expert `e`
/// (asked only for experts it held under `old`); `install(slot, w)` takes the weights of each
/// of this rank's slots whose expert changed. Returns the bytes this rank received.
///
/// ```no_run
/// # fn main() -> xccl::Result<()> {
/// use xccl::moe::{move_weights, ExpertMap};
/// let comm = xccl::Communicator::from_env()?;
/// let p2p = xccl::p2p::P2p::new(&comm, Default::default())?;
/// # let (old, new): (ExpertMap, ExpertMap) = todo!();
/// let mut experts: Vec<Vec<u8>> = vec![vec![0; 1024]; old.experts()]; // this rank's weights
/// let mut slots: Vec<Vec<u8>> = vec![Vec::new(); new.slot_count()];
/// move_weights(&p2p, &old, &new, 1024, |e| &experts[e][..], |s, w| slots[s] = w.to_vec())?;
/// # Ok(()) }
/// ```
pub fn move_weights<'w>(
    p2p: &P2p<'_>,
    old: &ExpertMap,
    new: &ExpertMap,
    bytes: usize,
    weights: impl Fn(usize) -> &'w [u8],
    mut install: impl FnMut(usize, &[u8]),
) -> Result<usize> {
    let comm = p2p.comm();
    let me = comm.rank();
    if new.ranks() != comm.world_size() {
        return Err(Error::InvalidArgument(format!(
            "a map of {} ranks on a communicator of {}",
            new.ranks(),
            comm.world_size()
        )));
    }
    let moves = weight_moves(old, new)?;
    let sends: Vec<(WeightMove, &[u8])> = moves
        .iter()
        .filter(|m| m.from == me)
        .map(|m| (*m, weights(m.expert)))
        .collect();
    if let Some((m, w)) = sends.iter().find(|(_, w)| w.len() != bytes) {
        return Err(Error::InvalidArgument(format!(
            "weights of expert {} have {} bytes, not {bytes}",
            m.expert,
            w.len()
        )));
    }
    let incoming: Vec<WeightMove> = moves
        .iter()
        .filter(|m| m.to == me && m.from != me)
        .copied()
        .collect();
    let mut landed = vec![vec![0u8; bytes]; incoming.len()];
    let deadline = comm.deadline();
    p2p.scope(|s| {
        let mut recvs = Vec::with_capacity(incoming.len());
        for (m, buf) in incoming.iter().zip(landed.iter_mut()) {
            recvs.push(s.irecv(m.from, TAG | m.slot as u64, buf)?);
        }
        let mut sent = Vec::with_capacity(sends.len());
        for (m, w) in sends.iter().filter(|(m, _)| m.to != me) {
            sent.push(s.isend(m.to, TAG | m.slot as u64, w)?);
        }
        for (m, r) in incoming.iter().zip(recvs) {
            let n = r.wait(deadline)?;
            if n != bytes {
                return Err(Error::ProtocolViolation(format!(
                    "rank {} sent {n} bytes of weights for slot {} ({bytes} expected)",
                    m.from, m.slot
                )));
            }
        }
        for r in sent {
            r.wait(deadline)?;
        }
        Ok(())
    })?;
    for (m, w) in sends.iter().filter(|(m, _)| m.to == me) {
        install(m.slot, w);
    }
    for (m, w) in incoming.iter().zip(&landed) {
        install(m.slot, w);
    }
    Ok(incoming.len() * bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_skip_unchanged_slots_and_prefer_local_copies() {
        let s = |e| Some(e);
        // 3 experts, 2 ranks of 2 slots.
        let old = ExpertMap::new(3, 2, vec![s(0), s(1), s(2), None], 0).unwrap();
        let new = ExpertMap::new(3, 2, vec![s(0), s(2), s(2), s(1)], 1).unwrap();
        let moves = weight_moves(&old, &new).unwrap();
        assert_eq!(
            moves,
            vec![
                WeightMove {
                    slot: 1,
                    expert: 2,
                    from: 1,
                    to: 0
                },
                WeightMove {
                    slot: 3,
                    expert: 1,
                    from: 0,
                    to: 1
                },
            ]
        );
        // Expert 1 moves within rank 0: a local copy.
        let swap = ExpertMap::new(3, 2, vec![s(1), s(0), s(2), None], 1).unwrap();
        let local = weight_moves(&old, &swap).unwrap();
        assert!(local.iter().all(|m| m.from == m.to), "{local:?}");
        assert_eq!(local.len(), 2);
    }
}
