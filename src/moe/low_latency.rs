//! Low-latency MoE dispatch and combine, for decode batches (DeepEP's low-latency mode):
//! one round, a fixed slot per (expert, source rank, token), and one signal word per
//! (expert, source) whose value carries both "arrived" and the count.
//!
//! Each token goes to each of its top-k experts separately (no per-rank deduplication), so a
//! rank's output for local expert `e` is laid out `[sources × capacity, hidden]` and read with
//! [`LowLatencyView::expert_rows`]. Combine returns one row per (token, expert), unweighted;
//! the home rank weights them with the gate weights and sums in top-k order in f32.
//!
//! Signal values are `epoch << 32 | count`: monotonic across calls, so a waiter waits for
//! `>= epoch << 32` and a stale value from an earlier call can never look current.

use super::config::MoeConfig;
use super::layout::dispatch_layout;
use super::sum::sum_rows;
use crate::error::{Error, Result};
use crate::transport::{Cmp, SignalOp, Window};
use crate::Communicator;
use smallvec::SmallVec;

const LINE: usize = 64;

/// Low-latency dispatch/combine state of one rank.
pub struct LowLatencyBuffer<'c> {
    comm: &'c Communicator,
    cfg: MoeConfig,
    placement: Vec<usize>,
    /// Index of each expert among its rank's experts.
    local_index: Vec<usize>,
    local_experts: Vec<usize>,
    win: Window,
    row: usize,
    half: usize,
    disp_at: usize,
    comb_at: usize,
    sig_disp: usize,
    sig_comb: usize,
    epoch: u64,
    /// Per (token, top-k slot) of the last dispatch: the slot its row took at its expert.
    slots: Vec<Option<usize>>,
    idx: Vec<i64>,
    weights: Vec<f32>,
    tokens: usize,
    /// Rows received per (local expert, source) by the last dispatch.
    counts: Vec<usize>,
    /// Per expert: the next free slot of this rank's rows (dispatch).
    next: Vec<usize>,
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
    /// The token's row.
    pub data: &'a [u8],
}

/// Rows received by the last low-latency dispatch, per local expert.
pub struct LowLatencyView<'a> {
    buf: &'a LowLatencyBuffer<'a>,
}

impl<'c> LowLatencyBuffer<'c> {
    /// Collective: registers `2 × (local experts × world × max_tokens + experts × max_tokens)`
    /// row slots (each row: 8 bytes of metadata, the token row, 64-byte aligned).
    pub fn new(comm: &'c Communicator, cfg: MoeConfig) -> Result<Self> {
        let n = comm.world_size();
        let placement = cfg.placement_for(n)?;
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
        let row = (8 + cfg.row_bytes()).div_ceil(LINE) * LINE;
        let cap = cfg.max_tokens.max(1);
        let disp = max_local.checked_mul(n * cap * row).ok_or_else(|| {
            Error::InvalidArgument(format!("low-latency buffer for {cfg:?} overflows"))
        })?;
        let comb = cfg.experts * cap * row;
        let half = disp + comb;
        let win = comm.register(2 * half)?;
        let sig_disp = comm.alloc_signals(max_local * n + n)?;
        Ok(LowLatencyBuffer {
            comm,
            placement,
            local_index,
            local_experts,
            win,
            row,
            half,
            disp_at: 0,
            comb_at: disp,
            sig_disp,
            sig_comb: sig_disp + max_local * n,
            epoch: 0,
            slots: Vec::with_capacity(cap * cfg.topk),
            idx: Vec::with_capacity(cap * cfg.topk),
            weights: Vec::with_capacity(cap * cfg.topk),
            tokens: 0,
            counts: vec![0; nlocal * n],
            next: vec![0; cfg.experts],
            cfg,
        })
    }

    fn disp_off(&self, epoch: u64, local: usize, src: usize, slot: usize) -> usize {
        let n = self.comm.world_size();
        (epoch % 2) as usize * self.half
            + self.disp_at
            + ((local * n + src) * self.cfg.max_tokens + slot) * self.row
    }

    fn comb_off(&self, epoch: u64, expert: usize, slot: usize) -> usize {
        (epoch % 2) as usize * self.half
            + self.comb_at
            + (expert * self.cfg.max_tokens + slot) * self.row
    }

