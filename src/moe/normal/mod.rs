//! The MoE communication buffer: one registered window sized once from [`MoeConfig`], and
//! normal-mode dispatch and combine over it.
//!
//! Dispatch puts each token row straight from the caller's input into the window of every
//! rank that holds one of its experts — once per destination rank, however many of that
//! rank's experts chose it — with a small metadata record (source token, the rank's chosen
//! experts and their weights). Rows land grouped by source rank, in token order. Across hosts
//! a token may instead cross the network once per remote host, to a gateway rank there that
//! its host's ranks read it from (two-level routing: `gateways`). Combine
//! brings one row per (token, expert rank) back to the token's home, already reduced over that
//! rank's experts; the home sums the rows in f32 in a fixed order (per host, then across hosts:
//! [`MoeBuffer::combine`]), so the result is the same bits
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
use super::eplb::{ExpertMap, Router, Routing};
use super::layout::Layout;
use super::quant;
use super::record::TokenRecord;
use super::stats::MoeStats;
use super::sum::{sum_rows, sum_rows_stored};
use crate::copy::store_fence;
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
/// Combine outputs of at least this many bytes are written with non-temporal stores: they
/// outgrow the caches anyway, and each cached store would first read its line. Measured on
/// 2 ranks (hidden 7168 bf16, top-8 of 64): combine 14–27 % faster from 512 tokens (7 MiB)
/// up, 10 % slower at 32–128 tokens (up to 1.8 MiB), where the output stays in cache.
const STREAM_OUTPUT: usize = 4 << 20;
/// Network backends: a combine returns rows to a home in puts of about this size, each
/// announced by its own signal, so the home sums while the rest is on the way.
const RETURN_CHUNK: usize = 1 << 20;

fn round_line(n: usize) -> usize {
    n.div_ceil(LINE) * LINE
}

/// Where the rows a source dispatched to this rank lie (each announcement says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowsAt {
    /// In this rank's window, after their records (or, from itself, in the caller's input).
    Sent,
    /// Zero-copy dispatch: in the source's input rows, in its window (mapped).
    SourceInput,
    /// Two-level routing: where the source relayed them, in its gateway's window on this
    /// host (mapped), at the record's relay index.
    Gateway(usize),
}

impl RowsAt {
    /// The announcement's flag word.
    fn flag(self) -> usize {
        match self {
            RowsAt::Sent => 0,
            RowsAt::SourceInput => 1,
            RowsAt::Gateway(_) => 2,
        }
    }
}

/// A dispatched row as the receiving rank sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecvRow<'a> {
    /// Home rank of the token.
    pub src_rank: usize,
    /// The token's index on its home rank.
    pub src_token: usize,
    /// This rank's experts that the token chose (logical expert ids), with their gate
    /// weights, in top-k order.
    pub experts: Vec<(usize, f32)>,
    /// The physical slot ([`crate::moe::ExpertMap`]) that serves each of `experts`.
    pub slots: Vec<usize>,
    /// The token's row (`hidden` elements of the configured dtype).
    pub data: &'a [u8],
}

