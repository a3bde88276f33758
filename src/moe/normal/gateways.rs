//! Two-level dispatch and combine across hosts: each token crosses the network once per
//! remote host, to a gateway rank there, and each host's expert output is summed there so one
//! row per (token, host) crosses back.
//!
//! Source `s` relays to the rank with its own index among its host's ranks on every other
//! host (modulo that host's size): its gateway there. It announces the count first, then
//! sends the records in chunks, each followed by a progress signal, so the gateway forwards
//! while the rest is on the way. Forwarding writes, into the window of every rank of the host
//! that the token chose, the record the source would have sent it (its experts there) with the
//! relay index; the row stays in the gateway's window and the ranks read it in place (INT8 rows
//! are copied: each rank rebuilds them where they land). The gateway announces the counts in
//! the source's mailbox slot on its behalf, so a receiver sees the same rows, in the same
//! order, as from a flat dispatch.
//!
//! In combine each rank publishes, with its combine announcement, how many rows it received
//! from each source (a table in its window); the gateway reads the rows its host's ranks
//! produced for a source in place, sums them per token in rank order (f32, rounded to the
//! dtype: the per-host sum of the flat combine's order) and returns one row per relayed token.

use super::*;
use crate::bootstrap::Hosts;
use crate::moe::config::TwoLevel;
use crate::moe::record::TokenRecord;
use crate::transport::PathKind;

/// Most ranks one host may hold for two-level routing: the ranks a relayed token goes to are
/// a bit mask of one word.
const MAX_LOCAL: usize = 64;

/// Who relays for whom, and what the last dispatch relayed (two-level routing).
pub(super) struct Gateways {
    /// By host: the rank this rank relays its tokens through (none for its own host).
    pub(super) via: Vec<Option<usize>>,
    /// This host's ranks, ascending.
    local: Vec<usize>,
    /// By rank: its gateway on this host (none for this host's ranks).
    here: Vec<Option<usize>>,
    /// This rank.
    me: usize,
    /// Where, in an epoch's half of the window, relayed records land (by source), partial
    /// sums are staged (by source), and this rank's table of rows received per source lies.
    relay_at: usize,
    partial_at: usize,
    table_at: usize,
    /// By served source, the last dispatch: per relayed row, the local ranks (bits by index
    /// in `local`) it was forwarded to, and `local.len()` entries per row: for each of those
    /// ranks, the row's index among the rows forwarded to it.
    masks: Vec<Vec<u64>>,
    index: Vec<Vec<u32>>,
    /// By served source: rows forwarded to each local rank (by index in `local`).
    forwarded: Vec<Vec<usize>>,
    /// Combine, by served source: where each local rank's rows for it start in that rank's
    /// expert output.
    starts: Vec<Vec<usize>>,
    /// Signal words, by source: records it relayed here over every call (set after each
    /// chunk, so forwarding starts while the rest is on the way).
    sig_relay: usize,
    /// Records this rank relayed to each gateway, and each source relayed here, in earlier
    /// calls (the bases of the `sig_relay` values).
    relay_sent: Vec<u64>,
    relay_got: Vec<u64>,
}

/// Window bytes two-level routing adds to each epoch's half.
pub(super) struct GatewayRegions {
    pub relay: usize,
    pub partial: usize,
    pub table: usize,
}

/// Collective: whether this buffer routes across hosts in two levels ([`TwoLevel`]): every
/// rank must see the same hosts and map every peer on its own host; `On` where that does not
/// hold is refused on every rank.
pub(super) fn decide(comm: &Communicator, cfg: &MoeConfig) -> Result<bool> {
    let (me, hosts) = (comm.rank(), comm.hosts());
    let t = comm.transport();
    let (_, local) = hosts.local(me);
    let mut able = local <= MAX_LOCAL;
    for r in (0..comm.world_size()).filter(|&r| r != me && hosts.same_host(r, me)) {
        able &= t.path_kind(r)? == PathKind::Mapped;
    }
    let all = comm.all_able(&format!("{:?}", hosts.table()), able)?;
    if cfg.two_level == TwoLevel::On && !all {
        return Err(Error::InvalidArgument(format!(
            "two-level MoE routing needs every rank to map the peers on its host (at most \
             {MAX_LOCAL} per host) and to see the same hosts; this rank ({me}) sees hosts {:?}",
            hosts.table()
        )));
    }
    // Automatically only where it saves something: a host with more than one rank.
    let shared = (0..hosts.count()).any(|h| hosts.ranks_on(h).len() > 1);
    Ok(match cfg.two_level {
        TwoLevel::Off => false,
        TwoLevel::Auto => all && hosts.count() > 1 && shared,
        TwoLevel::On => hosts.count() > 1,
    })
}