    /// Collective: sends each token row to each of its experts, in one round.
    pub fn dispatch<'a>(
        &'a mut self,
        x: &[u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<LowLatencyView<'a>> {
        let (me, n, k) = (self.comm.rank(), self.comm.world_size(), self.cfg.topk);
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
        self.epoch += 1;
        let epoch = self.epoch;
        let t = self.comm.transport();
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
            let off = self.disp_off(epoch, self.local_index[e], me, slot);
            let mut meta = [0u8; 8];
            meta[..4].copy_from_slice(&(tok as u32).to_le_bytes());
            meta[4..].copy_from_slice(&topk_weights[i].to_le_bytes());
            let dst = self.placement[e];
            t.put(dst, &self.win, off, &meta)?;
            t.put(dst, &self.win, off + 8, &x[tok * rb..(tok + 1) * rb])?;
        }
        for (e, &count) in next.iter().enumerate() {
            let index = self.sig_disp + self.local_index[e] * n + me;
            t.signal(
                self.placement[e],
                index,
                SignalOp::Set,
                (epoch << 32) | count as u64,
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
                let v = t.wait(self.sig_disp + l * n + src, Cmp::Ge, epoch << 32, deadline)?;
                let count = (v & 0xFFFF_FFFF) as usize;
                if v >> 32 != epoch || count > self.cfg.max_tokens {
                    return Err(Error::ProtocolViolation(format!(
                        "rank {src} announced {count} rows for call {} during call {epoch}",
                        v >> 32
                    )));
                }
                self.counts[l * n + src] = count;
            }
        }
        Ok(LowLatencyView { buf: self })
    }

    /// Collective, after a dispatch: `outputs` holds, for every local expert (in id order),
    /// every source (in rank order), one output row per received row — the expert's output,
    /// unweighted. `out` (`T` rows) receives Σ_j w_j · output(token, expert_j) in top-k order.
    pub fn combine(&mut self, outputs: &[u8], out: &mut [u8]) -> Result<()> {
        let (me, n, k) = (self.comm.rank(), self.comm.world_size(), self.cfg.topk);
        let rb = self.cfg.row_bytes();
        let received: usize = self.counts.iter().sum();
        if outputs.len() != received * rb || out.len() != self.tokens * rb {
            return Err(Error::InvalidArgument(format!(
                "combine got {} output bytes for {received} rows and {} output bytes for {} tokens",
                outputs.len(),
                out.len(),
                self.tokens
            )));
        }
        let epoch = self.epoch;
        let t = self.comm.transport();
        let mut at = 0;
        for (l, &e) in self.local_experts.iter().enumerate() {
            for src in 0..n {
                for slot in 0..self.counts[l * n + src] {
                    t.put(
                        src,
                        &self.win,
                        self.comb_off(epoch, e, slot),
                        &outputs[at..at + rb],
                    )?;
                    at += rb;
                }
            }
        }
        for dst in 0..n {
            t.signal(dst, self.sig_comb + me, SignalOp::Set, epoch << 32)?;
        }
        let deadline = self.comm.deadline();
        for r in 0..n {
            t.wait(self.sig_comb + r, Cmp::Ge, epoch << 32, deadline)?;
        }
        let mut rows: SmallVec<[&[u8]; 8]> = SmallVec::new();
        let mut weights: SmallVec<[f32; 8]> = SmallVec::new();
        for (tok, out_row) in out.chunks_mut(rb).enumerate() {
            rows.clear();
            weights.clear();
            for j in 0..k {
                let (Some(slot), e) = (self.slots[tok * k + j], self.idx[tok * k + j]) else {
                    continue;
                };
                // SAFETY: the expert rank's rows were announced by the signal waited for above
                // and are not rewritten before the next-but-one call.
                rows.push(unsafe {
                    t.local_slice(&self.win, self.comb_off(epoch, e as usize, slot), rb)?
                });
                weights.push(self.weights[tok * k + j]);
            }
            sum_rows(self.cfg.dtype, out_row, &rows, Some(&weights));
        }
        Ok(())
    }
}

impl LowLatencyView<'_> {
    /// This rank's experts, in id order.
    pub fn local_experts(&self) -> &[usize] {
        &self.buf.local_experts
    }

    /// Rows received for local expert number `l` (`local_experts()[l]`), from every source
    /// in rank order.
    pub fn expert_rows(&self, l: usize) -> Result<Vec<ExpertRow<'_>>> {
        let b = self.buf;
        let n = b.comm.world_size();
        if l >= b.local_experts.len() {
            return Err(Error::InvalidArgument(format!(
                "local expert {l} of {}",
                b.local_experts.len()
            )));
        }
        let t = b.comm.transport();
        let mut out = Vec::new();
        for src in 0..n {
            for slot in 0..b.counts[l * n + src] {
                let off = b.disp_off(b.epoch, l, src, slot);
                // SAFETY: announced by the signal the dispatch waited for; not rewritten before
                // the next-but-one call, which cannot start while this view borrows the buffer.
                let rec = unsafe { t.local_slice(&b.win, off, 8 + b.cfg.row_bytes())? };
                let tok = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
                let w = f32::from_le_bytes(rec[4..8].try_into().expect("4 bytes"));
                if tok >= b.cfg.max_tokens || !w.is_finite() {
                    return Err(Error::ProtocolViolation(format!(
                        "row {slot} from rank {src}: token {tok}, weight {w}"
                    )));
                }
                out.push(ExpertRow {
                    src_rank: src,
                    src_token: tok,
                    weight: w,
                    data: &rec[8..],
                });
            }
        }
        Ok(out)
    }

    /// Rows received per local expert.
    pub fn counts(&self) -> Vec<usize> {
        let n = self.buf.comm.world_size();
        (0..self.buf.local_experts.len())
            .map(|l| (0..n).map(|s| self.buf.counts[l * n + s]).sum())
            .collect()
    }
}