/// MoE dispatch/combine state of one rank. Dropping it (or [`MoeBuffer::close`]) gives its
/// window and signal words back to the communicator; both are collective.
///
/// One MoE layer on every rank: each token's row goes once to each rank holding one of its
/// top-k experts; that rank computes its experts' weighted sum per row; combine brings the
/// sums home and adds them up.
///
/// ```no_run
/// use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
///
/// let comm = xccl::Communicator::from_env()?;
/// // 64 experts spread over the ranks, hidden 7168, top-8, at most 128 tokens per call.
/// let cfg = MoeConfig::new(64, 7168, 8, 128, Dtype::F32);
/// let mut moe = MoeBuffer::new(&comm, cfg.clone())?; // collective
/// let tokens = 128;
/// let x = vec![0u8; tokens * cfg.row_bytes()]; // this rank's tokens, f32 rows
/// let idx: Vec<i64> = (0..tokens * 8).map(|i| (i % 64) as i64).collect(); // top-k experts
/// let w = vec![0.125f32; tokens * 8]; // their gate weights
/// let view = moe.dispatch(&x, &idx, &w)?;
/// let mut reduced = Vec::new();
/// for row in view.rows()? {
///     // Expert FFNs here; identity experts return the weighted sum of the row itself.
///     let ws: f32 = row.experts.iter().map(|&(_, w)| w).sum();
///     for v in row.data.chunks(4) {
///         let v = f32::from_ne_bytes(v.try_into().unwrap()) * ws;
///         reduced.extend_from_slice(&v.to_ne_bytes());
///     }
/// }
/// let mut out = vec![0u8; x.len()];
/// moe.combine(&reduced, &mut out)?; // out[t] = sum over t's experts
/// moe.close()?;
/// comm.close()?;
/// # Ok::<(), xccl::Error>(())
/// ```
pub struct MoeBuffer<'c> {
    comm: &'c Communicator,
    cfg: MoeConfig,
    /// The expert slots ([`MoeConfig::map`], or the placement's) as this rank routes.
    routing: Routing,
    /// Resolves each dispatch's logical experts to slots.
    router: Router,
    /// Rows dispatched per logical expert and time waited per peer.
    stats: MoeStats,
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
    /// Where the last dispatch's tokens went (reused by every call).
    layout: Layout,
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
    /// Zero-copy dispatch ([`MoeConfig::zero_copy_dispatch`]): where this rank's input rows
    /// lie in the window (`max_tokens` rows, `row_bytes` apart).
    input_at: Option<usize>,
    /// Per source: where the rows of the last dispatch lie.
    rows_at: Vec<RowsAt>,
    /// Peers may be reading this rank's input rows: from its zero-copy dispatch until its
    /// combine has heard from every mapped peer (which speaks only when done reading). A
    /// failed combine leaves it set: the input is not handed out again.
    input_busy: bool,
    /// Two-level routing across hosts ([`crate::moe::TwoLevel`]), when chosen.
    gw: Option<Gateways>,
    /// Combine: the ranks in the order a home adds their rows (by host, then rank), and one
    /// partial sum per host (scratch).
    sum_order: Vec<usize>,
    partials: Vec<u8>,
}

/// Rows received by the last dispatch, read in place.
pub struct DispatchView<'a> {
    buf: &'a MoeBuffer<'a>,
    /// The caller's input: rows a rank dispatches to itself are read from it in place.
    x: &'a [u8],
}

mod combine;
mod dispatch;
mod gateways;
use gateways::Gateways;
#[cfg(test)]
mod tests;
mod view;
pub(in crate::moe) use view::Chosen;

