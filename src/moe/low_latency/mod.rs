//! Low-latency MoE dispatch and combine, for decode batches: a fixed maximum batch, buffers
//! sized once at creation, one round per phase, and rows handed to the experts grouped by
//! expert (the input of a grouped expert computation, as DeepEP's low-latency mode).
//!
//! Each token travels once to each rank that holds one of its experts, with the list of that
//! rank's experts and their gate weights (the normal mode's transfer, [`MoeBuffer`]): on a
//! machine where bytes, not messages, set the time, a row per (token, expert) would move up
//! to top-k times the bytes. [`LowLatencyView::expert_rows`] lists, per local expert, the
//! rows that chose it; all the experts of one rank share the token's row where it landed.
//! The rows are combined at the expert rank before they return: the experts write, for each
//! received token, the sum over this rank's experts of weight × output into one row of
//! [`LowLatencyView::output`] ([`crate::moe::Dispatcher`]'s `run_experts` does that sum for
//! experts that return their outputs one by one), and combine brings one row per (token,
//! rank) home, where the rows are added in f32 in rank order: the same bits every run.
//!
//! Measured on two ranks over shared memory (hidden 7168 bf16, top-8 of 64), the previous
//! design — a fixed slot per (expert, source, token), a row per (token, expert) and the
//! weighted sum of the top-k rows at home — moved about 4× the rows of this one and took
//! 4–5× its time at 1 to 32 tokens; and summing eight weighted bf16 rows of 7168 inside
//! combine costs ~4 µs per token on this CPU, more than moving the token's rows.

use super::config::MoeConfig;
use super::eplb::ExpertMap;
use super::normal::{DispatchView, MoeBuffer};
use super::stats::MoeStats;
use crate::error::{Error, Result};
use crate::Communicator;

/// Low-latency dispatch/combine state of one rank. Dropping it (or
/// [`LowLatencyBuffer::close`]) gives its window and signal words back to the communicator;
/// both are collective.
///
/// A decode step: each token's row goes once to each rank holding one of its top-k experts;
/// each local expert reads its rows in place; the experts of a rank write one weighted sum per
/// token; combine adds those up at home.
///
/// ```no_run
/// use xccl::moe::{Dtype, LowLatencyBuffer, MoeConfig};
///
/// let comm = xccl::Communicator::from_env()?;
/// let cfg = MoeConfig::new(64, 1024, 8, 16, Dtype::F32); // at most 16 tokens per call
/// let mut ll = LowLatencyBuffer::new(&comm, cfg.clone())?; // collective
/// let tokens = 16;
/// let x = vec![0u8; tokens * cfg.row_bytes()];
/// let idx: Vec<i64> = (0..tokens * 8).map(|i| (i % 64) as i64).collect();
/// let w = vec![0.125f32; tokens * 8];
/// let rb = cfg.row_bytes();
/// let mut view = ll.dispatch(&x, &idx, &w)?;
/// // Identity experts: each adds weight × its input into the token's output row.
/// let mut sums = vec![0f32; view.len() * 1024];
/// for l in 0..view.local_experts().len() {
///     for row in view.expert_rows(l)? {
///         let acc = &mut sums[row.index * 1024..(row.index + 1) * 1024];
///         for (a, v) in acc.iter_mut().zip(row.data.chunks(4)) {
///             *a += row.weight * f32::from_le_bytes(v.try_into().unwrap());
///         }
///     }
/// }
/// let out_rows = view.output()?; // one row per received token, in the window
/// for (dst, v) in out_rows.chunks_mut(4).zip(&sums) {
///     dst.copy_from_slice(&v.to_le_bytes());
/// }
/// let mut y = vec![0u8; x.len()];
/// ll.combine_in_place(&mut y)?; // y[t] = sum of w_j * expert_j(x[t])
/// ll.close()?;
/// comm.close()?;
/// # Ok::<(), xccl::Error>(())
/// ```
pub struct LowLatencyBuffer<'c> {
    inner: MoeBuffer<'c>,
}

/// One (token, expert) choice as the expert's rank receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRow<'a> {
    /// Home rank of the token.
    pub src_rank: usize,
    /// The token's index on its home rank.
    pub src_token: usize,
    /// The gate weight of this expert for the token.
    pub weight: f32,
    /// The received token this row is: row `index` of [`LowLatencyView::output`] takes the
    /// sum over this rank's experts of weight × output for it (every local expert the token
    /// chose has a row with the same index).
    pub index: usize,
    /// The token's row, where it landed (shared by this rank's experts).
    pub data: &'a [u8],
}

