//! Normal-mode combine: expert output back to the tokens' homes, read in place from mapped
//! ranks and sent by the others (two-level: summed per host by its gateway first), summed per
//! host, then across hosts, in a fixed order.

use super::*;

/// Network homes: the puts that return this rank's output, in the order they go, how many
/// went, whether the homes have heard the count (right after the last put), and per source
/// the rows known to have arrived here.
struct Returns {
    list: Vec<(usize, usize, usize)>,
    sent: usize,
    announced: bool,
    arrived: Vec<usize>,
}

impl<'c> MoeBuffer<'c> {
    /// Collective, after a dispatch: `reduced` holds one row per received row (sources in
    /// rank order, rows in arrival order), already reduced over this rank's experts. Each
    /// goes back to its home; `out` (`T` rows of the dtype) receives, per token, the sum over
    /// the ranks it went to. Tokens that chose no expert get 0.
    ///
    /// The order of the sum: per host (hosts numbered by their lowest rank), the rows of its
    /// ranks in rank order, added in f32 and rounded to the dtype; then those per-host sums in
    /// host order, added in f32 and rounded. On one host that is the f32 sum in rank order,
    /// rounded once. Flat and two-level routing ([`crate::moe::TwoLevel`]) give the same bits.
    ///
    /// This copies `reduced` into the buffer first; experts that write their output straight
    /// into [`DispatchView::expert_output`] call [`MoeBuffer::combine_in_place`] instead.
    pub fn combine(&mut self, reduced: &[u8], out: &mut [u8]) -> Result<()> {
        crate::moe::check_combinable(self.dispatched)?;
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
    /// token, the sum over the ranks it went to, in the order [`MoeBuffer::combine`] gives.
    /// Tokens that chose no expert get 0. On shared memory the home reads the rows where the
    /// experts wrote them: no byte is copied between processes.
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
        crate::moe::check_combinable(self.dispatched)?;
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
        let mut base = 0;
        for (s, &c) in self.starts.iter_mut().zip(&self.recv_counts) {
            *s = base;
            base += c;
        }
        // Taken out for the call (put back at the end; an error path leaves them empty, and
        // the resizes make the next call whole again).
        let mut returns = Returns {
            list: std::mem::take(&mut self.returns),
            sent: 0,
            announced: false,
            arrived: std::mem::take(&mut self.arrived),
        };
        returns.arrived.clear();
        returns.arrived.resize(n, 0);
        // Mapped ranks hear first where the rows for them start, and read them in place; the
        // others are sent their rows and hear the count right behind the last of them (the
        // count check), so no home waits a second trip for it.
        self.announce_combine(epoch, true)?;
        for r in (0..n).filter(|&r| r != me && self.paths[r].is_mapped()) {
            self.peer_starts[r] = self.checked_return(r, epoch)?;
        }
        if self.gw.is_some() {
            self.locate_partials(de)?;
        }
        self.plan_returns(&mut returns.list);
        if returns.list.is_empty() {
            self.announce_combine(epoch, false)?;
            returns.announced = true;
        }
        let mut cursors = std::mem::take(&mut self.cursors);
        cursors.clear();
        cursors.resize(n, 0);
        let mut partials = std::mem::take(&mut self.partials);
        let scratch = (&mut cursors[..], &mut partials);
        let summed = self.sum_tokens(own, out, &mut returns, scratch, (de, epoch));
        self.partials = partials;
        summed?;
        while returns.sent < returns.list.len() {
            self.send_next_return(&mut returns, de, epoch)?;
        }
        for r in (0..n).filter(|&r| self.returns_from(r)) {
            self.checked_return(r, epoch)?;
        }
        for r in 0..n {
            if self.returns_from(r) {
                self.received[r] += self.sent[r].len() as u64;
            }
            self.returned[r] += self.returns_to(r).unwrap_or(0) as u64;
        }
        // Every mapped rank has announced its combine, which it does only once its experts
        // are done: none reads this rank's input rows any more.
        self.input_busy = false;
        self.lease.leave();
        self.cursors = cursors;
        self.returns = returns.list;
        self.arrived = returns.arrived;
        Ok(())
    }

    /// Announces this rank's combine to every mapped peer (`mapped`: where its rows for the
    /// peer start) or to every home it returns rows to over the network (the count; not to
    /// itself: it reads its own output where it is).
    fn announce_combine(&self, epoch: u64, mapped: bool) -> Result<()> {
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        for step in 1..n {
            let src = (me + step) % n;
            if mapped && self.paths[src].is_mapped() {
                self.announce(src, 1, self.recv_counts[src], self.starts[src], epoch)?;
            } else if let Some(count) = self.returns_to(src).filter(|_| !mapped) {
                self.announce(src, 1, count, 0, epoch)?;
            }
        }
        Ok(())
    }

