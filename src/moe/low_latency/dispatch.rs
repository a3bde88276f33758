//! Low-latency dispatch: every token row to its experts' fixed slots, in one round.

use super::*;
use crate::moe::inputs::check_dispatch;
use crate::moe::record::SlotRecord;

impl<'c> LowLatencyBuffer<'c> {
    /// Collective: sends each token row to each of its experts, in one round.
    pub fn dispatch<'a>(
        &'a mut self,
        x: &'a [u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<LowLatencyView<'a>> {
        if self.dispatched {
            return Err(Error::InvalidUsage(
                "low-latency dispatch: the last dispatch has not been combined (each dispatch \
                 needs its combine before the next)"
                    .into(),
            ));
        }
        let n = self.comm.world_size();
        let (_, tokens) = check_dispatch(
            &self.cfg,
            &self.placement,
            n,
            x,
            topk_idx,
            topk_weights,
            &mut self.scales,
        )?;
        if self.cfg.int8_dispatch {
            self.quantize_remote_rows(x, topk_idx, tokens);
        }
        self.lease.enter();
        self.epoch += 1;
        let epoch = self.epoch;
        // Taken out for the call and put back after (an error path leaves it empty; the
        // resize makes the next call whole again).
        let mut next = std::mem::take(&mut self.next);
        next.clear();
        next.resize(self.cfg.experts, 0);
        self.place_rows(x, topk_idx, topk_weights, epoch, &mut next)?;
        self.post_experts(x, &next, epoch)?;
        self.next = next;
        self.idx.clear();
        self.idx.extend_from_slice(topk_idx);
        self.weights.clear();
        self.weights.extend_from_slice(topk_weights);
        self.tokens = tokens;
        self.collect_counts(epoch)?;
        if self.cfg.int8_dispatch {
            self.dequantize_arrivals(epoch)?;
        }
        self.dispatched = true;
        self.lease.leave();
        Ok(LowLatencyView { buf: self, x })
    }

    /// INT8 dispatch: quantizes the rows of the tokens that go to another rank.
    fn quantize_remote_rows(&mut self, x: &[u8], topk_idx: &[i64], tokens: usize) {
        let (me, k, h, rb) = (
            self.comm.rank(),
            self.cfg.topk,
            self.cfg.hidden,
            self.cfg.row_bytes(),
        );
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

    /// Gives every (token, expert) choice its slot (counted per expert in `next`), stages its
    /// record, and writes its row into mapped experts' slots; rows for experts reached over
    /// the network go per expert in [`Self::post_experts`].
    fn place_rows(
        &mut self,
        x: &[u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
        epoch: u64,
        next: &mut [usize],
    ) -> Result<()> {
        let (me, n, k, rb) = (
            self.comm.rank(),
            self.comm.world_size(),
            self.cfg.topk,
            self.cfg.row_bytes(),
        );
        self.per_rank.fill(0);
        for &e in topk_idx.iter().filter(|&&e| e >= 0) {
            self.per_rank[self.placement[e as usize]] += 1;
        }
        // Large transfers into a mapped window bypass this core's caches (the expert's rank
        // reads them next, from another core).
        let stores: SmallVec<[Stores; 8]> = (0..n)
            .map(|r| match r != me && self.per_rank[r] * rb >= STREAM_BYTES {
                true => Stores::Streaming,
                false => Stores::Cached,
            })
            .collect();
        self.slots.clear();
        for (i, &e) in topk_idx.iter().enumerate() {
            if e < 0 {
                self.slots.push(None);
                continue;
            }
            let (e, tok) = (e as usize, i / k);
            let slot = next[e];
            next[e] += 1;
            self.slots.push(Some(slot));
            let (dst, local) = (self.placement[e], self.local_index[e]);
            let at = self.stage_at(e, slot);
            let scale = match self.cfg.int8_dispatch && dst != me {
                true => self.scales[tok],
                false => 0.0,
            };
            let record = &mut self.meta_stage[at..at + SlotRecord::LEN];
            SlotRecord::write(record, tok, topk_weights[i], scale);
            if dst == me || !self.paths[dst].is_mapped() {
                // Own rows are read in place from `x` by the view; over a network the rows go
                // per expert in `post_experts`.
                continue;
            }
            let row = self.wire_row(x, tok);
            // This epoch's slot is written by this rank only; `dst` reads it after the
            // expert's announcement, which the path orders after these stores (streaming
            // ones too).
            let off = self.wire_off(epoch, local, me, slot);
            self.paths[dst].put(off, row, stores[dst])?;
        }
        Ok(())
    }

    /// Sends every expert its rows over a network path, then announces to each expert its
    /// row count and records, header and records in one put with the signal.
    fn post_experts(&mut self, x: &[u8], next: &[usize], epoch: u64) -> Result<()> {
        let me = self.comm.rank();
        for (e, &count) in next.iter().enumerate() {
            let (dst, local) = (self.placement[e], self.local_index[e]);
            if !self.paths[dst].is_mapped() && dst != me {
                self.send_rows(x, e, count, epoch)?;
            }
            let at = e * self.mstride;
            self.mailbox.post(
                &self.paths[dst],
                me,
                local,
                epoch,
                &[count as u64],
                &mut self.meta_stage[at..at + HDR + count * SlotRecord::LEN],
            )?;
        }
        Ok(())
    }

    /// Collects every source's row count for each local expert into `counts`.
    fn collect_counts(&mut self, epoch: u64) -> Result<()> {
        let (n, t) = (self.comm.world_size(), self.comm.transport());
        let deadline = self.comm.deadline();
        for l in 0..self.local_experts.len() {
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
        Ok(())
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
        let mut meta = [0u8; SlotRecord::LEN];
        for l in 0..self.local_experts.len() {
            for src in (0..n).filter(|&s| s != me) {
                for slot in (0..self.counts[l * n + src]).rev() {
                    t.read_local(
                        self.lease.window(),
                        self.meta_off(epoch, l, src, slot),
                        &mut meta,
                    )?;
                    let (_, _, scale) = SlotRecord::read(&meta);
                    let scale = quant::landed_scale(&scale, src, slot)?;
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
}
