//! Normal-mode dispatch: records and rows to every expert rank, announced per call.

use super::*;
use crate::moe::inputs::check_dispatch;
use crate::moe::record::TokenRecord;

/// A dispatch's expert choices: `topk` (slot, weight) pairs per token (logical experts
/// resolved to slots of the expert map).
struct Choices<'x> {
    idx: &'x [i64],
    weights: &'x [f32],
}

impl Choices<'_> {
    /// Token `tok`'s choices, in top-k order.
    fn of(&self, tok: usize, k: usize) -> impl Iterator<Item = (i64, f32)> + '_ {
        let range = tok * k..(tok + 1) * k;
        self.idx[range.clone()]
            .iter()
            .copied()
            .zip(self.weights[range].iter().copied())
    }
}

/// Where a dispatch sends records: straight to a rank, or to a host through its gateway
/// (two-level routing: host index, gateway rank).
#[derive(Debug, Clone, Copy)]
enum To {
    Rank(usize),
    Host(usize, usize),
}

impl To {
    /// The rank whose window the records go into.
    fn window(self) -> usize {
        match self {
            To::Rank(r) | To::Host(_, r) => r,
        }
    }
}

impl<'c> MoeBuffer<'c> {
    /// Network backends: puts the staged records (packed) at `off` of `dst`'s window in one
    /// vectored put — metadata from the stage, rows from `x` unless they were staged whole
    /// (INT8) — and empties the stage.
    fn put_stage(
        &self,
        dst: usize,
        off: usize,
        x: &[u8],
        stage: &mut Vec<u8>,
        toks: &mut Vec<u32>,
    ) -> Result<()> {
        if stage.is_empty() {
            return Ok(());
        }
        let path = &self.paths[dst];
        if self.cfg.int8_dispatch {
            path.put(off, stage, Stores::Cached)?;
        } else {
            let rb = self.cfg.row_bytes();
            let pad = &ZEROS[..self.rec - self.meta - rb];
            // Three parts per record (metadata, row, padding), at most `STAGE_RECORDS` records.
            let mut parts: SmallVec<[&[u8]; 256]> = SmallVec::new();
            for (meta, &tok) in stage.chunks(self.meta).zip(toks.iter()) {
                let tok = tok as usize;
                parts.extend([meta, &x[tok * rb..(tok + 1) * rb], pad]);
            }
            path.put_vectored(off, &parts)?;
        }
        stage.clear();
        toks.clear();
        Ok(())
    }