    /// Rows this rank returns to `home` over the network in this combine: its output for
    /// `home`'s tokens (flat), or the partial sums for the tokens it relayed (two-level, as
    /// `home`'s gateway); `None` when it returns nothing to `home` that way.
    pub(super) fn returns_to(&self, home: usize) -> Option<usize> {
        if home == self.comm.rank() || self.paths[home].is_mapped() {
            return None;
        }
        match &self.gw {
            None => Some(self.recv_counts[home]),
            Some(gw) => gw.serves(home).then(|| gw.relayed(home)),
        }
    }

    /// Whether rank `r` returns rows to this rank over the network (every network peer
    /// when flat; each other host's gateway when two-level).
    fn returns_from(&self, r: usize) -> bool {
        r != self.comm.rank()
            && !self.paths[r].is_mapped()
            && self.gw.as_ref().is_none_or(|gw| gw.returns_from(r))
    }

    /// The puts (home, first row, end row) that return this rank's expert output to the
    /// homes reached over the network, round robin over the homes so each gets its first
    /// rows early.
    fn plan_returns(&self, list: &mut Vec<(usize, usize, usize)>) {
        let (me, n) = (self.comm.rank(), self.comm.world_size());
        let per = (RETURN_CHUNK / self.cfg.row_bytes().max(1)).max(1);
        list.clear();
        for home in (1..n).map(|step| (me + step) % n) {
            let Some(count) = self.returns_to(home) else {
                continue;
            };
            list.extend(
                (0..count)
                    .step_by(per)
                    .map(|a| (home, a, (a + per).min(count))),
            );
        }
        list.sort_unstable_by_key(|&(home, first, _)| (first, (home + n - me) % n));
    }

    /// Sums every token's rows into `out`, token by token: per host (hosts in order), the
    /// rows of its ranks in rank order, in f32, rounded to the dtype; then those per-host
    /// sums in host order, in f32, rounded. The order is fixed, so the result is the same
    /// bits every run, and the same whether a host's sum is made here (flat) or by its
    /// gateway (two-level). On one host this is the f32 sum in rank order, rounded once (a
    /// single partial sum is already rounded, and adding it to 0 changes no bit that
    /// matters: the running sum starts at +0). Keeps the returns ahead of the sum: chunk k
    /// goes once k/chunks of the tokens are summed.
    fn sum_tokens(
        &self,
        own: Option<&[u8]>,
        out: &mut [u8],
        returns: &mut Returns,
        (cursors, partials): (&mut [usize], &mut Vec<u8>),
        (de, epoch): (u64, u64),
    ) -> Result<()> {
        let row_bytes = self.cfg.row_bytes();
        let mut rows: SmallVec<[&[u8]; 8]> = SmallVec::new();
        let mut hosts: SmallVec<[usize; 8]> = SmallVec::new();
        let stores = match out.len() >= STREAM_OUTPUT {
            true => Stores::Streaming,
            false => Stores::Cached,
        };
        for (tok, out_row) in out.chunks_mut(row_bytes).enumerate() {
            let total = returns.list.len();
            while returns.sent < total && returns.sent * self.tokens <= tok * total {
                self.send_next_return(returns, de, epoch)?;
            }
            rows.clear();
            hosts.clear();
            for &r in &self.sum_order {
                if self.sent[r].get(cursors[r]) != Some(&(tok as u32)) {
                    continue;
                }
                rows.push(self.output_row(r, cursors[r], own, returns, (de, epoch))?);
                hosts.push(self.comm.hosts().host_of(r));
                cursors[r] += 1;
            }
            if hosts.first().is_none_or(|&h| hosts.iter().all(|&x| x == h)) {
                sum_rows_stored(self.cfg.dtype, out_row, &rows, None, stores);
            } else {
                sum_by_host(self.cfg.dtype, out_row, (&rows, &hosts), partials, stores);
            }
        }
        if stores == Stores::Streaming {
            // Partner of the non-temporal stores above: they complete before combine returns
            // the output to its caller.
            store_fence();
        }
        Ok(())
    }

