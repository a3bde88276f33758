//! Expert placement load balancing (EPLB): a placement map with replicas
//! ([`ExpertMap`]) and the function that computes one from measured load ([`rebalance`]).

mod map;
mod rebalance;

pub use map::ExpertMap;
pub(crate) use rebalance::check_load;
pub use rebalance::{load_bound, rebalance, replica_counts, MapShape};
