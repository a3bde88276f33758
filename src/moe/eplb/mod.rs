//! Expert placement load balancing (EPLB): a placement map with replicas ([`ExpertMap`]),
//! the function that computes one from measured load ([`rebalance`]), how dispatch picks a
//! replica ([`ReplicaPolicy`]), moving expert weights when the map changes
//! ([`move_weights`]), and a controller that proposes maps online ([`EplbController`]).

mod controller;
mod map;
mod rebalance;
mod route;
mod weights;

pub use controller::{imbalance, ControllerConfig, EplbController};
pub use map::ExpertMap;
pub use rebalance::{load_bound, rebalance, replica_counts, MapShape};
pub use route::ReplicaPolicy;
pub(crate) use route::{Router, Routing};
pub use weights::{move_weights, weight_moves, WeightMove};