    /// The output row rank `r` produced for the `i`-th token this rank sent it: from `own`
    /// or this rank's output region, in place in a mapped rank's window, or as returned over
    /// the network (sending this rank's own returns rather than waiting).
    fn output_row<'s>(
        &'s self,
        r: usize,
        i: usize,
        own: Option<&'s [u8]>,
        returns: &mut Returns,
        (de, epoch): (u64, u64),
    ) -> Result<&'s [u8]> {
        let (me, row_bytes) = (self.comm.rank(), self.cfg.row_bytes());
        let t = self.comm.transport();
        let at = self.starts[me] + i;
        if r == me {
            return match own {
                Some(own) => Ok(&own[at * row_bytes..(at + 1) * row_bytes]),
                // SAFETY: this rank's own expert output, written before this call; peers
                // only read it.
                None => unsafe { self.own.slice(self.out_off(de, at), row_bytes) },
            };
        }
        if self.paths[r].is_mapped() {
            let off = self.out_off(de, self.peer_starts[r] + i);
            // SAFETY: rank r announced these rows with the signal `checked_return` waited
            // for and does not write this epoch's output region again before the next-but-one
            // dispatch, which needs this rank's next dispatch first.
            return unsafe { self.paths[r].rows(off, row_bytes) };
        }
        while returns.arrived[r] <= i {
            let v = if returns.sent < returns.list.len() {
                // Rather than wait, send.
                self.send_next_return(returns, de, epoch)?;
                t.signal_value(self.sig_rows + r)?
            } else {
                let want = self.received[r] + i as u64 + 1;
                t.wait(self.sig_rows + r, Cmp::Ge, want, self.comm.deadline())?
            };
            returns.arrived[r] = self.returned_rows(r, v, epoch)?;
        }
        // SAFETY: rank r put this row before the signal read above (the transport applies a
        // signal after the data it follows) and writes this epoch's region again only at the
        // next-but-one combine (module docs).
        unsafe { self.own.slice(self.comb_off(epoch, r, i), row_bytes) }
    }

    /// Sends the next planned return; after the last, the count to every network home.
    fn send_next_return(&self, returns: &mut Returns, de: u64, epoch: u64) -> Result<()> {
        // The announcements follow the last return at once: it may leave with its home's.
        let then_announce = returns.sent + 1 == returns.list.len() && !returns.announced;
        self.send_return(returns.list[returns.sent], (de, epoch), then_announce)?;
        returns.sent += 1;
        if returns.sent == returns.list.len() && !returns.announced {
            self.announce_combine(epoch, false)?;
            returns.announced = true;
        }
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

    /// Network backends: puts rows `from..to` of this rank's output for `home` (two-level:
    /// of the partial sums it makes for `home` as its gateway) into its window, with the
    /// signal that tells it `to` rows are in; `then_announce`: the combine's announcements
    /// follow at once.
    fn send_return(
        &self,
        (home, from, to): (usize, usize, usize),
        (de, epoch): (u64, u64),
        then_announce: bool,
    ) -> Result<()> {
        let rb = self.cfg.row_bytes();
        let t = self.comm.transport();
        let rows = match self.gw {
            Some(_) => self.partial_sums(home, (from, to), (de, epoch))?,
            // SAFETY: this rank's own expert output; no peer writes it (peers only read it,
            // and only on mapped backends), and the view that wrote it is gone.
            None => unsafe {
                t.local_slice(
                    self.lease.window(),
                    self.out_off(de, self.starts[home] + from),
                    (to - from) * rb,
                )?
            },
        };
        let me = self.comm.rank();
        let value = self.returned[home] + to as u64;
        let (off, index) = (self.comb_off(epoch, me, from), self.sig_rows + me);
        match then_announce {
            true => self.paths[home].put_signal_then(off, rows, index, SignalOp::Set, value),
            false => self.paths[home].put_signal(off, rows, index, SignalOp::Set, value),
        }
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

/// Writes into `out` (with `stores`) the sum of `rows` (grouped by host, hosts ascending) as
/// [`MoeBuffer::combine`] orders it: each host's rows summed and rounded to the dtype (a lone
/// row as it is), then those sums added in host order; `partials` is scratch.
fn sum_by_host(
    dtype: crate::moe::Dtype,
    out: &mut [u8],
    (rows, hosts): (&[&[u8]], &[usize]),
    partials: &mut Vec<u8>,
    stores: Stores,
) {
    let rb = out.len();
    let mut spans: SmallVec<[(usize, usize); 8]> = SmallVec::new();
    let mut first = 0;
    for i in 1..=hosts.len() {
        if i == hosts.len() || hosts[i] != hosts[first] {
            spans.push((first, i));
            first = i;
        }
    }
    partials.resize(spans.len() * rb, 0);
    for (&(a, b), part) in spans.iter().zip(partials.chunks_mut(rb)) {
        if b - a > 1 {
            sum_rows(dtype, part, &rows[a..b], None);
        }
    }
    let sums: SmallVec<[&[u8]; 8]> = spans
        .iter()
        .zip(partials.chunks(rb))
        .map(|(&(a, b), part)| if b - a > 1 { part } else { rows[a] })
        .collect();
    sum_rows_stored(dtype, out, &sums, None, stores);
}