impl<'c> MoeBuffer<'c> {
    /// `world × max_tokens` dispatch records and as many rows of expert output (plus, over a
    /// network backend, as many rows where homes receive the output).
    pub fn new(comm: &'c Communicator, cfg: MoeConfig) -> Result<Self> {
        let n = comm.world_size();
        let map = cfg.map_for(n)?;
        cfg.check_int8()?;
        // Metadata: source token, local expert count, (expert, weight) per top-k slot, scale.
        let what = format!("an MoE buffer of {n} ranks for {cfg:?}");
        let size = Sizer::new(&what);
        let meta = TokenRecord::len(cfg.topk);
        let rec = size.add(&[meta, size.round_up(cfg.row_bytes(), LINE)?])?;
        let mapped = comm.transport().maps_every_peer()?;
        let rows = size.mul(&[n, cfg.max_tokens.max(1)])?;
        let disp = size.mul(&[rows, rec])?;
        let outs = size.round_up(size.mul(&[rows, cfg.row_bytes()])?, LINE)?;
        let comb = if mapped { 0 } else { outs };
        let two_level = gateways::decide(comm, &cfg)?;
        let regions = Gateways::regions(&size, n, cfg.max_tokens, (rec, cfg.row_bytes()))?;
        let gw_len = match two_level {
            true => size.add(&[regions.relay, regions.partial, regions.table])?,
            false => 0,
        };
        let half = size.add(&[disp, outs, comb, gw_len])?;
        // Words: the row count, where the rows start (dispatch: left in place or not), and
        // the expert map's version. Kinds: dispatch, combine, and (two-level) relayed records.
        let kinds = 2 + usize::from(two_level);
        let mailbox = Mailbox::new(&size, size.mul(&[2, half])?, kinds, n, 3)?;
        // Zero-copy dispatch: the input rows after the mailbox (one set: a source rewrites
        // them only after every peer has finished reading, see `input_busy`).
        let input_at = size.add(&[2 * half, mailbox.len()])?;
        let input = match cfg.zero_copy_dispatch {
            true => size.mul(&[cfg.max_tokens, cfg.row_bytes()])?,
            false => 0,
        };
        let lease = comm.lease(
            &what,
            size.add(&[input_at, input])?,
            // Per source: rows returned (and, two-level, records relayed) over every call.
            mailbox.signal_count() + n * (1 + usize::from(two_level)),
            &format!("{cfg:?} two-level {two_level}"),
        )?;
        let mailbox = mailbox.at_signals(lease.signals().start);
        let sig_rows = lease.signals().start + mailbox.signal_count();
        let hosts = comm.hosts();
        let gw = two_level.then(|| {
            let at = (disp + outs + comb, sig_rows + n);
            Gateways::new(hosts, comm.rank(), at, &regions)
        });
        let mut sum_order: Vec<usize> = (0..n).collect();
        sum_order.sort_by_key(|&r| (hosts.host_of(r), r));
        let (paths, own) = lease.views()?;
        Ok(MoeBuffer {
            comm,
            routing: Routing::new(map, comm.rank()),
            router: Router::default(),
            stats: MoeStats::new(cfg.experts, n),
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
            layout: Layout::default(),
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
            input_at: cfg.zero_copy_dispatch.then_some(input_at),
            rows_at: vec![RowsAt::Sent; n],
            input_busy: false,
            gw,
            sum_order,
            partials: Vec::new(),
            cfg,
        })
    }

    /// Collective, between calls: routes later dispatches through `map` (every rank must
    /// pass the same map: otherwise `ConfigMismatch` on every rank and the old map stays).
    /// Takes effect at the next dispatch; refused between a dispatch and its combine.
    ///
    /// ```no_run
    /// # fn main() -> xccl::Result<()> {
    /// use xccl::moe::{rebalance, Dtype, MapShape, MoeBuffer, MoeConfig};
    /// let comm = xccl::Communicator::from_env()?;
    /// let coll = xccl::coll::Coll::new(&comm)?;
    /// let mut buf = MoeBuffer::new(&comm, MoeConfig::new(64, 7168, 8, 128, Dtype::Bf16))?;
    /// // ... dispatch and combine some steps, then, from the job-wide load of those steps
    /// // (the same on every rank, so every rank computes the same map):
    /// let load = buf.take_stats().job_expert_rows(&coll)?;
    /// let load: Vec<f64> = load.iter().map(|&c| c as f64).collect();
    /// let n = comm.world_size();
    /// // Four replica slots per rank beyond an even share of the experts.
    /// let shape = MapShape { ranks: n, slots_per_rank: 64usize.div_ceil(n) + 4, ranks_per_host: None };
    /// let map = rebalance(&load, &shape, Some(buf.map()))?;
    /// buf.set_map(map)?; // on every rank, with the same map
    /// # Ok(()) }
    /// ```
    pub fn set_map(&mut self, map: ExpertMap) -> Result<()> {
        if self.dispatched {
            return Err(Error::InvalidUsage(
                "set_map between a dispatch and its combine (a map changes at a step boundary)"
                    .into(),
            ));
        }
        let mut cfg = self.cfg.clone();
        cfg.map = Some(map);
        let map = cfg.map_for(self.comm.world_size())?;
        let text = format!("fingerprint {:016x}", map.fingerprint());
        self.comm.agree("the MoE expert map", &text)?;
        self.cfg = cfg;
        self.routing = Routing::new(map, self.comm.rank());
        Ok(())
    }

    /// The expert map dispatch routes through.
    pub fn map(&self) -> &ExpertMap {
        &self.routing.map
    }

    /// What the buffer has counted since it was made or last reset: rows per logical expert
    /// and time waited per peer ([`MoeStats`]).
    pub fn stats(&self) -> &MoeStats {
        &self.stats
    }

