//! The MoE communication buffer: one registered window sized once from [`MoeConfig`], and
//! normal-mode dispatch and combine over it.
//!
//! Dispatch puts each token row straight from the caller's input into the window of every
//! rank that holds one of its experts — once per destination rank, however many of that
//! rank's experts chose it — with a small metadata record (source token, the rank's chosen
//! experts and their weights). Rows land grouped by source rank, in token order. Combine
//! brings one row per (token, expert rank) back to the token's home, already reduced over that
//! rank's experts; the home sums the rows in f32 in rank order, so the result is the same bits
//! on every run, and writes the configured dtype. Experts may write their output straight
//! into the window ([`DispatchView::expert_output`]); on shared memory the homes then read it
//! in place.
//!
//! The window holds two epochs of each region (even and odd calls), for the reason given in
//! [`crate::coll::Exchange`]: a rank can write call e+2 only after every peer has sent it
//! call e+1, which a peer does only after it has stopped reading call e. The experts' output
//! region follows the dispatch epochs: on shared memory each home reads a peer's output where
//! the peer's experts wrote it, during combine e, and the peer rewrites that region only at
//! dispatch e+2, which needs the home's dispatch e+1, which follows its combine e.

use super::config::MoeConfig;
use super::layout::{dispatch_layout, Layout};
use super::quant;
use super::sum::sum_rows;
use crate::error::{Error, Result};
use crate::mailbox::Mailbox;
use crate::size::Sizer;
use crate::transport::{Cmp, MappedMem, PeerPath, SignalOp, Stores};
use crate::{Communicator, Lease};
use smallvec::SmallVec;

const LINE: usize = 64;
/// Network backends: records for one rank leave in puts of about this size, and at most
/// this many records at a time.
pub(super) const STAGE_CHUNK: usize = 512 << 10;
pub(super) const STAGE_RECORDS: usize = 64;
/// Padding between a row and the next record.
pub(super) const ZEROS: [u8; LINE] = [0; LINE];
/// Dispatches moving at least this much to one mapped peer use non-temporal stores.
const STREAM_BYTES: usize = 1 << 20;
/// Network backends: a combine returns rows to a home in puts of about this size, each
/// announced by its own signal, so the home sums while the rest is on the way.
const RETURN_CHUNK: usize = 1 << 20;

fn round_line(n: usize) -> usize {
    n.div_ceil(LINE) * LINE
}

/// A dispatched row as the receiving rank sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecvRow<'a> {
    /// Home rank of the token.
    pub src_rank: usize,
    /// The token's index on its home rank.
    pub src_token: usize,
    /// This rank's experts that the token chose, with their gate weights, in top-k order.
    pub experts: Vec<(usize, f32)>,
    /// The token's row (`hidden` elements of the configured dtype).
    pub data: &'a [u8],
}

/// MoE dispatch/combine state of one rank. Dropping it (or [`MoeBuffer::close`]) gives its
/// window and signal words back to the communicator; both are collective.
pub struct MoeBuffer<'c> {
    comm: &'c Communicator,
    cfg: MoeConfig,
    placement: Vec<usize>,
    lease: Lease<'c>,
    meta: usize,
    rec: usize,
    half: usize,
    disp_at: usize,
    out_at: usize,
    comb_at: usize,
    /// Per call, kind 0 (dispatch): rows each source sent here; kind 1 (combine): rows each
    /// expert rank returns for this rank's tokens and where they start in its output.
    mailbox: Mailbox,
    /// This rank's path to each rank's window, by rank. From a mapped rank combine reads the
    /// experts' output straight from its window; the others send it.
    paths: Vec<PeerPath<'c>>,
    /// This rank's own copy of the window.
    own: MappedMem,
    /// Network backends, per source rank: rows of combine output it has put here, counted
    /// over every call (64 bits: never runs out).
    sig_rows: usize,
    /// Network backends: per home, rows this rank returned to it in earlier combines; per
    /// source, rows it returned here in earlier combines (the bases of `sig_rows` values).
    returned: Vec<u64>,
    received: Vec<u64>,
    disp_epoch: u64,
    comb_epoch: u64,
    /// Per destination rank: tokens sent to it by the last dispatch, in order.
    sent: Vec<Vec<u32>>,
    /// Rows received from each source by the last dispatch.
    recv_counts: Vec<usize>,
    /// Tokens of the last dispatch.
    tokens: usize,
    /// The last dispatch has not been combined yet.
    dispatched: bool,
    /// Reused scratch: one metadata record.
    meta_buf: Vec<u8>,
    /// INT8 dispatch: the scale of every token of the call, and one quantized row.
    scales: Vec<f32>,
    qrow: Vec<u8>,
    /// Network backends: the records of one chunk for one destination. INT8 records are
    /// staged whole; otherwise only their metadata is, with the tokens in `stage_toks`, and
    /// the rows go out straight from the caller's input in the same vectored put.
    stage: Vec<u8>,
    stage_toks: Vec<u32>,
    /// Per rank: where its rows start in this rank's expert output, where this rank's rows
    /// start in its expert output (as it announced), and a cursor into the tokens sent to it
    /// (the combine sum).
    starts: Vec<usize>,
    peer_starts: Vec<usize>,
    cursors: Vec<usize>,
    /// Network backends, reused by each combine: the puts (home, first row, end row) that
    /// return this rank's expert output, and per source the rows known to have arrived.
    returns: Vec<(usize, usize, usize)>,
    arrived: Vec<usize>,
}

