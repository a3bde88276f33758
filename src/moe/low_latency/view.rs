//! What a low-latency dispatch hands the experts: per local expert, its rows, checked, and
//! where its output goes.

use super::*;
use crate::moe::record::SlotRecord;

impl<'a> LowLatencyView<'a> {
    /// The configuration of the buffer that received the rows.
    pub fn config(&self) -> &MoeConfig {
        &self.buf.cfg
    }

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
                    t.local_slice(
                        b.lease.window(),
                        b.meta_off(b.epoch, l, src, slot),
                        SlotRecord::LEN,
                    )?
                };
                let (tok, w, _) = SlotRecord::read(meta);
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
