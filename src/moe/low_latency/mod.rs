//! Low-latency MoE dispatch and combine, for decode batches (DeepEP's low-latency mode):
//! one round, a fixed slot per (expert, source rank, token), and one signal word per
//! (expert, source) whose value carries both "arrived" and the count.
//!
//! Each token goes to each of its top-k experts separately (no per-rank deduplication), so a
//! rank's input for local expert `e` is `[sources × capacity]` rows, read with
//! [`LowLatencyView::expert_rows`] (a rank's own tokens are read in place from its input).
//! The experts write their output, unweighted, into [`LowLatencyView::expert_output`]: one
//! `[sources × capacity, hidden]` tensor per local expert, in the window. Combine brings one
//! row per (token, expert) home — on shared memory the home reads it where the expert wrote
//! it — and the home weights the rows with the gate weights and sums them in top-k order in
//! f32.
//!
//! With [`MoeConfig::int8_dispatch`], a row for another rank travels as INT8 with its
//! per-token scale in the metadata (quantized once per token, whatever its number of remote
//! experts), packed `hidden` bytes (rounded to a cache line) apart in the slot region, and
//! is rebuilt in its slot, in the dtype, before the dispatch returns: the view and the
//! experts see dtype rows either way. A rank's own rows are read in place, unquantized.
//!
//! Each (expert, source) block of metadata starts with a header (call number, row count); the
//! block travels in one put followed by the signal, set to the call number: 64 bits,
//! monotonic across calls, so a stale value can never look current and it never runs out.
//! Regions
//! come in two epochs (even and odd calls): a home reads an expert's output of call e during
//! its combine e, and its own next write there is its dispatch e+2, after that combine.

use super::config::MoeConfig;
use super::normal::{STAGE_CHUNK, STAGE_RECORDS, ZEROS};
use super::quant;
use super::record::SlotRecord;
use super::sum::sum_rows;
use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::size::Sizer;
use crate::transport::{Cmp, MappedMem, PeerPath, SignalOp, Stores};
use crate::{Communicator, Lease};
use smallvec::SmallVec;

const LINE: usize = 64;
/// Bytes of the header before each (expert, source) block of metadata: call, row count.
const HDR: usize = 16;
/// Dispatches moving at least this much to one mapped peer use non-temporal stores.
const STREAM_BYTES: usize = 1 << 20;

/// Low-latency dispatch/combine state of one rank. Dropping it (or
/// [`LowLatencyBuffer::close`]) gives its window and signal words back to the communicator;
/// both are collective.
///
/// A decode step: each token's row goes to each of its top-k experts (fixed slots, one
/// round); each expert writes its output in place; combine weights and sums them at home.
///
/// ```no_run
/// use xccl::moe::{Dtype, LowLatencyBuffer, MoeConfig};
///
/// let comm = xccl::Communicator::from_env()?;
/// let cfg = MoeConfig::new(64, 7168, 8, 16, Dtype::Bf16); // at most 16 tokens per call
/// let mut ll = LowLatencyBuffer::new(&comm, cfg.clone())?; // collective
/// let tokens = 16;
/// let x = vec![0u8; tokens * cfg.row_bytes()];
/// let idx: Vec<i64> = (0..tokens * 8).map(|i| (i % 64) as i64).collect();
/// let w = vec![0.125f32; tokens * 8];
/// let rb = cfg.row_bytes();
/// let mut view = ll.dispatch(&x, &idx, &w)?;
/// for l in 0..view.local_experts().len() {
///     let rows: Vec<(usize, Vec<u8>)> = view
///         .expert_rows(l)?
///         .iter()
///         .map(|r| (r.index, r.data.to_vec()))
///         .collect();
///     let out = view.expert_output(l)?; // this expert's output slots, in the window
///     for (i, data) in rows {
///         out[i * rb..(i + 1) * rb].copy_from_slice(&data); // an identity expert
///     }
/// }
/// let mut y = vec![0u8; x.len()];
/// ll.combine_in_place(&mut y)?; // y[t] = sum of w_j * expert_j(x[t])
/// ll.close()?;
/// comm.close()?;
/// # Ok::<(), xccl::Error>(())
/// ```
pub struct LowLatencyBuffer<'c> {
    comm: &'c Communicator,
    cfg: MoeConfig,
    placement: Vec<usize>,
    /// Index of each expert among its rank's experts.
    local_index: Vec<usize>,
    local_experts: Vec<usize>,
    lease: Lease<'c>,
    /// Stride of one expert's staged metadata block: header, then `max_tokens` records.
    mstride: usize,
    /// Per call and (local expert, source): the row count, then the rows' metadata records.
    mailbox: Mailbox,
    /// This rank's own copy of the window.
    own: MappedMem,
    /// Stride of dispatched rows (64-byte aligned).
    row: usize,
    /// Stride of INT8 rows as they cross (`hidden` rounded up to a cache line).
    qstride: usize,
    half: usize,
    /// Where the two halves start (after the mailbox).
    halves_at: usize,
    data_at: usize,
    out_at: usize,
    comb_at: usize,
    /// This rank's path to each rank's window, by rank: homes read the experts' output in
    /// place from mapped ranks, and have it sent by the others.
    paths: Vec<PeerPath<'c>>,
    sig_comb: usize,
    epoch: u64,
    /// The last dispatch awaits its combine (the mode's fixed slots hold one call at a time).
    dispatched: bool,
    /// Per (token, top-k slot) of the last dispatch: the slot its row took at its expert.
    slots: Vec<Option<usize>>,
    idx: Vec<i64>,
    weights: Vec<f32>,
    tokens: usize,
    /// Rows received per (local expert, source) by the last dispatch.
    counts: Vec<usize>,
    /// Per expert: the next free slot of this rank's rows (dispatch).
    next: Vec<usize>,
    /// Per rank: (token, expert) rows the last dispatch sent it.
    per_rank: Vec<usize>,
    /// Dispatch scratch: the metadata of each expert's rows, `max_tokens` records per
    /// expert, put as one block per expert.
    meta_stage: Vec<u8>,
    /// INT8 dispatch: per token of the call, its scale, and its quantized row (tokens with an
    /// expert on another rank), `hidden` bytes each; one row of scratch for rebuilding.
    scales: Vec<f32>,
    qx: Vec<u8>,
    qrow: Vec<u8>,
}