impl Gateways {
    /// Sizes of the regions for `world` sources of `max_tokens` records of `rec` bytes and
    /// rows of `row_bytes`.
    pub(super) fn regions(
        size: &Sizer<'_>,
        world: usize,
        max_tokens: usize,
        (rec, row_bytes): (usize, usize),
    ) -> Result<GatewayRegions> {
        let rows = size.mul(&[world, max_tokens.max(1)])?;
        Ok(GatewayRegions {
            relay: size.mul(&[rows, rec])?,
            partial: size.round_up(size.mul(&[rows, row_bytes])?, LINE)?,
            table: size.round_up(size.mul(&[world, 8])?, LINE)?,
        })
    }

    /// The plan of rank `me` on `hosts`: its regions from `at` in each half, its `n` signal
    /// words from `sig_relay`.
    pub(super) fn new(
        hosts: &Hosts,
        me: usize,
        (at, sig_relay): (usize, usize),
        regions: &GatewayRegions,
    ) -> Self {
        let n = hosts.table().len();
        let host = hosts.host_of(me);
        let gateway = |s: usize, h: usize| {
            let ranks = hosts.ranks_on(h);
            ranks[hosts.local(s).0 % ranks.len()]
        };
        let via = (0..hosts.count())
            .map(|h| (h != host).then(|| gateway(me, h)))
            .collect();
        let here = (0..n)
            .map(|s| (hosts.host_of(s) != host).then(|| gateway(s, host)))
            .collect();
        Gateways {
            via,
            local: hosts.ranks_on(host),
            here,
            me,
            relay_at: at,
            partial_at: at + regions.relay,
            table_at: at + regions.relay + regions.partial,
            masks: vec![Vec::new(); n],
            index: vec![Vec::new(); n],
            forwarded: vec![Vec::new(); n],
            starts: vec![Vec::new(); n],
            sig_relay,
            relay_sent: vec![0; n],
            relay_got: vec![0; n],
        }
    }

    /// The gateway on this host of source `src` on another host (`None` for this host's).
    pub(super) fn gateway_here(&self, src: usize) -> Option<usize> {
        self.here[src]
    }

    /// Whether this rank is the gateway here of `src`.
    pub(super) fn serves(&self, src: usize) -> bool {
        self.here[src] == Some(self.me)
    }

    /// Whether rank `r` returns rows to this rank over the network (it relays for it).
    pub(super) fn returns_from(&self, r: usize) -> bool {
        self.via.contains(&Some(r))
    }

    /// Rows this rank returns to `home` (relayed for it by the last dispatch).
    pub(super) fn relayed(&self, home: usize) -> usize {
        self.masks[home].len()
    }
}

impl<'c> MoeBuffer<'c> {
    pub(super) fn gateways(&self) -> &Gateways {
        self.gw.as_ref().expect("two-level routing")
    }

    /// Where relayed record `j` from `src` lands in a gateway's window (packed, as records
    /// sent over a network are: [`Self::wire_rec`] apart). `gw`: this rank's plan (the same
    /// regions on every rank), passed where it is taken out of the buffer.
    pub(super) fn relay_off(&self, gw: &Gateways, epoch: u64, src: usize, j: usize) -> usize {
        (epoch % 2) as usize * self.half
            + gw.relay_at
            + src * self.cfg.max_tokens * self.rec
            + j * self.wire_rec()
    }

    /// Where the gateway stages the partial sum for relayed token `j` of `src`.
    fn partial_off(&self, gw: &Gateways, epoch: u64, src: usize, j: usize) -> usize {
        (epoch % 2) as usize * self.half
            + gw.partial_at
            + (src * self.cfg.max_tokens + j) * self.cfg.row_bytes()
    }