/// Rows received by the last dispatch, read in place.
pub struct DispatchView<'a> {
    buf: &'a MoeBuffer<'a>,
    /// The caller's input: rows a rank dispatches to itself are read from it in place.
    x: &'a [u8],
}

impl<'c> MoeBuffer<'c> {
    /// Collective: checks the configuration and registers the window: two epochs of
    /// `world × max_tokens` dispatch records and as many rows of expert output (plus, over a
    /// network backend, as many rows where homes receive the output).
    pub fn new(comm: &'c Communicator, cfg: MoeConfig) -> Result<Self> {
        let n = comm.world_size();
        let placement = cfg.placement_for(n)?;
        cfg.check_int8()?;
        // Metadata: source token, local expert count, (expert, weight) per top-k slot, scale.
        let what = format!("an MoE buffer of {n} ranks for {cfg:?}");
        let size = Sizer::new(&what);
        let meta = round_line(12 + 8 * cfg.topk);
        let rec = size.add(&[meta, size.round_up(cfg.row_bytes(), LINE)?])?;
        let mapped = comm.transport().maps_every_peer()?;
        let rows = size.mul(&[n, cfg.max_tokens.max(1)])?;
        let disp = size.mul(&[rows, rec])?;
        let outs = size.round_up(size.mul(&[rows, cfg.row_bytes()])?, LINE)?;
        let comb = if mapped { 0 } else { outs };
        let half = size.add(&[disp, outs, comb])?;
        let mailbox = Mailbox::new(&size, size.mul(&[2, half])?, 2, n, 2, 0)?;
        let lease = comm.lease(
            &what,
            size.add(&[2 * half, mailbox.len()])?,
            mailbox.signal_count() + n,
            &format!("{cfg:?}"),
        )?;
        let mailbox = mailbox.at_signals(lease.signals().start);
        let sig_rows = lease.signals().start + mailbox.signal_count();
        let paths = comm.transport().paths(lease.window())?;
        let own = comm.transport().local_mem(lease.window())?;
        Ok(MoeBuffer {
            comm,
            placement,
            lease,
            meta,
            rec,
            half,
            disp_at: 0,
            out_at: disp,
            comb_at: disp + outs,
            mailbox,
            paths,
            own,
            sig_rows,
            returned: vec![0; n],
            received: vec![0; n],
            disp_epoch: 0,
            comb_epoch: 0,
            sent: vec![Vec::with_capacity(cfg.max_tokens); n],
            recv_counts: vec![0; n],
            tokens: 0,
            dispatched: false,
            meta_buf: vec![0; meta],
            scales: Vec::with_capacity(if cfg.int8_dispatch { cfg.max_tokens } else { 0 }),
            qrow: vec![0; if cfg.int8_dispatch { cfg.hidden } else { 0 }],
            stage: Vec::new(),
            stage_toks: Vec::new(),
            starts: vec![0; n],
            peer_starts: vec![0; n],
            cursors: vec![0; n],
            returns: Vec::new(),
            arrived: vec![0; n],
            cfg,
        })
    }