    /// The statistics, restarted (the caller chooses the window of steps they cover).
    pub fn take_stats(&mut self) -> MoeStats {
        let fresh = MoeStats::new(self.cfg.experts, self.comm.world_size());
        std::mem::replace(&mut self.stats, fresh)
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// Where the last dispatch's tokens went: tokens per rank, per expert and per host.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether this buffer routes across hosts in two levels ([`crate::moe::TwoLevel`]): the
    /// choice every rank made alike when it was created.
    pub fn two_level(&self) -> bool {
        self.gw.is_some()
    }

    /// Rows this rank sent to other hosts: by the last dispatch, and by its combine once
    /// that has run (what two-level routing saves; the harness sums it over the ranks).
    ///
    /// ```no_run
    /// # fn main() -> xccl::Result<()> {
    /// # use xccl::moe::{Dtype, MoeBuffer, MoeConfig};
    /// # let comm = xccl::Communicator::from_env()?;
    /// # let mut buf = MoeBuffer::new(&comm, MoeConfig::new(8, 64, 2, 16, Dtype::F32))?;
    /// # let (x, idx, w): (Vec<u8>, Vec<i64>, Vec<f32>) = (vec![], vec![], vec![]);
    /// let view = buf.dispatch(&x, &idx, &w)?;
    /// # drop(view);
    /// let (dispatched, _) = buf.rows_across_hosts();
    /// println!("{dispatched} rows left this host");
    /// # Ok(()) }
    /// ```
    pub fn rows_across_hosts(&self) -> (usize, usize) {
        let me = self.comm.rank();
        let away = |r: &usize| !self.comm.hosts().same_host(*r, me);
        let n = self.comm.world_size();
        let dispatched = (0..n).filter(away).map(|r| self.sent[r].len()).sum();
        let combined = match self.dispatched {
            true => 0,
            false => (0..n).filter(away).filter_map(|r| self.returns_to(r)).sum(),
        };
        (dispatched, combined)
    }

    /// This rank's logical experts, ascending.
    pub(in crate::moe) fn local_experts(&self) -> &[usize] {
        &self.routing.local_experts
    }

    /// The slot of each of [`Self::local_experts`].
    pub(in crate::moe) fn local_slots(&self) -> &[usize] {
        &self.routing.local_slots
    }

    /// Whether the last dispatch awaits its combine.
    pub(in crate::moe) fn is_dispatched(&self) -> bool {
        self.dispatched
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

    /// Where record `i` from `src` lands when it comes packed (see [`Self::wire_rec`]).
    fn wire_off(&self, epoch: u64, src: usize, i: usize) -> usize {
        self.disp_off(epoch, src, 0) + i * self.wire_rec()
    }

    /// Zero-copy dispatch: where input row `tok` lies (in any rank's window).
    fn input_off(&self, tok: usize) -> Option<usize> {
        self.input_at.map(|at| at + tok * self.cfg.row_bytes())
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

    /// Posts this rank's `count` rows (from `start`) of `kind` (0: dispatch, 1: combine, 2:
    /// records relayed to a gateway) for call `epoch` to `dst`.
    fn announce(
        &self,
        dst: usize,
        kind: usize,
        count: usize,
        start: usize,
        epoch: u64,
    ) -> Result<()> {
        let mut slot = [0u8; 32];
        let words = [count as u64, start as u64, self.routing.map.version()];
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
        let began = std::time::Instant::now();
        let [count, start, version, ..] = self
            .mailbox
            .collect(t, &self.own, kind, src, epoch, deadline)?;
        self.stats.waited(kind, src, began.elapsed());
        if version != self.routing.map.version() {
            return Err(Error::ConfigMismatch(format!(
                "rank {src} sent call {epoch} through expert map version {version}; this rank                  ({}) has version {} (set_map must be called on every rank)",
                self.comm.rank(),
                self.routing.map.version()
            )));
        }
        let capacity = (self.comm.world_size() * self.cfg.max_tokens) as u64;
        if count > self.cfg.max_tokens as u64 || start > capacity || count > capacity - start {
            return Err(Error::ProtocolViolation(format!(
                "rank {src} announced {count} rows from {start} during call {epoch}"
            )));
        }
        Ok((count as usize, start as usize))
    }
}