/// What the last low-latency dispatch delivered, per local expert.
pub struct LowLatencyView<'a> {
    view: DispatchView<'a>,
    local_experts: &'a [usize],
    local_slots: &'a [usize],
}

mod view;

impl<'c> LowLatencyBuffer<'c> {
    /// Collective: a buffer for calls of at most `cfg.max_tokens` tokens per rank (the
    /// window of [`MoeBuffer::new`]: `world × max_tokens` rows received and as many rows of
    /// output).
    pub fn new(comm: &'c Communicator, cfg: MoeConfig) -> Result<Self> {
        Ok(LowLatencyBuffer {
            inner: MoeBuffer::new(comm, cfg)?,
        })
    }

    /// The configuration the buffer was made for.
    pub fn config(&self) -> &MoeConfig {
        self.inner.config()
    }

    /// The communicator the buffer works on.
    pub fn comm(&self) -> &'c Communicator {
        self.inner.comm()
    }

    /// Collective: drains and gives the window and signal words back (what dropping does,
    /// with the error).
    pub fn close(self) -> Result<()> {
        self.inner.close()
    }

    /// The normal-mode buffer underneath.
    pub(in crate::moe) fn inner(&self) -> &MoeBuffer<'c> {
        &self.inner
    }

    /// Collective, between calls: routes later dispatches through `map`
    /// ([`MoeBuffer::set_map`]).
    pub fn set_map(&mut self, map: ExpertMap) -> Result<()> {
        self.inner.set_map(map)
    }

    /// The expert map dispatch routes through.
    pub fn map(&self) -> &ExpertMap {
        self.inner.map()
    }

    /// Rows dispatched per logical expert and time waited per peer ([`MoeStats`]).
    pub fn stats(&self) -> &MoeStats {
        self.inner.stats()
    }

    /// The statistics, restarted.
    pub fn take_stats(&mut self) -> MoeStats {
        self.inner.take_stats()
    }

    /// Collective, before the first call: starts counting calls after `calls` (tests run
    /// across counter boundaries with it).
    #[doc(hidden)]
    pub fn skip_calls(&mut self, calls: u64) {
        self.inner.skip_calls(calls);
    }

    /// Collective: sends each token row once to each rank holding one of its experts, in one
    /// round. `x` holds `T ≤ max_tokens` rows of the dtype; `topk_idx` and `topk_weights`
    /// `T × top-k` entries (`-1` = no expert). Each dispatch needs its combine before the
    /// next (the fixed buffers hold one call).
    pub fn dispatch<'a>(
        &'a mut self,
        x: &'a [u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<LowLatencyView<'a>> {
        if self.inner.is_dispatched() {
            return Err(Error::InvalidUsage(
                "low-latency dispatch: the last dispatch has not been combined (each dispatch \
                 needs its combine before the next)"
                    .into(),
            ));
        }
        let view = self.inner.dispatch(x, topk_idx, topk_weights)?;
        let buf = view.buffer();
        Ok(LowLatencyView {
            view,
            local_experts: buf.local_experts(),
            local_slots: buf.local_slots(),
        })
    }

    /// Collective, after a dispatch: `outputs` holds one row per received token, in the
    /// order of [`ExpertRow::index`]: the sum over this rank's experts of weight × output.
    /// `out` (`T` rows) receives per token the sum of those rows over the ranks it went to,
    /// added in f32 in rank order.
    ///
    /// This copies `outputs` into the buffer first; experts that write straight into
    /// [`LowLatencyView::output`] call [`LowLatencyBuffer::combine_in_place`].
    pub fn combine(&mut self, outputs: &[u8], out: &mut [u8]) -> Result<()> {
        self.inner.combine(outputs, out)
    }

    /// Collective, after a dispatch whose experts wrote into [`LowLatencyView::output`]:
    /// `out` (`T` rows) receives Σ_j w_j · output(token, expert_j), the rows of the ranks
    /// added in f32 in rank order. On shared memory the homes read the rows where the experts
    /// wrote them.
    pub fn combine_in_place(&mut self, out: &mut [u8]) -> Result<()> {
        self.inner.combine_in_place(out)
    }
}