    /// The configuration.
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
        self.disp_epoch += calls;
        self.comb_epoch += calls;
    }

    fn disp_off(&self, epoch: u64, src: usize, i: usize) -> usize {
        (epoch % 2) as usize * self.half + self.disp_at + (src * self.cfg.max_tokens + i) * self.rec
    }

    /// Network backends: records leave packed, `wire_rec` bytes apart (an INT8 record is half
    /// a full one, and only what it holds crosses the network); the receiver spreads them to
    /// `rec` apart as it dequantizes.
    fn wire_rec(&self) -> usize {
        if self.cfg.int8_dispatch {
            self.meta + round_line(self.cfg.hidden)
        } else {
            self.rec
        }
    }

    /// Network backends: puts the staged records (this rank's records `first..` for `dst`,
    /// packed) into `dst`'s window in one vectored put — metadata from the stage, rows from
    /// `x` unless they were staged whole (INT8) — and empties the stage.
    fn put_stage(
        &self,
        dst: usize,
        epoch: u64,
        first: usize,
        x: &[u8],
        stage: &mut Vec<u8>,
        toks: &mut Vec<u32>,
    ) -> Result<()> {
        if stage.is_empty() {
            return Ok(());
        }
        let off = self.wire_off(epoch, self.comm.rank(), first);
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

    /// Where record `i` from `src` lands when it comes packed (see [`Self::wire_rec`]).
    fn wire_off(&self, epoch: u64, src: usize, i: usize) -> usize {
        self.disp_off(epoch, src, 0) + i * self.wire_rec()
    }

    /// Where this rank's expert output for received row `i` (all sources, in order) lives.
    fn out_off(&self, epoch: u64, i: usize) -> usize {
        (epoch % 2) as usize * self.half + self.out_at + i * self.cfg.row_bytes()
    }

    /// Network backends: where rows returned by `src` land.
    fn comb_off(&self, epoch: u64, src: usize, i: usize) -> usize {
        (epoch % 2) as usize * self.half
            + self.comb_at
            + (src * self.cfg.max_tokens + i) * self.cfg.row_bytes()
    }

    /// Posts this rank's `count` rows (from `start`) of `kind` for call `epoch` to `dst`.
    fn announce(
        &self,
        dst: usize,
        kind: usize,
        count: usize,
        start: usize,
        epoch: u64,
    ) -> Result<()> {
        let mut slot = [0u8; 24];
        let words = [count as u64, start as u64];
        self.mailbox.post(
            &self.paths[dst],
            self.comm.rank(),
            kind,
            epoch,
            &words,
            &mut slot,
        )
    }

    /// Waits for `src`'s announcement of `epoch` and returns its count and start, checked:
    /// `start + count` rows fit in one epoch's region.
    fn collect(&self, src: usize, kind: usize, epoch: u64) -> Result<(usize, usize)> {
        let t = self.comm.transport();
        let deadline = self.comm.deadline();
        let [count, start, ..] = self
            .mailbox
            .collect(t, &self.own, kind, src, epoch, deadline)?;
        let capacity = (self.comm.world_size() * self.cfg.max_tokens) as u64;
        if count > self.cfg.max_tokens as u64 || start > capacity || count > capacity - start {
            return Err(Error::ProtocolViolation(format!(
                "rank {src} announced {count} rows from {start} during call {epoch}"
            )));
        }
        Ok((count as usize, start as usize))
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
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        let k = self.cfg.topk;
        let layout: Layout = dispatch_layout(topk_idx, k, &self.placement, n)?;
        let tokens = topk_idx.len() / k;
        if tokens > self.cfg.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "{tokens} tokens exceed the configured maximum of {}",
                self.cfg.max_tokens
            )));
        }
        if x.len() != tokens * self.cfg.row_bytes() {
            return Err(Error::InvalidArgument(format!(
                "x has {} bytes; {tokens} tokens x hidden {} x {:?} need {}",
                x.len(),
                self.cfg.hidden,
                self.cfg.dtype,
                tokens * self.cfg.row_bytes()
            )));
        }
        if topk_weights.len() != topk_idx.len() {
            return Err(Error::InvalidArgument(format!(
                "{} weights for {} expert choices",
                topk_weights.len(),
                topk_idx.len()
            )));
        }
        if let Some(i) =
            (0..topk_idx.len()).find(|&i| topk_idx[i] >= 0 && !topk_weights[i].is_finite())
        {
            return Err(Error::InvalidArgument(format!(
                "token {} has weight {} for expert {}",
                i / k,
                topk_weights[i],
                topk_idx[i]
            )));
        }
        if self.cfg.int8_dispatch {
            // Scales first: a non-finite value is refused before anything is sent.
            quant::row_scales(self.cfg.dtype, x, self.cfg.hidden, &mut self.scales)?;
        }
        self.lease.enter();
        self.disp_epoch += 1;
        let epoch = self.disp_epoch;
        self.tokens = tokens;
        let row_bytes = self.cfg.row_bytes();
        let mut stage = std::mem::take(&mut self.stage);
        let mut stage_toks = std::mem::take(&mut self.stage_toks);
        for step in 0..n {
            let dst = (me + step) % n;
            self.sent[dst].clear();
            // Over a network backend (no direct mapping of the peer's window), the records for
            // another rank are laid out here as in its window and sent a chunk at a time: few
            // large writes instead of two small frames per row, from memory still in cache.
            let path = &self.paths[dst];
            let batch = !path.is_mapped() && dst != me;
            let mut chunk_first = 0;
            // Large transfers into a mapped window bypass this core's caches: the receiver
            // reads them next, from another core.
            let stores = match dst != me && layout.tokens_per_rank[dst] * row_bytes >= STREAM_BYTES
            {
                true => Stores::Streaming,
                false => Stores::Cached,
            };
            if batch {
                stage.clear();
            }
            for tok in (0..tokens).filter(|&tok| layout.in_rank(tok, dst)) {
                let i = self.sent[dst].len();
                let meta = &mut self.meta_buf;
                meta.fill(0);
                meta[..4].copy_from_slice(&(tok as u32).to_le_bytes());
                let mut local = 0usize;
                for j in 0..k {
                    let e = topk_idx[tok * k + j];
                    if e >= 0 && self.placement[e as usize] == dst {
                        let at = 8 + 8 * local;
                        meta[at..at + 4].copy_from_slice(&(e as i32).to_le_bytes());
                        meta[at + 4..at + 8]
                            .copy_from_slice(&topk_weights[tok * k + j].to_le_bytes());
                        local += 1;
                    }
                }
                meta[4..8].copy_from_slice(&(local as u32).to_le_bytes());
                let quantized = self.cfg.int8_dispatch && dst != me;
                if quantized {
                    let at = 8 + 8 * k;
                    meta[at..at + 4].copy_from_slice(&self.scales[tok].to_le_bytes());
                }
                let off = self.disp_off(epoch, me, i);
                let row = &x[tok * row_bytes..(tok + 1) * row_bytes];
                let data: &[u8] = if quantized {
                    quant::quantize(
                        self.cfg.dtype,
                        row,
                        self.cfg.hidden,
                        self.scales[tok],
                        &mut self.qrow,
                    );
                    &self.qrow
                } else if dst != me {
                    row
                } else {
                    &[] // a rank's own rows are not copied: its view reads them from `x`
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
                        self.put_stage(dst, epoch, chunk_first, x, &mut stage, &mut stage_toks)?;
                    }
                } else {
                    // This epoch's record `i` from this rank is written by this rank only, and
                    // `dst` reads it after the announcing signal, which the path orders after
                    // these stores (streaming ones too).
                    path.put(off, &self.meta_buf, Stores::Cached)?;
                    if !data.is_empty() {
                        path.put(off + self.meta, data, stores)?;
                    }
                }
                self.sent[dst].push(tok as u32);
            }
            if batch {
                self.put_stage(dst, epoch, chunk_first, x, &mut stage, &mut stage_toks)?;
            }
            self.announce(dst, 0, self.sent[dst].len(), 0, epoch)?;
        }
        self.stage = stage;
        self.stage_toks = stage_toks;
        for src in 0..n {
            let count = self.collect(src, 0, epoch)?.0;
            // This rank's own slot lies in its window, where any peer can write: it must say
            // what this rank sent itself (its rows are read from `x` through `sent[me]`).
            if src == me && count != self.sent[me].len() {
                return Err(Error::ProtocolViolation(format!(
                    "rank {me}'s own announcement says {count} rows, it sent itself {}",
                    self.sent[me].len()
                )));
            }
            self.recv_counts[src] = count;
        }
        if self.cfg.int8_dispatch {
            self.dequantize_arrivals(epoch)?;
        }
        self.dispatched = true;
        self.lease.leave();
        Ok(DispatchView { buf: self, x })
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
                let at = 8 + 8 * k;
                let scale = quant::landed_scale(&self.meta_buf[at..at + 4], src, i)?;
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

    /// Collective, after a dispatch: `reduced` holds one row per received row (sources in
    /// rank order, rows in arrival order), already reduced over this rank's experts. Each
    /// goes back to its home; `out` (`T` rows of the dtype) receives, per token, the sum over
    /// the ranks it went to, added in f32 in rank order. Tokens that chose no expert get 0.
    ///
    /// This copies `reduced` into the buffer first; experts that write their output straight
    /// into [`DispatchView::expert_output`] call [`MoeBuffer::combine_in_place`] instead.
    pub fn combine(&mut self, reduced: &[u8], out: &mut [u8]) -> Result<()> {
        super::check_combinable(self.dispatched)?;
        let received: usize = self.recv_counts.iter().sum();
        if reduced.len() != received * self.cfg.row_bytes() {
            return Err(Error::InvalidArgument(format!(
                "combine got {} bytes for {received} received rows of {}",
                reduced.len(),
                self.cfg.row_bytes()
            )));
        }
        // Rows for other ranks go into the window (where homes read or send them from);
        // this rank's own rows are summed from `reduced` in place.
        let (me, rb) = (self.comm.rank(), self.cfg.row_bytes());
        let t = self.comm.transport();
        let mut at = 0;
        for (src, &count) in self.recv_counts.iter().enumerate() {
            if src != me {
                let off = self.out_off(self.disp_epoch, at);
                t.write_local(
                    self.lease.window(),
                    off,
                    &reduced[at * rb..(at + count) * rb],
                )?;
            }
            at += count;
        }
        self.combine_from(Some(reduced), out)
    }

    /// Collective, after a dispatch whose experts wrote their output (one row per received
    /// row, already reduced over this rank's experts) into [`DispatchView::expert_output`]:
    /// brings each row back to its home and writes into `out` (`T` rows of the dtype), per
    /// token, the sum over the ranks it went to, added in f32 in rank order. Tokens that
    /// chose no expert get 0. On shared memory the home reads the rows where the experts
    /// wrote them: no byte is copied between processes.
    pub fn combine_in_place(&mut self, out: &mut [u8]) -> Result<()> {
        self.combine_from(None, out)
    }

    /// The combine; this rank's own rows come from `own` (all received rows, in order) when
    /// given, else from its output region.
    ///
    /// On shared memory every rank announces where its output starts and the homes read it in
    /// place. Over a network the output travels to the homes in chunks, each with a signal
    /// giving the rows sent so far; a home sums a token as soon as its rows are in and sends
    /// its own next chunk whenever it would wait (and in step with its sum otherwise), so
    /// sending, receiving and summing overlap. The announcements then come last and check the
    /// counts.
    fn combine_from(&mut self, own: Option<&[u8]>, out: &mut [u8]) -> Result<()> {
        super::check_combinable(self.dispatched)?;
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        let row_bytes = self.cfg.row_bytes();
        if out.len() != self.tokens * row_bytes {
            return Err(Error::InvalidArgument(format!(
                "combine output has {} bytes; the last dispatch had {} tokens of {row_bytes}",
                out.len(),
                self.tokens
            )));
        }
        self.lease.enter();
        self.dispatched = false;
        self.comb_epoch += 1;
        let epoch = self.comb_epoch;
        let de = self.disp_epoch;
        let t = self.comm.transport();
        let mut base = 0;
        for (s, &c) in self.starts.iter_mut().zip(&self.recv_counts) {
            *s = base;
            base += c;
        }
        // Taken out for the call (put back at the end; an error path leaves them empty, and
        // the resizes make the next call whole again).
        let mut returns = std::mem::take(&mut self.returns);
        let mut arrived = std::mem::take(&mut self.arrived);
        returns.clear();
        arrived.clear();
        arrived.resize(n, 0);
        // Mapped ranks hear first where the rows for them start, and read them in place; the
        // others are sent their rows and hear last (the count check).
        for step in 0..n {
            let src = (me + step) % n;
            if self.paths[src].is_mapped() {
                self.announce(src, 1, self.recv_counts[src], self.starts[src], epoch)?;
            }
        }
        for r in (0..n).filter(|&r| self.paths[r].is_mapped()) {
            self.peer_starts[r] = self.checked_return(r, epoch)?;
        }
        {
            let per = (RETURN_CHUNK / row_bytes.max(1)).max(1);
            for step in 1..n {
                let home = (me + step) % n;
                if self.paths[home].is_mapped() {
                    continue;
                }
                let count = self.recv_counts[home];
                returns.extend(
                    (0..count)
                        .step_by(per)
                        .map(|a| (home, a, (a + per).min(count))),
                );
            }
            // Round robin over the homes, so each gets its first rows early.
            returns.sort_unstable_by_key(|&(home, first, _)| (first, (home + n - me) % n));
        }
        let mut sent_returns = 0;
        // Token by token, rank by rank: the order of the sum is fixed (rank order), so the
        // result is the same bits every run.
        let mut next = std::mem::take(&mut self.cursors);
        next.clear();
        next.resize(n, 0);
        let mut rows: SmallVec<[&[u8]; 8]> = SmallVec::new();
        for (tok, out_row) in out.chunks_mut(row_bytes).enumerate() {
            // Keep the returns ahead of the sum: chunk k goes once k/chunks of the tokens
            // are summed.
            while sent_returns < returns.len() && sent_returns * self.tokens <= tok * returns.len()
            {
                self.send_return(returns[sent_returns], de, epoch)?;
                sent_returns += 1;
            }
            rows.clear();
            for (r, cursor) in next.iter_mut().enumerate() {
                if self.sent[r].get(*cursor) != Some(&(tok as u32)) {
                    continue;
                }
                let i = *cursor;
                *cursor += 1;
                let at = self.starts[me] + i;
                rows.push(if let (true, Some(own)) = (r == me, own) {
                    &own[at * row_bytes..(at + 1) * row_bytes]
                } else if r == me {
                    // SAFETY: this rank's own expert output, written before this call; peers
                    // only read it.
                    unsafe { t.local_slice(self.lease.window(), self.out_off(de, at), row_bytes)? }
                } else if self.paths[r].is_mapped() {
                    let off = self.out_off(de, self.peer_starts[r] + i);
                    // SAFETY: rank r announced these rows with the signal `checked_return`
                    // waited for and does not write this epoch's output region again before
                    // the next-but-one dispatch, which needs this rank's next dispatch first.
                    unsafe { self.paths[r].rows(off, row_bytes)? }
                } else {
                    while arrived[r] <= i {
                        if sent_returns < returns.len() {
                            // Rather than wait, send.
                            self.send_return(returns[sent_returns], de, epoch)?;
                            sent_returns += 1;
                            arrived[r] =
                                self.returned_rows(r, t.signal_value(self.sig_rows + r)?, epoch)?;
                        } else {
                            let want = self.received[r] + i as u64 + 1;
                            let v =
                                t.wait(self.sig_rows + r, Cmp::Ge, want, self.comm.deadline())?;
                            arrived[r] = self.returned_rows(r, v, epoch)?;
                        }
                    }
                    // SAFETY: rank r put this row before the signal read above (the
                    // transport applies a signal after the data it follows) and writes this
                    // epoch's region again only at the next-but-one combine (module docs).
                    unsafe {
                        t.local_slice(self.lease.window(), self.comb_off(epoch, r, i), row_bytes)?
                    }
                });
            }
            sum_rows(self.cfg.dtype, out_row, &rows, None);
        }
        for &ret in &returns[sent_returns..] {
            self.send_return(ret, de, epoch)?;
        }
        for step in 0..n {
            let src = (me + step) % n;
            if !self.paths[src].is_mapped() {
                self.announce(src, 1, self.recv_counts[src], self.starts[src], epoch)?;
            }
        }
        for r in (0..n).filter(|&r| !self.paths[r].is_mapped()) {
            self.checked_return(r, epoch)?;
        }
        for r in (0..n).filter(|&r| r != me && !self.paths[r].is_mapped()) {
            self.received[r] += self.sent[r].len() as u64;
            self.returned[r] += self.recv_counts[r] as u64;
        }
        self.lease.leave();
        self.cursors = next;
        self.returns = returns;
        self.arrived = arrived;
        Ok(())
    }

    /// Waits for `r`'s combine announcement and checks that it returned one row per token
    /// sent to it; gives where its rows start in its output region.
    fn checked_return(&self, r: usize, epoch: u64) -> Result<usize> {
        let (count, start) = self.collect(r, 1, epoch)?;
        if count != self.sent[r].len() {
            return Err(Error::ProtocolViolation(format!(
                "rank {r} returned {count} rows for the {} tokens sent to it",
                self.sent[r].len()
            )));
        }
        Ok(start)
    }

    /// Network backends: puts rows `from..to` of this rank's output for `home` into its
    /// window, with the signal that tells it `to` rows are in.
    fn send_return(
        &self,
        (home, from, to): (usize, usize, usize),
        de: u64,
        epoch: u64,
    ) -> Result<()> {
        let rb = self.cfg.row_bytes();
        let t = self.comm.transport();
        // SAFETY: this rank's own expert output; no peer writes it (peers only read it, and
        // only on mapped backends), and the view that wrote it is gone.
        let rows = unsafe {
            t.local_slice(
                self.lease.window(),
                self.out_off(de, self.starts[home] + from),
                (to - from) * rb,
            )?
        };
        let me = self.comm.rank();
        let value = self.returned[home] + to as u64;
        self.paths[home].put_signal(
            self.comb_off(epoch, me, from),
            rows,
            self.sig_rows + me,
            SignalOp::Set,
            value,
        )
    }

    /// The rows of this call in `r`'s return signal `v` (rows returned over all calls),
    /// checked: no more than were sent to `r`; a value from an earlier call counts none.
    fn returned_rows(&self, r: usize, v: u64, epoch: u64) -> Result<usize> {
        let (base, sent) = (self.received[r], self.sent[r].len() as u64);
        if v > base + sent {
            return Err(Error::ProtocolViolation(format!(
                "rank {r} signalled {} returned rows during call {epoch} ({sent} sent)",
                v - base
            )));
        }
        Ok(v.saturating_sub(base) as usize)
    }
}

