//! One type a user holds for either MoE mode: [`Dispatcher`] makes the normal or the
//! low-latency buffer, and its view runs each local expert on its batch of rows the same way
//! in both, applying the mode's weighting itself.

use super::config::{Dtype, MoeConfig};
use super::element::{bytes, bytes_mut, Element};
use super::normal::Chosen;
use super::sum::sum_rows;
use super::{DispatchView, ExpertMap, LowLatencyBuffer, LowLatencyView, MoeBuffer, MoeStats};
use crate::error::Result;
use crate::Communicator;
use smallvec::SmallVec;

/// Which MoE buffer a [`Dispatcher`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// [`MoeBuffer`]: rows once per destination rank, any batch size (prefill).
    Normal,
    /// [`LowLatencyBuffer`]: a fixed maximum batch, rows grouped by expert (decode).
    LowLatency,
}

/// An MoE dispatcher of either mode.
///
/// ```no_run
/// # fn main() -> xccl::Result<()> {
/// use xccl::moe::{Dispatcher, Dtype, Mode, MoeConfig};
/// let comm = xccl::Communicator::from_env()?;
/// let cfg = MoeConfig::new(8, 64, 2, 16, Dtype::F32);
/// let mut moe = Dispatcher::new(&comm, cfg, Mode::LowLatency)?;
/// # let (x, idx, w): (Vec<f32>, Vec<i64>, Vec<f32>) = (vec![], vec![], vec![]);
/// let mut view = moe.dispatch_typed(&x, &idx, &w)?;
/// // Each local expert gets its rows (unweighted in, unweighted out): here, the identity;
/// // the view sums each token's outputs with their gate weights.
/// view.run_experts(|_expert, rows, out| {
///     for (row, dst) in rows.iter().zip(out.chunks_mut(64 * 4)) {
///         dst.copy_from_slice(row);
///     }
///     Ok(())
/// })?;
/// drop(view);
/// let mut out = vec![0f32; x.len()];
/// moe.combine_in_place_typed(&mut out)?; // Σ weight × expert output, per token
/// # Ok(()) }
/// ```
pub enum Dispatcher<'c> {
    /// Normal mode.
    Normal(MoeBuffer<'c>),
    /// Low-latency mode.
    LowLatency(LowLatencyBuffer<'c>),
}

/// What one dispatch of either mode received.
pub enum Dispatched<'a> {
    /// Normal mode's view.
    Normal(DispatchView<'a>),
    /// Low-latency mode's view.
    LowLatency(LowLatencyView<'a>),
}

impl<'c> Dispatcher<'c> {
    /// Collective: the buffer of `mode` for `cfg`.
    pub fn new(comm: &'c Communicator, cfg: MoeConfig, mode: Mode) -> Result<Self> {
        Ok(match mode {
            Mode::Normal => Dispatcher::Normal(MoeBuffer::new(comm, cfg)?),
            Mode::LowLatency => Dispatcher::LowLatency(LowLatencyBuffer::new(comm, cfg)?),
        })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        match self {
            Dispatcher::Normal(_) => Mode::Normal,
            Dispatcher::LowLatency(_) => Mode::LowLatency,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        match self {
            Dispatcher::Normal(b) => b.config(),
            Dispatcher::LowLatency(b) => b.config(),
        }
    }

    /// The buffer under either mode (the low-latency one wraps a normal-mode buffer).
    fn core(&self) -> &MoeBuffer<'c> {
        match self {
            Dispatcher::Normal(b) => b,
            Dispatcher::LowLatency(b) => b.inner(),
        }
    }

    /// Collective, between calls: routes later dispatches through `map`
    /// ([`MoeBuffer::set_map`]).
    pub fn set_map(&mut self, map: ExpertMap) -> Result<()> {
        match self {
            Dispatcher::Normal(b) => b.set_map(map),
            Dispatcher::LowLatency(b) => b.set_map(map),
        }
    }

    /// The expert map dispatch routes through.
    pub fn map(&self) -> &ExpertMap {
        self.core().map()
    }

    /// Rows dispatched per logical expert and time waited per peer ([`MoeStats`]).
    pub fn stats(&self) -> &MoeStats {
        self.core().stats()
    }

    /// The statistics, restarted.
    pub fn take_stats(&mut self) -> MoeStats {
        match self {
            Dispatcher::Normal(b) => b.take_stats(),
            Dispatcher::LowLatency(b) => b.take_stats(),
        }
    }

    /// Collective: dispatches `T` tokens (rows as bytes of the configured dtype).
    pub fn dispatch<'a>(
        &'a mut self,
        x: &'a [u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<Dispatched<'a>> {
        Ok(match self {
            Dispatcher::Normal(b) => Dispatched::Normal(b.dispatch(x, topk_idx, topk_weights)?),
            Dispatcher::LowLatency(b) => {
                Dispatched::LowLatency(b.dispatch(x, topk_idx, topk_weights)?)
            }
        })
    }

    /// [`Dispatcher::dispatch`] of typed rows.
    pub fn dispatch_typed<'a, T: Element>(
        &'a mut self,
        x: &'a [T],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<Dispatched<'a>> {
        let x = bytes(self.config(), x)?;
        self.dispatch(x, topk_idx, topk_weights)
    }

    /// Collective, after [`Dispatched::run_experts`]: `out` (`T` rows) receives, per token,
    /// Σ weight × expert output over its experts.
    pub fn combine_in_place(&mut self, out: &mut [u8]) -> Result<()> {
        match self {
            Dispatcher::Normal(b) => b.combine_in_place(out),
            Dispatcher::LowLatency(b) => b.combine_in_place(out),
        }
    }

    /// [`Dispatcher::combine_in_place`] into typed rows.
    pub fn combine_in_place_typed<T: Element>(&mut self, out: &mut [T]) -> Result<()> {
        let out = bytes_mut(self.config(), out)?;
        self.combine_in_place(out)
    }

    /// Collective: gives the buffer's window and signal words back.
    pub fn close(self) -> Result<()> {
        match self {
            Dispatcher::Normal(b) => b.close(),
            Dispatcher::LowLatency(b) => b.close(),
        }
    }
}

impl Dispatched<'_> {
    /// The configuration of the buffer that received the rows.
    pub fn config(&self) -> &MoeConfig {
        match self {
            Dispatched::Normal(v) => v.config(),
            Dispatched::LowLatency(v) => v.config(),
        }
    }

    /// Tokens received in all (a row per (token, rank), in both modes).
    pub fn len(&self) -> usize {
        match self {
            Dispatched::Normal(v) => v.len(),
            Dispatched::LowLatency(v) => v.len(),
        }
    }

    /// True when nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens received from each source rank.
    pub fn sources(&self) -> &[usize] {
        match self {
            Dispatched::Normal(v) => v.counts(),
            Dispatched::LowLatency(v) => v.sources(),
        }
    }

    /// Runs every local expert once on its batch: `expert(e, rows, out)` gets the rows that
    /// chose expert `e` (bytes of the dtype) and writes one output row per input row into
    /// `out`, unweighted. The view sums each token's outputs with their gate weights, in
    /// top-k order in f32, into the row its combine sends home (both modes).
    pub fn run_experts<F>(&mut self, mut expert: F) -> Result<()>
    where
        F: FnMut(usize, &[&[u8]], &mut [u8]) -> Result<()>,
    {
        let mut rows: Vec<Received<'_>> = Vec::with_capacity(self.len());
        let push =
            |_, _, _, chosen: &[(usize, f32)], data| rows.push((data, Chosen::from_slice(chosen)));
        match self {
            Dispatched::Normal(v) => v.each_row(push)?,
            Dispatched::LowLatency(v) => v.each_row(push)?,
        }
        let (dtype, rb) = (self.config().dtype, self.config().row_bytes());
        let outputs = run_on(&rows, rb, &mut expert)?;
        // The received rows stay where they landed; the sums go into the region combine
        // sends home, which they do not overlap.
        let region = match self {
            Dispatched::Normal(v) => v.expert_output()?,
            Dispatched::LowLatency(v) => v.output()?,
        };
        sum_outputs(&rows, (dtype, rb), &outputs, region);
        Ok(())
    }
}

type Expert<'f> = dyn FnMut(usize, &[&[u8]], &mut [u8]) -> Result<()> + 'f;

/// A received token: its row and this rank's experts that chose it, with their weights.
type Received<'a> = (&'a [u8], Chosen);