/// One (token, expert) row as the expert's rank receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRow<'a> {
    /// Home rank of the token.
    pub src_rank: usize,
    /// The token's index on its home rank.
    pub src_token: usize,
    /// The gate weight of this expert for the token.
    pub weight: f32,
    /// Where the expert's output for this row goes: row `index` of
    /// [`LowLatencyView::expert_output`].
    pub index: usize,
    /// The token's row.
    pub data: &'a [u8],
}

/// Rows received by the last low-latency dispatch, per local expert.
pub struct LowLatencyView<'a> {
    buf: &'a LowLatencyBuffer<'a>,
    /// The caller's input: rows a rank dispatches to its own experts are read from it.
    x: &'a [u8],
}

mod combine;
mod dispatch;
mod view;

impl<'c> LowLatencyBuffer<'c> {
    /// dispatched rows and as many for the experts' output (plus, over a network backend,
    /// `experts × max_tokens` rows where homes receive the output).
    pub fn new(comm: &'c Communicator, cfg: MoeConfig) -> Result<Self> {
        let n = comm.world_size();
        let placement = cfg.placement_for(n)?;
        cfg.check_int8()?;
        let me = comm.rank();
        let local_experts: Vec<usize> = (0..cfg.experts).filter(|&e| placement[e] == me).collect();
        let nlocal = local_experts.len();
        let mut local_index = vec![0; cfg.experts];
        for r in 0..n {
            for (i, e) in (0..cfg.experts).filter(|&e| placement[e] == r).enumerate() {
                local_index[e] = i;
            }
        }
        let max_local = (0..n)
            .map(|r| placement.iter().filter(|&&p| p == r).count())
            .max()
            .unwrap_or(0);
        let mapped = comm.transport().maps_every_peer()?;
        let rb = cfg.row_bytes();
        let what = format!("a low-latency buffer of {n} ranks for {cfg:?}");
        let size = Sizer::new(&what);
        let row = size.round_up(rb, LINE)?;
        let cap = cfg.max_tokens.max(1);
        let slots = size.mul(&[max_local, n, cap])?;
        let mstride = size.add(&[HDR, size.mul(&[cfg.max_tokens, SlotRecord::LEN])?])?;
        let data = size.mul(&[slots, row])?;
        let outs = size.round_up(size.mul(&[slots, rb])?, LINE)?;
        let comb = if mapped {
            0
        } else {
            size.mul(&[cfg.experts, cap, rb])?
        };
        let half = size.add(&[data, outs, comb])?;
        let records = size.mul(&[cfg.max_tokens, SlotRecord::LEN])?;
        // Packed, as one slot per (expert, source) is small: fewer lines to pull at decode sizes.
        let mailbox = Mailbox::new(&size, 0, max_local, n, 1, records)?.packed();
        // The mailbox first, then the two halves from the next line.
        let halves_at = size.round_up(mailbox.len(), LINE)?;
        debug_assert_eq!(mailbox.header_len(), HDR);
        let lease = comm.lease(
            &what,
            size.add(&[halves_at, size.mul(&[half, 2])?])?,
            mailbox.signal_count() + n,
            &format!("low-latency {cfg:?}"),
        )?;
        let mailbox = mailbox.at_signals(lease.signals().start);
        let sig_comb = lease.signals().start + mailbox.signal_count();
        let (paths, own) = lease.views()?;
        Ok(LowLatencyBuffer {
            comm,
            placement,
            local_index,
            local_experts,
            lease,
            mstride,
            mailbox,
            own,
            row,
            qstride: cfg.hidden.div_ceil(LINE) * LINE,
            half,
            halves_at,
            data_at: 0,
            out_at: data,
            comb_at: data + outs,
            paths,
            sig_comb,
            epoch: 0,
            dispatched: false,
            slots: Vec::with_capacity(cap * cfg.topk),
            idx: Vec::with_capacity(cap * cfg.topk),
            weights: Vec::with_capacity(cap * cfg.topk),
            tokens: 0,
            counts: vec![0; nlocal * n],
            next: vec![0; cfg.experts],
            per_rank: vec![0; n],
            meta_stage: vec![0; cfg.experts * mstride],
            scales: Vec::with_capacity(if cfg.int8_dispatch { cap } else { 0 }),
            qx: vec![
                0;
                if cfg.int8_dispatch {
                    cap * cfg.hidden
                } else {
                    0
                }
            ],
            qrow: vec![0; if cfg.int8_dispatch { cfg.hidden } else { 0 }],
            cfg,
        })
    }