    /// Where a rank's table of rows received per source lies, for dispatch `epoch`.
    fn table_off(&self, gw: &Gateways, epoch: u64) -> usize {
        (epoch % 2) as usize * self.half + gw.table_at
    }

    /// Source: tells `gateway` that `sent` of this call's records relayed to it are in (the
    /// puts before it on the same path arrive first).
    pub(super) fn relay_progress(&self, gateway: usize, sent: usize) -> Result<()> {
        let gw = self.gateways();
        let value = gw.relay_sent[gateway] + sent as u64;
        let me = self.comm.rank();
        self.paths[gateway].signal(gw.sig_relay + me, SignalOp::Set, value)
    }

    /// Source: counts the call's `count` records relayed to `gateway` (the base of the next
    /// call's progress).
    pub(super) fn relayed_to(&mut self, gateway: usize, count: usize) {
        if let Some(gw) = self.gw.as_mut() {
            gw.relay_sent[gateway] += count as u64;
        }
    }

    /// Writes this rank's rows received per source into its table (read by the gateways of
    /// its host after its combine announcement, which orders these stores before it).
    pub(super) fn publish_counts(&self, epoch: u64) -> Result<()> {
        let (t, at) = (
            self.comm.transport(),
            self.table_off(self.gateways(), epoch),
        );
        for (src, &c) in self.recv_counts.iter().enumerate() {
            t.write_local(self.lease.window(), at + 8 * src, &(c as u64).to_le_bytes())?;
        }
        Ok(())
    }

    /// Gateway: waits for every source it serves to announce its relayed records for call
    /// `epoch` and forwards each to the ranks of this host its token chose, then announces
    /// each rank's count in the source's mailbox slot (this rank's own count is kept).
    pub(super) fn forward_relays(&mut self, epoch: u64) -> Result<()> {
        let n = self.comm.world_size();
        for src in 0..n {
            if !self.gateways().serves(src) {
                continue;
            }
            let (count, flag) = self.collect(src, 2, epoch)?;
            if flag != 0 {
                return Err(Error::ProtocolViolation(format!(
                    "rank {src} announced relayed rows left in place ({flag})"
                )));
            }
            self.forward_from(src, count, epoch)?;
        }
        Ok(())
    }

    /// Forwards the `count` records `src` relayed here, checked, and announces the counts.
    fn forward_from(&mut self, src: usize, count: usize, epoch: u64) -> Result<()> {
        let mut gw = self.gw.take().expect("two-level routing");
        let mut masks = std::mem::take(&mut gw.masks[src]);
        let mut index = std::mem::take(&mut gw.index[src]);
        let mut forwarded = std::mem::take(&mut gw.forwarded[src]);
        forwarded.clear();
        forwarded.resize(gw.local.len(), 0);
        let lists = (&mut masks, &mut index, &mut forwarded[..]);
        let result = self.forward_records(&gw, src, (count, epoch), lists);
        gw.relay_got[src] += count as u64;
        let me = self.comm.rank();
        self.rows_at[src] = match self.cfg.int8_dispatch {
            true => RowsAt::Sent,
            false => RowsAt::Gateway(me),
        };
        let me_li = gw.local.iter().position(|&l| l == me);
        self.recv_counts[src] = forwarded[me_li.expect("this rank is on its host")];
        gw.masks[src] = masks;
        gw.index[src] = index;
        gw.forwarded[src] = forwarded;
        self.gw = Some(gw);
        result
    }

