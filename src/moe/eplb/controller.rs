//! Online rebalancing: a controller the caller ticks once per step with that step's
//! job-wide load; every N steps, or when the current map leaves the busiest rank too far
//! above the mean, it proposes a new map. It decides nothing by itself: the caller applies
//! a proposal with `set_map` (and moves the weights).

use super::map::ExpertMap;
use super::rebalance::{check_load, rebalance, MapShape};
use crate::error::{Error, Result};

/// When to propose a new map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControllerConfig {
    /// The shape of the maps it proposes.
    pub shape: MapShape,
    /// Propose after this many steps since the last proposal (0: never by count).
    pub every: u64,
    /// Propose when the current map's busiest rank carries more than this factor times the
    /// mean rank load, over the steps since the last proposal (`None`: never by imbalance).
    pub max_imbalance: Option<f64>,
    /// Steps to see before an imbalance counts (a few steps of load are noise).
    pub min_steps: u64,
}

/// Accumulates per-step load and proposes maps (see the module docs). Every rank that feeds
/// it the same job-wide loads (for example [`crate::moe::MoeStats::job_expert_rows`] of each
/// step) proposes the same map at the same step.
///
/// ```
/// use xccl::moe::{ControllerConfig, EplbController, ExpertMap, MapShape};
/// let current = ExpertMap::from_placement(&[0, 0, 1, 1], 2)?;
/// let shape = MapShape { ranks: 2, slots_per_rank: 3, ranks_per_host: None };
/// let cfg = ControllerConfig { shape, every: 0, max_imbalance: Some(1.2), min_steps: 2 };
/// let mut ctl = EplbController::new(4, cfg)?;
/// assert!(ctl.tick(&[90, 10, 5, 5], &current)?.is_none()); // one step: too early
/// let map = ctl.tick(&[90, 10, 5, 5], &current)?.expect("rank 0 carries 1.8x the mean");
/// assert!(map.replicas(0).len() == 2);
/// # Ok::<(), xccl::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct EplbController {
    cfg: ControllerConfig,
    load: Vec<f64>,
    steps: u64,
    proposals: u64,
}

impl EplbController {
    /// A controller for `experts` logical experts.
    pub fn new(experts: usize, cfg: ControllerConfig) -> Result<Self> {
        if let Some(f) = cfg.max_imbalance {
            if !f.is_finite() || f < 1.0 {
                return Err(Error::InvalidArgument(format!(
                    "imbalance trigger {f} (a factor of at least 1)"
                )));
            }
        }
        // The shape is checked as rebalancing would.
        rebalance(&vec![0.0; experts], &cfg.shape, None)?;
        Ok(EplbController {
            cfg,
            load: vec![0.0; experts],
            steps: 0,
            proposals: 0,
        })
    }

    /// Steps since the last proposal.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Maps proposed so far.
    pub fn proposals(&self) -> u64 {
        self.proposals
    }

    /// The busiest rank's load over the mean under `map` for the load accumulated since the
    /// last proposal (1 with no load).
    pub fn imbalance(&self, map: &ExpertMap) -> f64 {
        imbalance(&map.rank_loads(&self.load))
    }

    /// One step: adds its job-wide `load` (rows per logical expert) and returns a new map
    /// when one is due (then starts accumulating afresh), built with `current` as the map
    /// in use.
    pub fn tick(&mut self, load: &[u64], current: &ExpertMap) -> Result<Option<ExpertMap>> {
        let step: Vec<f64> = load.iter().map(|&v| v as f64).collect();
        check_load(&step, self.load.len())?;
        for (a, b) in self.load.iter_mut().zip(&step) {
            *a += b;
        }
        self.steps += 1;
        let by_count = self.cfg.every > 0 && self.steps >= self.cfg.every;
        let by_load = self.steps >= self.cfg.min_steps.max(1)
            && self
                .cfg
                .max_imbalance
                .is_some_and(|f| self.imbalance(current) > f);
        if !(by_count || by_load) {
            return Ok(None);
        }
        let map = rebalance(&self.load, &self.cfg.shape, Some(current))?;
        self.load.iter_mut().for_each(|v| *v = 0.0);
        self.steps = 0;
        self.proposals += 1;
        Ok(Some(map))
    }
}

/// The largest entry over the mean (1 for no load).
pub fn imbalance(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    if total <= 0.0 || loads.is_empty() {
        return 1.0;
    }
    loads.iter().cloned().fold(0.0, f64::max) / (total / loads.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> MapShape {
        MapShape {
            ranks: 2,
            slots_per_rank: 3,
            ranks_per_host: None,
        }
    }

    #[test]
    fn proposes_by_count_and_by_imbalance_then_starts_afresh() {
        let current = ExpertMap::from_placement(&[0, 0, 1, 1], 2).unwrap();
        // By count: every 3 steps, whatever the load.
        let cfg = ControllerConfig {
            shape: shape(),
            every: 3,
            max_imbalance: None,
            min_steps: 1,
        };
        let mut ctl = EplbController::new(4, cfg).unwrap();
        let even = [10, 10, 10, 10];
        assert!(ctl.tick(&even, &current).unwrap().is_none());
        assert!(ctl.tick(&even, &current).unwrap().is_none());
        let map = ctl.tick(&even, &current).unwrap().expect("the third step");
        assert_eq!((map.version(), ctl.steps(), ctl.proposals()), (1, 0, 1));
        // By imbalance: balanced load never triggers, a hot rank does after `min_steps`.
        let cfg = ControllerConfig {
            shape: shape(),
            every: 0,
            max_imbalance: Some(1.25),
            min_steps: 2,
        };
        let mut ctl = EplbController::new(4, cfg).unwrap();
        for _ in 0..10 {
            assert!(ctl.tick(&even, &current).unwrap().is_none());
        }
        assert_eq!(ctl.imbalance(&current), 1.0);
        let hot = [100, 10, 10, 10];
        // Accumulated: 1,100+... the ten even steps dilute the first hot one.
        let mut steps = 0;
        let map = loop {
            steps += 1;
            if let Some(m) = ctl.tick(&hot, &current).unwrap() {
                break m;
            }
            assert!(steps < 20, "never proposed");
        };
        assert!(steps > 1, "one hot step among ten even ones is not enough");
        let after = imbalance(&map.rank_loads(&[100.0, 10.0, 10.0, 10.0]));
        assert!(after < 1.25, "the proposal balances the load: {after}");
        assert_eq!(ctl.steps(), 0);
    }

    #[test]
    fn bad_input_is_refused() {
        let cfg = ControllerConfig {
            shape: shape(),
            every: 1,
            max_imbalance: Some(0.5),
            min_steps: 1,
        };
        assert!(EplbController::new(4, cfg).is_err());
        let cfg = ControllerConfig {
            max_imbalance: None,
            ..cfg
        };
        assert!(EplbController::new(7, cfg).is_err()); // 7 experts in 6 slots
        let mut ctl = EplbController::new(4, cfg).unwrap();
        let current = ExpertMap::from_placement(&[0, 0, 1, 1], 2).unwrap();
        assert!(ctl.tick(&[1, 2, 3], &current).is_err());
        // The controller still works.
        assert!(ctl.tick(&[1, 2, 3, 4], &current).unwrap().is_some());
    }
}