/// Where each expert's output for a row sits: per (row, its j-th local expert), an offset
/// into the experts' outputs.
struct Outputs {
    rows: Vec<u8>,
    at: Vec<SmallVec<[usize; 8]>>,
}

/// Runs each local expert on the rows that chose it.
/// Rows are `rb` bytes.
fn run_on(rows: &[Received<'_>], rb: usize, expert: &mut Expert<'_>) -> Result<Outputs> {
    let mut experts: Vec<usize> = rows
        .iter()
        .flat_map(|(_, chosen)| chosen.iter().map(|&(e, _)| e))
        .collect();
    experts.sort_unstable();
    experts.dedup();
    let mut at: Vec<SmallVec<[usize; 8]>> = rows
        .iter()
        .map(|(_, c)| SmallVec::from_elem(0, c.len()))
        .collect();
    let mut outputs = Vec::new();
    let mut batch = Vec::new();
    for &e in &experts {
        batch.clear();
        for (i, (data, chosen)) in rows.iter().enumerate() {
            if let Some(j) = chosen.iter().position(|&(x, _)| x == e) {
                at[i][j] = outputs.len() + batch.len() * rb;
                batch.push(*data);
            }
        }
        let start = outputs.len();
        outputs.resize(start + batch.len() * rb, 0);
        expert(e, &batch, &mut outputs[start..])?;
    }
    Ok(Outputs { rows: outputs, at })
}

/// Writes into `region`, per row, its experts' outputs summed with their weights (in top-k
/// order, in f32, rounded once to the dtype).
fn sum_outputs(
    rows: &[Received<'_>],
    (dtype, rb): (Dtype, usize),
    outputs: &Outputs,
    region: &mut [u8],
) {
    let mut parts: SmallVec<[&[u8]; 8]> = SmallVec::new();
    let mut weights: SmallVec<[f32; 8]> = SmallVec::new();
    for ((dst, offs), (_, chosen)) in region.chunks_mut(rb).zip(&outputs.at).zip(rows) {
        parts.clear();
        parts.extend(offs.iter().map(|&o| &outputs.rows[o..o + rb]));
        weights.clear();
        weights.extend(chosen.iter().map(|&(_, w)| w));
        sum_rows(dtype, dst, &parts, Some(&weights));
    }
}
