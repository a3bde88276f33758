//! What an MoE buffer counts as it works: (token, expert) rows dispatched per logical expert
//! and time waited on each peer, per phase; summed over ranks by [`MoeStats::job_expert_rows`].

use super::eplb::ExpertMap;
use crate::coll::{Coll, ReduceOp};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of one rank's buffer since it was made or its statistics were taken.
///
/// ```no_run
/// # fn main() -> xccl::Result<()> {
/// # use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
/// let comm = xccl::Communicator::from_env()?;
/// let coll = xccl::coll::Coll::new(&comm)?;
/// let mut buf = MoeBuffer::new(&comm, MoeConfig::new(64, 7168, 8, 128, Dtype::Bf16))?;
/// // ... some steps of dispatch and combine ...
/// let window = buf.take_stats(); // this rank's counts, and a fresh window
/// let job = window.job_expert_rows(&coll)?; // collective: summed over ranks
/// let slowest = window.waited_dispatch().iter().enumerate().max_by_key(|(_, d)| **d);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MoeStats {
    steps: u64,
    expert_rows: Vec<u64>,
    /// Nanoseconds waited per peer: dispatch announcements, then combine's.
    waited: [Vec<AtomicU64>; 2],
}

impl Clone for MoeStats {
    fn clone(&self) -> Self {
        let copy = |v: &Vec<AtomicU64>| {
            v.iter()
                .map(|a| AtomicU64::new(a.load(Ordering::Relaxed)))
                .collect()
        };
        MoeStats {
            steps: self.steps,
            expert_rows: self.expert_rows.clone(),
            waited: [copy(&self.waited[0]), copy(&self.waited[1])],
        }
    }
}

impl MoeStats {
    /// Zero counters for `experts` logical experts and `world` ranks.
    pub(crate) fn new(experts: usize, world: usize) -> Self {
        let zeros = || (0..world).map(|_| AtomicU64::new(0)).collect();
        MoeStats {
            steps: 0,
            expert_rows: vec![0; experts],
            waited: [zeros(), zeros()],
        }
    }

    /// Counts one dispatch from its rows per slot of `map` (`per_slot`).
    pub(crate) fn dispatched(&mut self, per_slot: &[usize], map: &ExpertMap) {
        self.steps += 1;
        if map.is_identity() {
            for (a, &b) in self.expert_rows.iter_mut().zip(per_slot) {
                *a += b as u64;
            }
            return;
        }
        for (s, &b) in per_slot.iter().enumerate().filter(|&(_, &b)| b > 0) {
            if let Some(e) = map.logical(s) {
                self.expert_rows[e] += b as u64;
            }
        }
    }

    /// Adds `d` to the time waited on `src` in `phase` (0 dispatch, 1 combine). Relaxed:
    /// a counter read only by this rank's own calls.
    pub(crate) fn waited(&self, phase: usize, src: usize, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.waited[phase.min(1)][src].fetch_add(ns, Ordering::Relaxed);
    }

    /// Dispatches counted.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// (token, expert) rows this rank dispatched, per logical expert.
    pub fn expert_rows(&self) -> &[u64] {
        &self.expert_rows
    }

    fn times(&self, phase: usize) -> Vec<Duration> {
        self.waited[phase]
            .iter()
            .map(|a| Duration::from_nanos(a.load(Ordering::Relaxed)))
            .collect()
    }

    /// Per peer: how long this rank's dispatches waited for that peer's rows to be announced
    /// (a slow peer, or one with more to send, stands out).
    pub fn waited_dispatch(&self) -> Vec<Duration> {
        self.times(0)
    }

    /// Per peer: how long this rank's combines waited for that peer's expert output.
    pub fn waited_combine(&self) -> Vec<Duration> {
        self.times(1)
    }

    /// Collective: [`Self::expert_rows`] summed over every rank (the job-wide load of each
    /// expert over the window these statistics cover).
    pub fn job_expert_rows(&self, coll: &Coll<'_>) -> Result<Vec<u64>> {
        let mut all = self.expert_rows.clone();
        coll.allreduce(&mut all, ReduceOp::Sum)?;
        Ok(all)
    }

    /// Adds `other` (the same experts and ranks) into these counters.
    pub fn merge(&mut self, other: &MoeStats) -> Result<()> {
        if other.expert_rows.len() != self.expert_rows.len()
            || other.waited[0].len() != self.waited[0].len()
        {
            return Err(Error::InvalidArgument(format!(
                "statistics of {} experts and {} ranks added to ones of {} and {}",
                other.expert_rows.len(),
                other.waited[0].len(),
                self.expert_rows.len(),
                self.waited[0].len()
            )));
        }
        self.steps += other.steps;
        for (a, b) in self.expert_rows.iter_mut().zip(&other.expert_rows) {
            *a += b;
        }
        for phase in 0..2 {
            for (a, b) in self.waited[phase].iter().zip(&other.waited[phase]) {
                a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