    /// The body of [`Self::forward_from`]: the local ranks each record went to in `masks`,
    /// its index among each one's rows in `index`, the rows each local rank got in
    /// `forwarded`.
    fn forward_records(
        &mut self,
        gw: &Gateways,
        src: usize,
        (count, epoch): (usize, u64),
        (masks, index, forwarded): (&mut Vec<u64>, &mut Vec<u32>, &mut [usize]),
    ) -> Result<()> {
        let (me, k) = (self.comm.rank(), self.cfg.topk);
        let t = self.comm.transport();
        let wire = self.wire_rec();
        let stores = match count * (wire - self.meta) >= STREAM_BYTES {
            true => Stores::Streaming,
            false => Stores::Cached,
        };
        let first = self.relay_off(gw, epoch, src, 0);
        masks.clear();
        index.clear();
        let in_place = !self.cfg.int8_dispatch;
        let (sig, base) = (gw.sig_relay + src, gw.relay_got[src]);
        let mut arrived = 0;
        for j in 0..count {
            while arrived <= j {
                let v = match t.signal_value(sig)? {
                    v if v > base + j as u64 => v,
                    _ => t.wait(sig, Cmp::Ge, base + j as u64 + 1, self.comm.deadline())?,
                };
                if v > base + count as u64 {
                    return Err(Error::ProtocolViolation(format!(
                        "rank {src} signalled {} relayed records of {count}",
                        v - base
                    )));
                }
                arrived = (v - base) as usize;
            }
            // SAFETY: `src` put these records before the announcement `collect` waited for
            // and writes this epoch's relay region again only at the next-but-one dispatch,
            // which needs this rank's partial sums of the next combine.
            let record = unsafe { t.local_slice(self.lease.window(), first + j * wire, wire)? };
            let meta = TokenRecord::read(&record[..self.meta], k);
            let bad = |what: String| {
                Error::ProtocolViolation(format!("record {j} relayed by rank {src}: {what}"))
            };
            let token = meta.token();
            if token >= self.cfg.max_tokens {
                return Err(bad(format!("token {token}")));
            }
            let chosen = meta
                .experts()
                .ok_or_else(|| bad(format!("{} experts", meta.count())))?;
            let mut mask = 0u64;
            let mut picks: SmallVec<[(i64, f32, usize); 8]> = SmallVec::new();
            for (s, w) in chosen {
                let rank = usize::try_from(s)
                    .ok()
                    .and_then(|s| self.routing.slot_rank.get(s).copied());
                let li = rank.and_then(|r| gw.local.iter().position(|&l| l == r));
                let Some(li) = li else {
                    return Err(bad(format!("expert slot {s} is not on this host")));
                };
                mask |= 1 << li;
                picks.push((i64::from(s), w, li));
            }
            let scale = (self.cfg.int8_dispatch).then(|| f32::from_le_bytes(meta.scale()));
            // The row stays here unless it is INT8 (rebuilt where it lands): the ranks read it
            // in place, at the relay index their record carries.
            let row = match in_place {
                true => &[][..],
                false => &record[self.meta..],
            };
            for li in (0..gw.local.len()).filter(|&li| mask >> li & 1 == 1) {
                let d = gw.local[li];
                let mine = picks.iter().filter(|p| p.2 == li).map(|p| (p.0, p.1));
                TokenRecord::write(&mut self.meta_buf, k, token, mine, scale);
                TokenRecord::set_relay(&mut self.meta_buf, k, j as u32);
                let off = self.wire_off(epoch, src, forwarded[li]);
                if d == me {
                    t.write_local(self.lease.window(), off, &self.meta_buf)?;
                    t.write_local(self.lease.window(), off + self.meta, row)?;
                } else {
                    // Record `i` from `src` in `d`'s window is written by this rank only (its
                    // gateway here); `d` reads it after the announcement below, which the
                    // path orders after these stores.
                    self.paths[d].put(off, &self.meta_buf, Stores::Cached)?;
                    if !row.is_empty() {
                        self.paths[d].put(off + self.meta, row, stores)?;
                    }
                }
                forwarded[li] += 1;
            }
            masks.push(mask);
            index.extend(forwarded.iter().map(|&f| f.saturating_sub(1) as u32));
        }
        for (li, &d) in gw.local.iter().enumerate().filter(|&(_, &d)| d != me) {
            let mut slot = [0u8; 32];
            let flag = match in_place {
                true => RowsAt::Gateway(me).flag(),
                false => RowsAt::Sent.flag(),
            };
            let words = [
                forwarded[li] as u64,
                flag as u64,
                self.routing.map.version(),
            ];
            (self.mailbox).post(&self.paths[d], src, 0, epoch, &words, &mut slot)?;
        }
        Ok(())
    }

