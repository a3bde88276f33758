//! Low-latency combine: each token's expert outputs, weighted and summed in top-k order,
//! read in place from mapped ranks and sent by the others.

use super::*;

impl<'c> LowLatencyBuffer<'c> {
    /// Collective, after a dispatch: `outputs` holds, for every local expert (in id order),
    /// every source (in rank order), one output row per received row — the expert's output,
    /// unweighted. `out` (`T` rows) receives Σ_j w_j · output(token, expert_j) in top-k order.
    ///
    /// This copies `outputs` into the buffer first; experts that write straight into
    /// [`LowLatencyView::expert_output`] call [`LowLatencyBuffer::combine_in_place`].
    pub fn combine(&mut self, outputs: &[u8], out: &mut [u8]) -> Result<()> {
        crate::moe::check_combinable(self.dispatched)?;
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
        crate::moe::check_combinable(self.dispatched)?;
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