    /// Slot number of (local expert, source, slot) within one epoch's regions.
    fn slot_index(&self, local: usize, src: usize, slot: usize) -> usize {
        (local * self.comm.world_size() + src) * self.cfg.max_tokens + slot
    }

    fn epoch_base(&self, epoch: u64) -> usize {
        self.halves_at + (epoch % 2) as usize * self.half
    }

    /// Where metadata record `slot` from `src` for `local` lands: after the header of its
    /// mailbox slot.
    fn meta_off(&self, epoch: u64, local: usize, src: usize, slot: usize) -> usize {
        self.mailbox.slot_off(epoch, local, src) + HDR + slot * SlotRecord::LEN
    }

    /// Where record `slot` of expert `e` is staged in `meta_stage`.
    fn stage_at(&self, e: usize, slot: usize) -> usize {
        e * self.mstride + HDR + slot * SlotRecord::LEN
    }

    /// The configuration the buffer was made for.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// The communicator the buffer works on.
    pub fn comm(&self) -> &'c Communicator {
        self.comm
    }

    /// Collective: drains and gives the window and signal words back (what dropping does,
    /// with the error).
    pub fn close(self) -> Result<()> {
        self.lease.close()
    }

    /// Collective, before the first call: starts counting calls after `calls` (tests run
    /// across counter boundaries with it).
    #[doc(hidden)]
    pub fn skip_calls(&mut self, calls: u64) {
        self.epoch += calls;
    }

    fn data_off(&self, epoch: u64, local: usize, src: usize, slot: usize) -> usize {
        self.epoch_base(epoch) + self.data_at + self.slot_index(local, src, slot) * self.row
    }

    /// Where row `slot` from `src` for `local` crosses: its slot, or with INT8 dispatch
    /// `qstride` apart from the start of the (local, src) block.
    fn wire_off(&self, epoch: u64, local: usize, src: usize, slot: usize) -> usize {
        if self.cfg.int8_dispatch {
            self.data_off(epoch, local, src, 0) + slot * self.qstride
        } else {
            self.data_off(epoch, local, src, slot)
        }
    }

    /// The bytes that carry token `tok` to another rank: its row, or its INT8 row.
    fn wire_row<'x>(&'x self, x: &'x [u8], tok: usize) -> &'x [u8] {
        if self.cfg.int8_dispatch {
            &self.qx[tok * self.cfg.hidden..(tok + 1) * self.cfg.hidden]
        } else {
            let rb = self.cfg.row_bytes();
            &x[tok * rb..(tok + 1) * rb]
        }
    }

    fn out_off(&self, epoch: u64, local: usize, src: usize, slot: usize) -> usize {
        self.epoch_base(epoch)
            + self.out_at
            + self.slot_index(local, src, slot) * self.cfg.row_bytes()
    }

    /// Network backends: where the output of `expert` for this rank's row `slot` lands.
    fn comb_off(&self, epoch: u64, expert: usize, slot: usize) -> usize {
        self.epoch_base(epoch)
            + self.comb_at
            + (expert * self.cfg.max_tokens + slot) * self.cfg.row_bytes()
    }
}