impl<'a> DispatchView<'a> {
    /// Rows received from each source rank.
    pub fn counts(&self) -> &[usize] {
        &self.buf.recv_counts
    }

    /// Rows received in all.
    pub fn len(&self) -> usize {
        self.buf.recv_counts.iter().sum()
    }

    /// True when nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` from `src`, its metadata checked (it comes from another process).
    pub fn row(&self, src: usize, i: usize) -> Result<RecvRow<'a>> {
        let b: &'a MoeBuffer<'a> = self.buf;
        let me = b.comm.rank();
        if src >= b.comm.world_size() || i >= b.recv_counts[src] {
            return Err(Error::InvalidArgument(format!(
                "no row {i} from rank {src}"
            )));
        }
        let t = b.comm.transport();
        let off = b.disp_off(b.disp_epoch, src, i);
        // SAFETY: announced by the signal the dispatch waited for; not rewritten before the
        // next-but-one dispatch, which cannot start while this view borrows the buffer.
        let meta = unsafe { t.local_slice(b.lease.window(), off, b.meta)? };
        let rb = b.cfg.row_bytes();
        let data = if src == me {
            let tok = b.sent[me][i] as usize;
            let x: &'a [u8] = self.x;
            &x[tok * rb..(tok + 1) * rb]
        } else {
            // SAFETY: as for `meta`.
            unsafe { t.local_slice(b.lease.window(), off + b.meta, rb)? }
        };
        let word = |at: usize| u32::from_le_bytes(meta[at..at + 4].try_into().expect("4 bytes"));
        let (src_token, local) = (word(0) as usize, word(4) as usize);
        if local == 0 || local > b.cfg.topk || src_token >= b.cfg.max_tokens {
            return Err(Error::ProtocolViolation(format!(
                "row {i} from rank {src}: token {src_token} with {local} local experts"
            )));
        }
        let mut experts = Vec::with_capacity(local);
        for j in 0..local {
            let e = word(8 + 8 * j) as i32;
            let w = f32::from_le_bytes(meta[12 + 8 * j..16 + 8 * j].try_into().expect("4 bytes"));
            if e < 0
                || e as usize >= b.cfg.experts
                || b.placement[e as usize] != me
                || !w.is_finite()
            {
                return Err(Error::ProtocolViolation(format!(
                    "row {i} from rank {src}: expert {e} (weight {w}) is not one of this rank's"
                )));
            }
            experts.push((e as usize, w));
        }
        Ok(RecvRow {
            src_rank: src,
            src_token,
            experts,
            data,
        })
    }

    /// Every received row, sources in rank order.
    pub fn rows(&self) -> Result<Vec<RecvRow<'a>>> {
        (0..self.buf.comm.world_size())
            .flat_map(|s| (0..self.buf.recv_counts[s]).map(move |i| (s, i)))
            .map(|(s, i)| self.row(s, i))
            .collect()
    }

    /// Where this rank's experts write their output for [`MoeBuffer::combine_in_place`]:
    /// `len()` rows of the dtype, one per received row in the order of [`Self::rows`],
    /// each already reduced over this rank's experts. It lives in the registered window, so
    /// on shared memory the homes read it where it is written.
    ///
    /// ```no_run
    /// # fn main() -> xccl::Result<()> {
    /// # use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
    /// # let comm = xccl::Communicator::from_env()?;
    /// # let mut buf = MoeBuffer::new(&comm, MoeConfig::new(8, 64, 2, 16, Dtype::F32))?;
    /// # let (x, idx, w): (Vec<u8>, Vec<i64>, Vec<f32>) = (vec![], vec![], vec![]);
    /// let mut view = buf.dispatch(&x, &idx, &w)?;
    /// let rows = view.rows()?;
    /// let output = view.expert_output()?;
    /// for (row, dst) in rows.iter().zip(output.chunks_mut(64 * 4)) {
    ///     let w: f32 = row.experts.iter().map(|&(_, w)| w).sum();
    ///     for (d, s) in dst.chunks_mut(4).zip(row.data.chunks(4)) {
    ///         let v = w * f32::from_le_bytes(s.try_into().unwrap());
    ///         d.copy_from_slice(&v.to_le_bytes());
    ///     }
    /// }
    /// let mut out = vec![0u8; x.len()];
    /// buf.combine_in_place(&mut out)?;
    /// # Ok(()) }
    /// ```
    pub fn expert_output(&mut self) -> Result<&mut [u8]> {
        let b = self.buf;
        let len = self.len() * b.cfg.row_bytes();
        // SAFETY: peers read this epoch's output region only after this rank announces a
        // combine, which needs the buffer this view borrows; they finished reading it two
        // dispatches ago (see the module docs). `&mut self` keeps one such slice at a time,
        // and the region is disjoint from the received rows `row` hands out.
        unsafe {
            b.comm
                .transport()
                .local_slice_mut(b.lease.window(), b.out_off(b.disp_epoch, 0), len)
        }
    }

    /// Received tokens per local expert (this rank's experts in id order).
    pub fn tokens_per_local_expert(&self) -> Result<Vec<(usize, usize)>> {
        let me = self.buf.comm.rank();
        let mut counts: Vec<(usize, usize)> = (0..self.buf.cfg.experts)
            .filter(|&e| self.buf.placement[e] == me)
            .map(|e| (e, 0))
            .collect();
        for row in self.rows()? {
            for (e, _) in row.experts {
                if let Some(c) = counts.iter_mut().find(|(x, _)| *x == e) {
                    c.1 += 1;
                }
            }
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::{Dtype, MoeConfig};
    use crate::transport::{loopback::Loopback, Caps, MappedMem, PathKind, Transport, Window};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A loopback rank whose reads of one window offset see what a hostile peer wrote there
    /// (a count of `forged` rows) instead of what this rank stored.
    struct Tampered {
        inner: Loopback,
        at: Arc<AtomicUsize>,
        forged: u64,
    }

    impl Transport for Tampered {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn caps(&self) -> Caps {
            self.inner.caps()
        }
        fn register(&self, len: usize) -> Result<Window> {
            self.inner.register(len)
        }
        fn deregister(&self, win: Window) -> Result<()> {
            self.inner.deregister(win)
        }
        fn put(&self, peer: usize, win: &Window, offset: usize, data: &[u8]) -> Result<()> {
            self.inner.put(peer, win, offset, data)
        }
        fn get(&self, peer: usize, win: &Window, offset: usize, out: &mut [u8]) -> Result<()> {
            self.inner.get(peer, win, offset, out)
        }
        fn signal(&self, peer: usize, index: usize, op: SignalOp, value: u64) -> Result<()> {
            self.inner.signal(peer, index, op, value)
        }
        fn wait(&self, index: usize, cmp: Cmp, value: u64, deadline: Instant) -> Result<u64> {
            self.inner.wait(index, cmp, value, deadline)
        }
        fn signal_value(&self, index: usize) -> Result<u64> {
            self.inner.signal_value(index)
        }
        fn flush(&self, peer: usize) -> Result<()> {
            self.inner.flush(peer)
        }
        fn abort(&self) {
            self.inner.abort()
        }
        fn close(&self, deadline: Instant) -> Result<()> {
            self.inner.close(deadline)
        }
        fn local_mem(&self, win: &Window) -> Result<MappedMem> {
            self.inner.local_mem(win)
        }
        fn path_kind(&self, peer: usize) -> Result<PathKind> {
            self.inner.path_kind(peer)
        }
        fn map_peer(&self, peer: usize, win: &Window) -> Result<Option<MappedMem>> {
            self.inner.map_peer(peer, win)
        }
        fn put_signal(
            &self,
            peer: usize,
            win: &Window,
            offset: usize,
            data: &[u8],
            index: usize,
            op: SignalOp,
            value: u64,
        ) -> Result<()> {
            // A mailbox slot (the call number, then the count) landing in this rank's own
            // slot carries the forged count instead.
            let mut data = data.to_vec();
            if peer == self.rank() && offset == self.at.load(Ordering::SeqCst) && data.len() >= 16 {
                data[8..16].copy_from_slice(&self.forged.to_le_bytes());
            }
            self.inner
                .put_signal(peer, win, offset, &data, index, op, value)
        }
    }

    /// A peer that writes a larger row count into a rank's own announcement slot makes that
    /// rank's dispatch fail with a protocol error (it used to index past the rows it sent).
    #[test]
    fn a_forged_count_in_the_own_slot_is_a_protocol_error() {
        let at = Arc::new(AtomicUsize::new(usize::MAX));
        let ranks: Vec<Box<dyn Transport>> = Loopback::create(2)
            .unwrap()
            .into_iter()
            .map(|inner| {
                let forged = if inner.rank() == 0 { 8 } else { 0 };
                Box::new(Tampered {
                    inner,
                    at: at.clone(),
                    forged,
                }) as Box<dyn Transport>
            })
            .collect();
        let results: Vec<Result<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|t| {
                    let at = at.clone();
                    s.spawn(move || -> Result<usize> {
                        let comm = Communicator::from_transport(t, Duration::from_secs(20))?;
                        let me = comm.rank();
                        let cfg = MoeConfig::new(4, 16, 1, 8, Dtype::F32);
                        let mut buf = MoeBuffer::new(&comm, cfg)?;
                        if me == 0 {
                            // Epoch 1, dispatch counts, this rank's own slot.
                            at.store(buf.mailbox.slot_off(1, 0, 0), Ordering::SeqCst);
                        }
                        comm.barrier()?;
                        // Two tokens, both to this rank's own experts.
                        let x = vec![0u8; 2 * 16 * 4];
                        let experts = [2 * me as i64, 2 * me as i64 + 1];
                        let r = buf.dispatch(&x, &experts, &[1.0, 1.0]);
                        let rows = r.and_then(|view| view.rows().map(|rows| rows.len()));
                        if me == 0 {
                            comm.abort(); // the peer must not wait for a combine
                        }
                        rows
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        match &results[0] {
            Err(Error::ProtocolViolation(m)) => assert!(m.contains("own announcement"), "{m}"),
            other => panic!("rank 0: {other:?}"),
        }
    }
}
