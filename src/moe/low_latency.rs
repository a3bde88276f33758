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

use super::buffer::{STAGE_CHUNK, STAGE_RECORDS, ZEROS};
use super::config::MoeConfig;
use super::layout::dispatch_layout;
use super::quant;
use super::sum::sum_rows;
use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::size::Sizer;
use crate::transport::{Cmp, MappedMem, PeerPath, SignalOp, Stores};
use crate::{Communicator, Lease};
use smallvec::SmallVec;

const LINE: usize = 64;
/// Bytes of metadata per row: source token (u32), gate weight (f32) and INT8 scale (f32; 0
/// when the row travels in its dtype).
const META: usize = 12;
/// Bytes of the header before each (expert, source) block of metadata: call, row count.
const HDR: usize = 16;
/// Dispatches moving at least this much to one mapped peer use non-temporal stores.
const STREAM_BYTES: usize = 1 << 20;

/// Low-latency dispatch/combine state of one rank. Dropping it (or
/// [`LowLatencyBuffer::close`]) gives its window and signal words back to the communicator;
/// both are collective.
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

impl<'c> LowLatencyBuffer<'c> {
    /// Collective: registers two epochs of `local experts × world × max_tokens` row slots for
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
        let mstride = size.add(&[HDR, size.mul(&[cfg.max_tokens, META])?])?;
        let data = size.mul(&[slots, row])?;
        let outs = size.round_up(size.mul(&[slots, rb])?, LINE)?;
        let comb = if mapped {
            0
        } else {
            size.mul(&[cfg.experts, cap, rb])?
        };
        let half = size.add(&[data, outs, comb])?;
        let records = size.mul(&[cfg.max_tokens, META])?;
        let mailbox = Mailbox::new(&size, size.mul(&[half, 2])?, max_local, n, 1, records)?;
        debug_assert_eq!(mailbox.header_len(), HDR);
        let lease = comm.lease(
            &what,
            size.add(&[2 * half, mailbox.len()])?,
            mailbox.signal_count() + n,
            &format!("low-latency {cfg:?}"),
        )?;
        let mailbox = mailbox.at_signals(lease.signals().start);
        let sig_comb = lease.signals().start + mailbox.signal_count();
        let paths = comm.transport().paths(lease.window())?;
        let own = comm.transport().local_mem(lease.window())?;
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
        (epoch % 2) as usize * self.half
    }

    /// Where metadata record `slot` from `src` for `local` lands: after the header of its
    /// mailbox slot.
    fn meta_off(&self, epoch: u64, local: usize, src: usize, slot: usize) -> usize {
        self.mailbox.slot_off(epoch, local, src) + HDR + slot * META
    }

    /// Where record `slot` of expert `e` is staged in `meta_stage`.
    fn stage_at(&self, e: usize, slot: usize) -> usize {
        e * self.mstride + HDR + slot * META
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

    /// Collective: sends each token row to each of its experts, in one round.
    pub fn dispatch<'a>(
        &'a mut self,
        x: &'a [u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<LowLatencyView<'a>> {
        let (me, n, k) = (self.comm.rank(), self.comm.world_size(), self.cfg.topk);
        if self.dispatched {
            return Err(Error::InvalidUsage(
                "low-latency dispatch: the last dispatch has not been combined (each dispatch \
                 needs its combine before the next)"
                    .into(),
            ));
        }
        dispatch_layout(topk_idx, k, &self.placement, n)?; // checks ids and duplicates
        let tokens = topk_idx.len() / k;
        let rb = self.cfg.row_bytes();
        if tokens > self.cfg.max_tokens
            || x.len() != tokens * rb
            || topk_weights.len() != topk_idx.len()
        {
            return Err(Error::InvalidArgument(format!(
                "{tokens} tokens (max {}), {} bytes of rows (want {}), {} weights",
                self.cfg.max_tokens,
                x.len(),
                tokens * rb,
                topk_weights.len()
            )));
        }
        if let Some(i) =
            (0..topk_idx.len()).find(|&i| topk_idx[i] >= 0 && !topk_weights[i].is_finite())
        {
            return Err(Error::InvalidArgument(format!(
                "token {} has weight {}",
                i / k,
                topk_weights[i]
            )));
        }
        if self.cfg.int8_dispatch {
            // Scales first: a non-finite value is refused before anything is sent.
            quant::row_scales(self.cfg.dtype, x, self.cfg.hidden, &mut self.scales)?;
            let h = self.cfg.hidden;
            for tok in 0..tokens {
                let remote = topk_idx[tok * k..(tok + 1) * k]
                    .iter()
                    .any(|&e| e >= 0 && self.placement[e as usize] != me);
                if remote {
                    let q = &mut self.qx[tok * h..(tok + 1) * h];
                    quant::quantize(self.cfg.dtype, &x[tok * rb..], h, self.scales[tok], q);
                }
            }
        }
        self.lease.enter();
        self.epoch += 1;
        let epoch = self.epoch;
        let t = self.comm.transport();
        self.per_rank.fill(0);
        for &e in topk_idx.iter().filter(|&&e| e >= 0) {
            self.per_rank[self.placement[e as usize]] += 1;
        }
        // Large transfers into a mapped window bypass this core's caches (the expert's rank
        // reads them next, from another core).
        let mut stores: SmallVec<[Stores; 8]> = SmallVec::new();
        for r in 0..n {
            let big = r != me && self.per_rank[r] * rb >= STREAM_BYTES;
            stores.push(if big {
                Stores::Streaming
            } else {
                Stores::Cached
            });
        }
        // Taken out for the loop and put back after (an error path leaves it empty; the resize
        // makes the next call whole again).
        let mut next = std::mem::take(&mut self.next);
        next.clear();
        next.resize(self.cfg.experts, 0);
        self.slots.clear();
        for (i, &e) in topk_idx.iter().enumerate() {
            if e < 0 {
                self.slots.push(None);
                continue;
            }
            let e = e as usize;
            let tok = i / k;
            let slot = next[e];
            next[e] += 1;
            self.slots.push(Some(slot));
            let (dst, local) = (self.placement[e], self.local_index[e]);
            let at = self.stage_at(e, slot);
            let scale = match self.cfg.int8_dispatch && dst != me {
                true => self.scales[tok],
                false => 0.0,
            };
            let meta = &mut self.meta_stage[at..at + META];
            meta[..4].copy_from_slice(&(tok as u32).to_le_bytes());
            meta[4..8].copy_from_slice(&topk_weights[i].to_le_bytes());
            meta[8..].copy_from_slice(&scale.to_le_bytes());
            if dst == me || !self.paths[dst].is_mapped() {
                // Own rows are read in place from `x` by the view; over a network the rows go
                // per expert below.
                continue;
            }
            let row = self.wire_row(x, tok);
            // This epoch's slot is written by this rank only; `dst` reads it after the
            // signal below, which the path orders after these stores (streaming ones too).
            let off = self.wire_off(epoch, local, me, slot);
            self.paths[dst].put(off, row, stores[dst])?;
        }
        for (e, &count) in next.iter().enumerate() {
            let (dst, local) = (self.placement[e], self.local_index[e]);
            if !self.paths[dst].is_mapped() && dst != me {
                self.send_rows(x, e, count, epoch)?;
            }
            // Each expert's header and metadata in one put (its slots are consecutive), with
            // its signal.
            let at = e * self.mstride;
            self.mailbox.post(
                &self.paths[dst],
                me,
                local,
                epoch,
                &[count as u64],
                &mut self.meta_stage[at..at + HDR + count * META],
            )?;
        }
        self.next = next;
        self.idx.clear();
        self.idx.extend_from_slice(topk_idx);
        self.weights.clear();
        self.weights.extend_from_slice(topk_weights);
        self.tokens = tokens;
        let deadline = self.comm.deadline();
        for (l, _) in self.local_experts.iter().enumerate() {
            for src in 0..n {
                let [count, ..] = self
                    .mailbox
                    .collect(t, &self.own, l, src, epoch, deadline)?;
                if count > self.cfg.max_tokens as u64 {
                    return Err(Error::ProtocolViolation(format!(
                        "rank {src} announced {count} rows during call {epoch}, more than the \
                         {} a call holds",
                        self.cfg.max_tokens
                    )));
                }
                self.counts[l * n + src] = count as usize;
            }
        }
        if self.cfg.int8_dispatch {
            self.dequantize_arrivals(epoch)?;
        }
        self.dispatched = true;
        self.lease.leave();
        Ok(LowLatencyView { buf: self, x })
    }

    /// Rebuilds every INT8 row received from another rank in its slot, in the dtype: last
    /// row first, so spreading the packed rows out never overwrites one not yet read (row i
    /// moves to a place at or after its own).
    fn dequantize_arrivals(&mut self, epoch: u64) -> Result<()> {
        let (me, n, h, rb) = (
            self.comm.rank(),
            self.comm.world_size(),
            self.cfg.hidden,
            self.cfg.row_bytes(),
        );
        let t = self.comm.transport();
        let mut meta = [0u8; META];
        for l in 0..self.local_experts.len() {
            for src in (0..n).filter(|&s| s != me) {
                for slot in (0..self.counts[l * n + src]).rev() {
                    t.read_local(
                        self.lease.window(),
                        self.meta_off(epoch, l, src, slot),
                        &mut meta,
                    )?;
                    let scale = quant::landed_scale(&meta[8..], src, slot)?;
                    let from = self.wire_off(epoch, l, src, slot);
                    t.read_local(self.lease.window(), from, &mut self.qrow[..h])?;
                    // SAFETY: the row was announced by the signal the dispatch waited for; no
                    // peer writes this epoch's region again before the next-but-one dispatch,
                    // and no view of it exists yet (the view is created after this).
                    let row = unsafe {
                        t.local_slice_mut(
                            self.lease.window(),
                            self.data_off(epoch, l, src, slot),
                            rb,
                        )?
                    };
                    quant::dequantize(self.cfg.dtype, &self.qrow[..h], scale, row);
                }
            }
        }
        Ok(())
    }

    /// Network backends: puts this rank's `count` rows for expert `e` (the tokens recorded in
    /// its metadata, in slot order) into their slots, in chunks of consecutive slots.
    fn send_rows(&self, x: &[u8], e: usize, count: usize, epoch: u64) -> Result<()> {
        let me = self.comm.rank();
        let (dst, local) = (self.placement[e], self.local_index[e]);
        let (len, stride) = match self.cfg.int8_dispatch {
            true => (self.cfg.hidden, self.qstride),
            false => (self.cfg.row_bytes(), self.row),
        };
        let pad = &ZEROS[..stride - len];
        let per = (STAGE_CHUNK / stride).clamp(1, STAGE_RECORDS);
        for first in (0..count).step_by(per) {
            let mut parts: SmallVec<[&[u8]; 2 * STAGE_RECORDS]> = SmallVec::new();
            for slot in first..(first + per).min(count) {
                let at = self.stage_at(e, slot);
                let tok = u32::from_le_bytes(self.meta_stage[at..at + 4].try_into().expect("4"));
                parts.extend([self.wire_row(x, tok as usize), pad]);
            }
            let off = self.wire_off(epoch, local, me, first);
            self.paths[dst].put_vectored(off, &parts)?;
        }
        Ok(())
    }

    /// Collective, after a dispatch: `outputs` holds, for every local expert (in id order),
    /// every source (in rank order), one output row per received row — the expert's output,
    /// unweighted. `out` (`T` rows) receives Σ_j w_j · output(token, expert_j) in top-k order.
    ///
    /// This copies `outputs` into the buffer first; experts that write straight into
    /// [`LowLatencyView::expert_output`] call [`LowLatencyBuffer::combine_in_place`].
    pub fn combine(&mut self, outputs: &[u8], out: &mut [u8]) -> Result<()> {
        super::check_combinable(self.dispatched)?;
        let n = self.comm.world_size();
        let rb = self.cfg.row_bytes();
        let received: usize = self.counts.iter().sum();
        if outputs.len() != received * rb {
            return Err(Error::InvalidArgument(format!(
                "combine got {} output bytes for {received} rows of {rb}",
                outputs.len()
            )));
        }
        let t = self.comm.transport();
        let mut at = 0;
        for l in 0..self.local_experts.len() {
            for src in 0..n {
                let len = self.counts[l * n + src] * rb;
                let off = self.out_off(self.epoch, l, src, 0);
                t.write_local(self.lease.window(), off, &outputs[at..at + len])?;
                at += len;
            }
        }
        self.combine_in_place(out)
    }

    /// Collective, after a dispatch whose experts wrote their output into
    /// [`LowLatencyView::expert_output`]: `out` (`T` rows) receives
    /// Σ_j w_j · output(token, expert_j), added in f32 in top-k order.
    pub fn combine_in_place(&mut self, out: &mut [u8]) -> Result<()> {
        super::check_combinable(self.dispatched)?;
        let (me, n, k) = (self.comm.rank(), self.comm.world_size(), self.cfg.topk);
        let rb = self.cfg.row_bytes();
        if out.len() != self.tokens * rb {
            return Err(Error::InvalidArgument(format!(
                "combine output has {} bytes; the last dispatch had {} tokens of {rb}",
                out.len(),
                self.tokens
            )));
        }
        self.lease.enter();
        self.dispatched = false;
        let epoch = self.epoch;
        let t = self.comm.transport();
        {
            // Homes reached over the network: each expert's rows for one home leave in one
            // put.
            for (l, &e) in self.local_experts.iter().enumerate() {
                for src in (0..n).filter(|&s| s != me && !self.paths[s].is_mapped()) {
                    let len = self.counts[l * n + src] * rb;
                    if len == 0 {
                        continue;
                    }
                    // SAFETY: this rank's own output region, written by its experts before
                    // this call; peers never write it.
                    let rows = unsafe {
                        t.local_slice(self.lease.window(), self.out_off(epoch, l, src, 0), len)?
                    };
                    self.paths[src].put(self.comb_off(epoch, e, 0), rows, Stores::Cached)?;
                }
            }
        }
        for path in &self.paths {
            path.signal(self.sig_comb + me, SignalOp::Set, epoch)?;
        }
        let deadline = self.comm.deadline();
        for r in 0..n {
            t.wait(self.sig_comb + r, Cmp::Ge, epoch, deadline)?;
        }
        let slots = self.local_experts.len() * n * self.cfg.max_tokens;
        // SAFETY: this rank's own output region, written by its experts before this call;
        // peers never write it.
        let own = unsafe {
            t.local_slice(
                self.lease.window(),
                self.out_off(epoch, 0, 0, 0),
                slots * rb,
            )?
        };
        // No region for returned rows when every peer is mapped (it would end the half).
        let landed = if self.comb_at == self.half {
            &[][..]
        } else {
            // SAFETY: the expert ranks' rows were announced by the signals waited for above
            // and are not rewritten before the next-but-one call.
            unsafe {
                t.local_slice(
                    self.lease.window(),
                    self.comb_off(epoch, 0, 0),
                    self.cfg.experts * self.cfg.max_tokens * rb,
                )?
            }
        };
        let mut rows: SmallVec<[&[u8]; 8]> = SmallVec::new();
        let mut weights: SmallVec<[f32; 8]> = SmallVec::new();
        for (tok, out_row) in out.chunks_mut(rb).enumerate() {
            rows.clear();
            weights.clear();
            for j in 0..k {
                let (Some(slot), e) = (self.slots[tok * k + j], self.idx[tok * k + j]) else {
                    continue;
                };
                let (e, r) = (e as usize, self.placement[e as usize]);
                let local = self.local_index[e];
                rows.push(if r == me {
                    let at = self.slot_index(local, me, slot) * rb;
                    &own[at..at + rb]
                } else if self.paths[r].is_mapped() {
                    let off = self.out_off(epoch, local, me, slot);
                    // SAFETY: rank r's experts wrote this row before the signal waited for
                    // above, and r writes this epoch's output region again only after its
                    // dispatch e+2, which needs this rank's dispatch e+1, after this combine.
                    unsafe { self.paths[r].rows(off, rb)? }
                } else {
                    let at = (e * self.cfg.max_tokens + slot) * rb;
                    &landed[at..at + rb]
                });
                weights.push(self.weights[tok * k + j]);
            }
            sum_rows(self.cfg.dtype, out_row, &rows, Some(&weights));
        }
        self.lease.leave();
        Ok(())
    }
}

