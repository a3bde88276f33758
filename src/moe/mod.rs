//! Mixture-of-Experts token dispatch and combine: configuration, DeepEP-style dispatch
//! layout, a normal-mode buffer that moves token rows with one copy per byte
//! ([`MoeBuffer`]), and a low-latency one for decode batches ([`LowLatencyBuffer`]: the same
//! transfer, a fixed maximum batch, rows handed out grouped by expert); either can
//! dispatch bf16/f16 rows as INT8 ([`quant`]). [`Dispatcher`] holds either mode behind one
//! type and runs the same expert code in both; every buffer takes typed rows (`f32`,
//! `half::bf16`, `half::f16`: [`Element`]) beside bytes.
//!
//! ```no_run
//! # fn main() -> xccl::Result<()> {
//! use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
//! let comm = xccl::Communicator::from_env()?;
//! let cfg = MoeConfig::new(64, 7168, 8, 4096, Dtype::Bf16);
//! let mut buf = MoeBuffer::new(&comm, cfg)?;
//! # let (x, topk_idx, topk_w): (Vec<u8>, Vec<i64>, Vec<f32>) = (vec![], vec![], vec![]);
//! let view = buf.dispatch(&x, &topk_idx, &topk_w)?;
//! let rows = view.rows()?; // grouped by source rank, each with its local experts and weights
//! # let reduced: Vec<u8> = vec![];
//! drop(rows);
//! let mut out = vec![0u8; x.len()];
//! buf.combine(&reduced, &mut out)?;
//! # Ok(()) }
//! ```

mod config;
mod dispatcher;
mod element;
mod eplb;
mod inputs;
mod layout;
mod low_latency;
mod normal;
pub mod quant;
mod record;
mod scale;
mod stats;
mod sum;
#[cfg(target_arch = "x86_64")]
mod sum_avx2;
mod typed;

pub use config::{Dtype, MoeConfig, TwoLevel};
pub use dispatcher::{Dispatched, Dispatcher, Mode};
pub use element::Element;
pub use eplb::{
    imbalance, load_bound, move_weights, rebalance, replica_counts, weight_moves, ControllerConfig,
    EplbController, ExpertMap, MapShape, ReplicaPolicy, WeightMove,
};
pub use layout::{dispatch_layout, Layout};
pub use low_latency::{ExpertRow, LowLatencyBuffer, LowLatencyView};
pub use normal::{DispatchView, MoeBuffer, RecvRow};
pub use scale::scale_row;
pub use stats::MoeStats;
pub use sum::sum_rows;

/// A combine needs a dispatch that has not been combined yet (one combine per dispatch, in
/// both modes); otherwise the caller's call order is wrong.
fn check_combinable(dispatched: bool) -> crate::Result<()> {
    if dispatched {
        Ok(())
    } else {
        Err(crate::Error::InvalidUsage(
            "combine without a dispatch to combine (one combine per dispatch)".into(),
        ))
    }
}