    /// Gateway, in combine after every rank of this host announced its combine: where each
    /// local rank's rows for every served source start in its expert output, from its table,
    /// checked against what was forwarded to it.
    pub(super) fn locate_partials(&mut self, de: u64) -> Result<()> {
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        let t = self.comm.transport();
        let mut gw = self.gw.take().expect("two-level routing");
        let result = (|| -> Result<()> {
            let capacity = n * self.cfg.max_tokens;
            let table = self.table_off(&gw, de);
            for (li, &d) in gw.local.iter().enumerate() {
                let bytes = match d == me {
                    // SAFETY: this rank's own table, written by its dispatch; only peers read it.
                    true => unsafe { t.local_slice(self.lease.window(), table, 8 * n)? },
                    // SAFETY: `d` wrote its table before the combine announcement this rank
                    // waited for and rewrites this epoch's table only at the next-but-one
                    // dispatch, which needs this rank's next dispatch first.
                    false => unsafe { self.paths[d].rows(table, 8 * n)? },
                };
                let counts = bytes.chunks(8).map(|w| {
                    let w: [u8; 8] = w.try_into().expect("8 bytes");
                    usize::try_from(u64::from_le_bytes(w)).unwrap_or(usize::MAX)
                });
                let mut start = 0usize;
                for (src, count) in counts.enumerate() {
                    if count > self.cfg.max_tokens || start + count > capacity {
                        return Err(Error::ProtocolViolation(format!(
                            "rank {d} published {count} rows from rank {src} (from {start})"
                        )));
                    }
                    if gw.serves(src) {
                        if count != gw.forwarded[src][li] {
                            return Err(Error::ProtocolViolation(format!(
                                "rank {d} counted {count} rows from rank {src}; {} were \
                                 forwarded to it",
                                gw.forwarded[src][li]
                            )));
                        }
                        gw.starts[src].resize(gw.local.len(), 0);
                        gw.starts[src][li] = start;
                    }
                    start += count;
                }
            }
            Ok(())
        })();
        self.gw = Some(gw);
        result
    }

    /// Gateway: sums, for relayed tokens `from..to` of `home`, the rows this host's ranks
    /// produced (in rank order, f32, rounded to the dtype) into the staging region; gives the
    /// rows to send.
    pub(super) fn partial_sums(
        &self,
        home: usize,
        (from, to): (usize, usize),
        (de, epoch): (u64, u64),
    ) -> Result<&'c [u8]> {
        let (me, rb) = (self.comm.rank(), self.cfg.row_bytes());
        let t = self.comm.transport();
        let gw = self.gateways();
        let locals = gw.local.len();
        let off = self.partial_off(gw, epoch, home, from);
        // SAFETY: this rank's own staging rows for `home`, written only here, in this
        // combine, and read only by the put that follows (puts copy out before they return).
        let out = unsafe { t.local_slice_mut(self.lease.window(), off, (to - from) * rb)? };
        let mut rows: SmallVec<[&[u8]; 8]> = SmallVec::new();
        for (j, out_row) in (from..to).zip(out.chunks_mut(rb)) {
            rows.clear();
            let mask = gw.masks[home][j];
            for li in (0..locals).filter(|&li| mask >> li & 1 == 1) {
                let at = gw.starts[home][li] + gw.index[home][j * locals + li] as usize;
                let row = if gw.local[li] == me {
                    // SAFETY: this rank's own expert output, written before this combine.
                    unsafe { t.local_slice(self.lease.window(), self.out_off(de, at), rb)? }
                } else {
                    // SAFETY: the rank announced its combine (its output is written) and does
                    // not write this epoch's output region again before the next-but-one
                    // dispatch, which needs this rank's next dispatch first.
                    unsafe { self.paths[gw.local[li]].rows(self.out_off(de, at), rb)? }
                };
                rows.push(row);
            }
            sum_rows(self.cfg.dtype, out_row, &rows, None);
        }
        // SAFETY: as above; the mutable slice is not used again.
        unsafe { t.local_slice(self.lease.window(), off, (to - from) * rb) }
    }
}