impl<'a> LowLatencyView<'a> {
    /// This rank's experts, in id order.
    pub fn local_experts(&self) -> &[usize] {
        &self.buf.local_experts
    }

    fn check_local(&self, l: usize) -> Result<()> {
        if l >= self.buf.local_experts.len() {
            return Err(Error::InvalidArgument(format!(
                "local expert {l} of {}",
                self.buf.local_experts.len()
            )));
        }
        Ok(())
    }

    /// Rows received for local expert number `l` (`local_experts()[l]`), from every source
    /// in rank order.
    pub fn expert_rows(&self, l: usize) -> Result<Vec<ExpertRow<'a>>> {
        self.check_local(l)?;
        let b: &'a LowLatencyBuffer<'a> = self.buf;
        let (me, n, rb) = (b.comm.rank(), b.comm.world_size(), b.cfg.row_bytes());
        let t = b.comm.transport();
        let mut out = Vec::new();
        for src in 0..n {
            for slot in 0..b.counts[l * n + src] {
                // SAFETY: announced by the signal the dispatch waited for; not rewritten before
                // the next-but-one call, which cannot start while this view borrows the buffer.
                let meta = unsafe {
                    t.local_slice(b.lease.window(), b.meta_off(b.epoch, l, src, slot), META)?
                };
                let tok = u32::from_le_bytes(meta[..4].try_into().expect("4 bytes")) as usize;
                let w = f32::from_le_bytes(meta[4..8].try_into().expect("4 bytes"));
                if tok >= b.cfg.max_tokens || !w.is_finite() || (src == me && tok >= b.tokens) {
                    return Err(Error::ProtocolViolation(format!(
                        "row {slot} from rank {src}: token {tok}, weight {w}"
                    )));
                }
                let data = if src == me {
                    let x: &'a [u8] = self.x;
                    &x[tok * rb..(tok + 1) * rb]
                } else {
                    // SAFETY: as for `meta`.
                    unsafe {
                        t.local_slice(b.lease.window(), b.data_off(b.epoch, l, src, slot), rb)?
                    }
                };
                out.push(ExpertRow {
                    src_rank: src,
                    src_token: tok,
                    weight: w,
                    index: src * b.cfg.max_tokens + slot,
                    data,
                });
            }
        }
        Ok(out)
    }

    /// Where local expert `l` writes its output for [`LowLatencyBuffer::combine_in_place`]:
    /// a `[world × max_tokens, hidden]` tensor of the dtype in the registered window; the
    /// output for a row of [`Self::expert_rows`] goes to row [`ExpertRow::index`]. Rows no
    /// token was sent to are not read.
    pub fn expert_output(&mut self, l: usize) -> Result<&mut [u8]> {
        self.check_local(l)?;
        let b = self.buf;
        let len = b.comm.world_size() * b.cfg.max_tokens * b.cfg.row_bytes();
        // SAFETY: homes read this epoch's output region only after this rank signals its
        // combine, which needs the buffer this view borrows; they finished reading it two
        // dispatches ago (see the module docs). `&mut self` keeps one such slice at a time, and
        // the region is disjoint from the received rows `expert_rows` hands out.
        unsafe {
            b.comm
                .transport()
                .local_slice_mut(b.lease.window(), b.out_off(b.epoch, l, 0, 0), len)
        }
    }

    /// Rows received per local expert.
    pub fn counts(&self) -> Vec<usize> {
        let n = self.buf.comm.world_size();
        (0..self.buf.local_experts.len())
            .map(|l| (0..n).map(|s| self.buf.counts[l * n + s]).sum())
            .collect()
    }
}