    /// Collective: dispatches `T` tokens. `x` holds `T` rows of the configured dtype,
    /// `topk_idx` and `topk_weights` `T × top-k` entries (`-1` = no expert). Every argument
    /// is checked before anything is sent; a rank with no tokens still takes part.
    pub fn dispatch<'a>(
        &'a mut self,
        x: &'a [u8],
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<DispatchView<'a>> {
        self.dispatch_rows(x, false, topk_idx, topk_weights)
    }

    /// Zero-copy dispatch ([`MoeConfig::zero_copy_dispatch`]): this rank's `T` input rows,
    /// to be written before [`MoeBuffer::dispatch_in_place`]. Refused while peers may still
    /// read the last ones (from a zero-copy dispatch until its combine has returned).
    ///
    /// ```no_run
    /// # fn main() -> xccl::Result<()> {
    /// use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
    /// let comm = xccl::Communicator::from_env()?;
    /// let mut cfg = MoeConfig::new(8, 64, 2, 16, Dtype::F32);
    /// cfg.zero_copy_dispatch = true;
    /// let mut moe = MoeBuffer::new(&comm, cfg)?;
    /// let (idx, w) = (vec![0i64, 5, 3, 1], vec![0.5f32; 4]); // two tokens
    /// moe.input(2)?.fill(0); // the producer writes its rows here
    /// let view = moe.dispatch_in_place(&idx, &w)?; // mapped peers read them in place
    /// # drop(view);
    /// # Ok(()) }
    /// ```
    pub fn input(&mut self, tokens: usize) -> Result<&mut [u8]> {
        let at = self.free_input("input")?;
        if tokens > self.cfg.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "{tokens} input rows exceed the configured maximum of {} tokens",
                self.cfg.max_tokens
            )));
        }
        let t = self.comm.transport();
        // SAFETY: this rank's own input rows: peers read them only between a zero-copy
        // dispatch and the end of its combine (`input_busy`, false here), this rank's views
        // of them borrow the buffer, and `&mut self` keeps one such slice at a time.
        unsafe { t.local_slice_mut(self.lease.window(), at, tokens * self.cfg.row_bytes()) }
    }

    /// Collective: dispatches the `T` rows written into [`MoeBuffer::input`] (`T` from
    /// `topk_idx`, as in [`MoeBuffer::dispatch`]). Ranks whose windows are mapped get only
    /// the metadata and read each row where this rank wrote it; the others are sent the rows.
    pub fn dispatch_in_place(
        &mut self,
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<DispatchView<'_>> {
        let at = self.free_input("dispatch_in_place")?;
        let tokens = (topk_idx.len() / self.cfg.topk).min(self.cfg.max_tokens);
        let t = self.comm.transport();
        // SAFETY: this rank's own input rows; they are not written until this dispatch's
        // combine has returned (`input_busy`, set by the dispatch, keeps `input` from
        // handing them out), and the view holding this slice borrows the buffer.
        let x = unsafe { t.local_slice(self.lease.window(), at, tokens * self.cfg.row_bytes())? };
        self.dispatch_rows(x, true, topk_idx, topk_weights)
    }

    /// Where the input rows lie, for `call`: refused without zero-copy dispatch, and while
    /// peers may still read the last ones (from a zero-copy dispatch until its combine).
    fn free_input(&self, call: &str) -> Result<usize> {
        let Some(at) = self.input_at else {
            return Err(Error::InvalidUsage(format!(
                "{call}: input rows need MoeConfig::zero_copy_dispatch"
            )));
        };
        if self.input_busy {
            return Err(Error::InvalidUsage(format!(
                "{call}: the input rows of the last zero-copy dispatch may still be read by \
                 peers; they are free again once its combine has returned (each zero-copy \
                 dispatch needs its combine before the next)"
            )));
        }
        Ok(at)
    }

    /// The dispatch of `x`; with `in_place`, `x` is this rank's input rows and mapped ranks
    /// are sent only the metadata.
    fn dispatch_rows<'a>(
        &'a mut self,
        x: &'a [u8],
        in_place: bool,
        topk_idx: &[i64],
        topk_weights: &[f32],
    ) -> Result<DispatchView<'a>> {
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        // Taken out for the call and put back after (an error path leaves it empty; it is
        // refilled, reusing its memory, by the next call).
        let mut layout = std::mem::take(&mut self.layout);
        // Logical experts to slots (a map whose slot e holds expert e needs no pass).
        let resolve = !self.routing.map.is_identity();
        if resolve {
            let (policy, hosts) = (self.cfg.replica_policy, self.cfg.ranks_per_host);
            let k = self.cfg.topk;
            (self.router).resolve(&self.routing.map, policy, (me, hosts), topk_idx, k)?;
        }
        let slots = std::mem::take(&mut self.router.slots);
        let idx: &[i64] = if resolve { &slots } else { topk_idx };
        let tokens = check_dispatch(
            &self.cfg,
            (&self.routing.slot_rank, n),
            (x, idx, topk_weights),
            &mut self.scales,
            &mut layout,
        );
        let tokens = match tokens {
            Ok(t) => t,
            Err(e) => {
                self.router.slots = slots;
                return Err(e);
            }
        };
        self.stats
            .dispatched(&layout.tokens_per_expert, &self.routing.map);
        self.lease.enter();
        self.disp_epoch += 1;
        let epoch = self.disp_epoch;
        self.tokens = tokens;
        // Set before anything is sent: a failed dispatch may have let peers start reading.
        self.input_busy |= in_place;
        let choices = Choices {
            idx,
            weights: topk_weights,
        };
        let hosts = self.comm.hosts();
        layout.count_hosts(hosts.table());
        // Two-level: one relay per other host first (the network is the long way), then
        // this host's ranks directly.
        if let Some(gw) = &self.gw {
            for r in (0..n).filter(|&r| !hosts.same_host(r, me)) {
                self.sent[r].clear();
            }
            let vias: SmallVec<[(usize, usize); 8]> = (gw.via.iter().enumerate())
                .filter_map(|(h, v)| v.map(|g| (h, g)))
                .collect();
            for step in 0..vias.len() {
                // Hosts in turn from this rank's position, so gateways are not all hit at once.
                let (host, gateway) = vias[(me + step) % vias.len()];
                // The count first: the gateway forwards each chunk as it lands.
                let count = layout.tokens_per_host[host];
                self.announce(gateway, 2, count, 0, epoch)?;
                self.send_records(To::Host(host, gateway), epoch, x, false, &layout, &choices)?;
                self.relayed_to(gateway, count);
            }
        }
        // This rank's own records first (it announces nothing to itself: it knows its count),
        // then every peer's, each announced as soon as its rows are out.
        for step in 0..n {
            let dst = (me + step) % n;
            if self.gw.is_some() && !hosts.same_host(dst, me) {
                continue;
            }
            let leave = in_place && dst != me && self.paths[dst].is_mapped();
            self.send_records(To::Rank(dst), epoch, x, leave, &layout, &choices)?;
            if dst != me {
                self.announce(dst, 0, self.sent[dst].len(), usize::from(leave), epoch)?;
            }
        }
        if self.gw.is_some() {
            self.forward_relays(epoch)?;
        }
        self.collect_counts(epoch)?;
        if self.gw.is_some() {
            self.publish_counts(epoch)?;
        }
        if self.cfg.int8_dispatch {
            self.dequantize_arrivals(epoch)?;
        }
        self.layout = layout;
        self.router.slots = slots;
        self.dispatched = true;
        self.lease.leave();
        Ok(DispatchView { buf: self, x })
    }

    /// Writes into `dst`'s window this rank's record (and row, unless `leave`: `dst` reads it
    /// in place) for each token that chose one of `dst`'s experts, in token order, and notes
    /// the tokens in `sent[dst]`; to a host's gateway, the same for the tokens that chose
    /// one of the host's ranks, into its relay region.
    ///
    /// Over a network path the records are laid out here as in `dst`'s window and sent a
    /// chunk at a time: few large writes instead of two small ones per row, from memory still
    /// in cache. Into a mapped window, large transfers bypass this core's caches: the
    /// receiver reads them next, from another core.
    fn send_records(
        &mut self,
        to: To,
        epoch: u64,
        x: &[u8],
        leave: bool,
        layout: &Layout,
        choices: &Choices<'_>,
    ) -> Result<()> {
        let (me, k, row_bytes) = (self.comm.rank(), self.cfg.topk, self.cfg.row_bytes());
        let dst = to.window();
        self.sent[dst].clear();
        let batch = !self.paths[dst].is_mapped() && dst != me;
        // Records to a gateway leave packed, as over any network path.
        debug_assert!(batch || matches!(to, To::Rank(_)));
        let stage_off = |b: &Self, first: usize| match to {
            To::Rank(_) => b.wire_off(epoch, me, first),
            To::Host(..) => b.relay_off(b.gateways(), epoch, me, first),
        };
        let stores = match dst != me && layout.tokens_per_rank[dst] * row_bytes >= STREAM_BYTES {
            true => Stores::Streaming,
            false => Stores::Cached,
        };
        let mut stage = std::mem::take(&mut self.stage);
        let mut stage_toks = std::mem::take(&mut self.stage_toks);
        stage.clear();
        stage_toks.clear();
        let mut chunk_first = 0;
        let wanted = |tok: usize| match to {
            To::Rank(r) => layout.in_rank(tok, r),
            To::Host(h, _) => layout.in_host(tok, h),
        };
        for tok in (0..self.tokens).filter(|&tok| wanted(tok)) {
            let i = self.sent[dst].len();
            let quantized = self.cfg.int8_dispatch && dst != me;
            let (slot_rank, hosts) = (&self.routing.slot_rank, self.comm.hosts());
            let chosen = choices.of(tok, k).filter(|&(s, _)| {
                s >= 0
                    && match to {
                        To::Rank(r) => slot_rank[s as usize] == r,
                        To::Host(h, _) => hosts.host_of(slot_rank[s as usize]) == h,
                    }
            });
            let scale = quantized.then(|| self.scales[tok]);
            TokenRecord::write(&mut self.meta_buf, k, tok, chosen, scale);
            let row = &x[tok * row_bytes..(tok + 1) * row_bytes];
            if quantized {
                let (dtype, hidden) = (self.cfg.dtype, self.cfg.hidden);
                quant::quantize(dtype, row, hidden, self.scales[tok], &mut self.qrow);
            }
            let data: &[u8] = match (quantized, dst != me && !leave) {
                (true, _) => &self.qrow,
                (false, true) => row,
                // A rank's own rows are not copied: its view reads them from `x`; nor are
                // rows left in place for a mapped rank.
                (false, false) => &[],
            };
            if batch {
                if stage.is_empty() {
                    chunk_first = i;
                }
                stage.extend_from_slice(&self.meta_buf);
                if quantized {
                    let wire = self.wire_rec();
                    stage.extend_from_slice(data);
                    stage.resize(stage.len() + wire - self.meta - data.len(), 0);
                } else {
                    stage_toks.push(tok as u32);
                }
                let records = i + 1 - chunk_first;
                if (records + 1) * self.wire_rec() > STAGE_CHUNK || records == STAGE_RECORDS {
                    let off = stage_off(self, chunk_first);
                    self.put_stage(dst, off, x, &mut stage, &mut stage_toks)?;
                    if let To::Host(..) = to {
                        self.relay_progress(dst, i + 1)?;
                    }
                }
            } else {
                // This epoch's record `i` from this rank is written by this rank only, and
                // `dst` reads it after the announcing signal, which the path orders after
                // these stores (streaming ones too).
                let (path, off) = (&self.paths[dst], self.disp_off(epoch, me, i));
                path.put(off, &self.meta_buf, Stores::Cached)?;
                if !data.is_empty() {
                    path.put(off + self.meta, data, stores)?;
                }
            }
            self.sent[dst].push(tok as u32);
        }
        if batch {
            let off = stage_off(self, chunk_first);
            self.put_stage(dst, off, x, &mut stage, &mut stage_toks)?;
            if let To::Host(..) = to {
                self.relay_progress(dst, self.sent[dst].len())?;
            }
        }
        self.stage = stage;
        self.stage_toks = stage_toks;
        Ok(())
    }

    /// Collects every peer's count for call `epoch` into `recv_counts` (this rank's own is
    /// what it sent itself: its own mailbox slot, where any peer can write, is never read).
    /// Two-level: a rank on another host is announced by its gateway here, in its slot.
    fn collect_counts(&mut self, epoch: u64) -> Result<()> {
        let me = self.comm.rank();
        for src in 0..self.comm.world_size() {
            if src == me {
                self.recv_counts[me] = self.sent[me].len();
                self.rows_at[me] = RowsAt::Sent;
                continue;
            }
            // Relayed here: forwarded to this rank by itself (count and place are kept).
            if self.gw.as_ref().is_some_and(|gw| gw.serves(src)) {
                continue;
            }
            let (count, flag) = self.collect(src, 0, epoch)?;
            // Rows left in place can only be read from a mapped window: the source's own, or
            // (two-level, the source on another host) its gateway's here.
            let gateway = self.gw.as_ref().and_then(|gw| gw.gateway_here(src));
            let at = match flag {
                0 => Some(RowsAt::Sent),
                1 if self.paths[src].is_mapped() => Some(RowsAt::SourceInput),
                2 => gateway.map(RowsAt::Gateway),
                _ => None,
            };
            let Some(at) = at else {
                return Err(Error::ProtocolViolation(format!(
                    "rank {src} announced rows left in place ({flag}) it cannot leave here"
                )));
            };
            self.rows_at[src] = at;
            self.recv_counts[src] = count;
        }
        Ok(())
    }

    /// Rebuilds every INT8 row received from another rank, in place, in the row's dtype.
    fn dequantize_arrivals(&mut self, epoch: u64) -> Result<()> {
        let (me, n, k, hidden) = (
            self.comm.rank(),
            self.comm.world_size(),
            self.cfg.topk,
            self.cfg.hidden,
        );
        let t = self.comm.transport();
        let rb = self.cfg.row_bytes();
        for src in (0..n).filter(|&s| s != me) {
            // Last record first: spreading packed records out to `rec` apart then never
            // overwrites one not yet read (record i moves to a place at or after its own).
            for i in (0..self.recv_counts[src]).rev() {
                let from = if self.paths[src].is_mapped() {
                    self.disp_off(epoch, src, i)
                } else {
                    self.wire_off(epoch, src, i)
                };
                t.read_local(self.lease.window(), from, &mut self.meta_buf)?;
                t.read_local(
                    self.lease.window(),
                    from + self.meta,
                    &mut self.qrow[..hidden],
                )?;
                let scale = TokenRecord::read(&self.meta_buf, k).scale();
                let scale = quant::landed_scale(&scale, src, i)?;
                let to = self.disp_off(epoch, src, i);
                if to != from {
                    t.write_local(self.lease.window(), to, &self.meta_buf)?;
                }
                // SAFETY: the row was announced by the signal `collect` waited for; no peer
                // writes this epoch's region again before the next-but-one dispatch, and no
                // view of it exists yet (the view is created after this).
                let row = unsafe { t.local_slice_mut(self.lease.window(), to + self.meta, rb)? };
                quant::dequantize(self.cfg.dtype, &self.qrow[..hidden], scale, row);
            }
        }
        Ok(())
    }
}
