//! What a normal-mode dispatch hands the experts: the received rows, checked, and the
//! region their output goes to.

use super::*;
use crate::moe::record::TokenRecord;

/// A row's experts on the receiving rank, with their weights (at most top-k).
pub(in crate::moe) type Chosen = SmallVec<[(usize, f32); 8]>;

impl<'a> DispatchView<'a> {
    /// The configuration of the buffer that received the rows.
    pub fn config(&self) -> &MoeConfig {
        &self.buf.cfg
    }

    /// The buffer that received the rows.
    pub(in crate::moe) fn buffer(&self) -> &'a MoeBuffer<'a> {
        self.buf
    }

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
        let (mut experts, mut slots) = (Chosen::new(), SmallVec::new());
        let (src_token, data) = self.read_row(src, i, &mut experts, Some(&mut slots))?;
        Ok(RecvRow {
            src_rank: src,
            src_token,
            experts: experts.into_vec(),
            slots: slots.into_vec(),
            data,
        })
    }

    /// Row `i` from `src` without allocating: its token and data, and its experts (this
    /// rank's logical experts, with their weights, in top-k order) in `experts` and their
    /// slots in `slots`; every field checked (it comes from another process).
    pub(in crate::moe) fn read_row(
        &self,
        src: usize,
        i: usize,
        experts: &mut Chosen,
        mut slots: Option<&mut SmallVec<[usize; 8]>>,
    ) -> Result<(usize, &'a [u8])> {
        let b: &'a MoeBuffer<'a> = self.buf;
        let me = b.comm.rank();
        if src >= b.comm.world_size() || i >= b.recv_counts[src] {
            return Err(Error::InvalidArgument(format!(
                "no row {i} from rank {src}"
            )));
        }
        let off = b.disp_off(b.disp_epoch, src, i);
        // SAFETY: announced by the signal the dispatch waited for; not rewritten before the
        // next-but-one dispatch, which cannot start while this view borrows the buffer.
        let meta = unsafe { b.own.slice(off, b.meta)? };
        let rb = b.cfg.row_bytes();
        let record = TokenRecord::read(meta, b.cfg.topk);
        let src_token = record.token();
        let bad =
            |what: String| Error::ProtocolViolation(format!("row {i} from rank {src}: {what}"));
        if src_token >= b.cfg.max_tokens {
            return Err(bad(format!("token {src_token}")));
        }
        let data = if src == me {
            let tok = b.sent[me][i] as usize;
            let x: &'a [u8] = self.x;
            &x[tok * rb..(tok + 1) * rb]
        } else if b.rows_at[src] == RowsAt::SourceInput {
            // Zero-copy dispatch: the row where its source wrote it (a mapped window: checked
            // when the announcement was read).
            let off = b
                .input_off(src_token)
                .ok_or_else(|| bad("left in place".into()))?;
            // SAFETY: `src` wrote its input rows before the signal the dispatch waited for and
            // rewrites them only after its combine has heard from every mapped rank; this rank
            // speaks in its combine, which needs the buffer this view borrows.
            unsafe { b.paths[src].rows(off, rb)? }
        } else if let RowsAt::Gateway(g) = b.rows_at[src] {
            let j = record.relay();
            if j >= b.cfg.max_tokens {
                return Err(bad(format!("relay index {j}")));
            }
            let off = b.relay_off(b.gateways(), b.disp_epoch, src, j) + b.meta;
            // Safe to read: the gateway received the row before it announced this record,
            // and `src` rewrites this epoch's relay region only at the next-but-one dispatch,
            // which needs the partial sums of the next combine, which the gateway makes only
            // after this rank's next combine, which needs the buffer this view borrows. The
            // gateway is mapped (checked when the announcement was read).
            match g == me {
                // SAFETY: see above (this rank is the gateway).
                true => unsafe { b.own.slice(off, rb)? },
                // SAFETY: see above.
                false => unsafe { b.paths[g].rows(off, rb)? },
            }
        } else {
            // SAFETY: as for `meta`.
            unsafe { b.own.slice(off + b.meta, rb)? }
        };
        experts.clear();
        let chosen = record.experts().ok_or_else(|| {
            bad(format!(
                "token {src_token} with {} local experts",
                record.count()
            ))
        })?;
        for (s, w) in chosen {
            let logical =
                (s >= 0 && b.routing.slot_rank.get(s as usize) == Some(&me) && w.is_finite())
                    .then(|| b.routing.map.logical(s as usize))
                    .flatten();
            let Some(e) = logical else {
                return Err(bad(format!(
                    "expert slot {s} (weight {w}) is not one of this rank's"
                )));
            };
            experts.push((e, w));
            if let Some(slots) = slots.as_deref_mut() {
                slots.push(s as usize);
            }
        }
        Ok((src_token, data))
    }

    /// Calls `f(index, source, token, experts, data)` for every received row, sources in rank
    /// order, `index` counting them (the row of [`Self::expert_output`]), without allocating;
    /// every record checked.
    pub(in crate::moe) fn each_row(
        &self,
        mut f: impl FnMut(usize, usize, usize, &[(usize, f32)], &'a [u8]),
    ) -> Result<()> {
        let mut chosen = Chosen::new();
        let mut index = 0;
        for (src, &count) in self.buf.recv_counts.iter().enumerate() {
            for i in 0..count {
                let (token, data) = self.read_row(src, i, &mut chosen, None)?;
                f(index, src, token, &chosen, data);
                index += 1;
            }
        }
        Ok(())
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

    /// Received tokens per local expert (this rank's logical experts in id order).
    pub fn tokens_per_local_expert(&self) -> Result<Vec<(usize, usize)>> {
        let mut counts: Vec<(usize, usize)> = self
            .buf
            .routing
            .local_experts
            .iter()
            .map(|&e| (e, 0))
            .collect();
        self.each_row(|_, _, _, experts, _| {
            for &(e, _) in experts {
                if let Ok(i) = counts.binary_search_by_key(&e, |c| c.0) {
                    counts[i].1 += 1;
                }
            }
        })?;
        Ok(counts)
    }
}
