//! What a low-latency dispatch hands the experts: per local expert, its rows, checked, and
//! the rows their weighted sums go to.

use super::*;

impl<'a> LowLatencyView<'a> {
    /// The configuration of the buffer that received the rows.
    pub fn config(&self) -> &MoeConfig {
        self.view.config()
    }

    /// This rank's experts, in id order.
    pub fn local_experts(&self) -> &[usize] {
        self.local_experts
    }

    /// Tokens received from each source rank.
    pub fn sources(&self) -> &[usize] {
        self.view.counts()
    }

    /// The physical slot ([`crate::moe::ExpertMap`]) of each of [`Self::local_experts`].
    pub fn local_slots(&self) -> &[usize] {
        self.local_slots
    }

    /// Tokens received (rows of [`Self::output`]).
    pub fn len(&self) -> usize {
        self.view.len()
    }

    /// True when no token was received.
    pub fn is_empty(&self) -> bool {
        self.view.is_empty()
    }

    /// Rows for local expert number `l` (`local_experts()[l]`), from every source in rank
    /// order, each source's in the order it sent them; every record checked (it comes from
    /// another process). One pass over the received tokens per call: for every expert, take
    /// [`Self::rows_by_expert`].
    pub fn expert_rows(&self, l: usize) -> Result<Vec<ExpertRow<'a>>> {
        let &e = self.local_experts.get(l).ok_or_else(|| {
            Error::InvalidArgument(format!("local expert {l} of {}", self.local_experts.len()))
        })?;
        let mut rows = Vec::new();
        self.each_row(|index, src, token, chosen, data| {
            if let Some(&(_, weight)) = chosen.iter().find(|&&(x, _)| x == e) {
                rows.push(ExpertRow {
                    src_rank: src,
                    src_token: token,
                    weight,
                    index,
                    data,
                });
            }
        })?;
        Ok(rows)
    }

    /// The rows of every local expert, `[l]` as [`Self::expert_rows`]`(l)` gives them, in one
    /// pass over the received tokens (calling `expert_rows` for each expert makes one pass
    /// each).
    pub fn rows_by_expert(&self) -> Result<Vec<Vec<ExpertRow<'a>>>> {
        let mut by_expert: Vec<Vec<ExpertRow<'a>>> =
            self.local_experts.iter().map(|_| Vec::new()).collect();
        self.each_row(|index, src, token, chosen, data| {
            for &(e, weight) in chosen {
                if let Ok(l) = self.local_experts.binary_search(&e) {
                    by_expert[l].push(ExpertRow {
                        src_rank: src,
                        src_token: token,
                        weight,
                        index,
                        data,
                    });
                }
            }
        })?;
        Ok(by_expert)
    }

    /// Rows received per local expert.
    pub fn counts(&self) -> Result<Vec<usize>> {
        let mut counts = vec![0; self.local_experts.len()];
        self.each_row(|_, _, _, chosen, _| {
            for &(e, _) in chosen {
                if let Ok(l) = self.local_experts.binary_search(&e) {
                    counts[l] += 1;
                }
            }
        })?;
        Ok(counts)
    }

    /// Calls `f(index, source, token, experts, data)` for every received token, checked, in
    /// the order of [`ExpertRow::index`].
    pub(in crate::moe) fn each_row(
        &self,
        f: impl FnMut(usize, usize, usize, &[(usize, f32)], &'a [u8]),
    ) -> Result<()> {
        self.view.each_row(f)
    }

    /// Where the experts write for [`LowLatencyBuffer::combine_in_place`]: [`Self::len`] rows
    /// of the dtype in the registered window, row [`ExpertRow::index`] taking the sum over
    /// this rank's experts of weight × output for that token. On shared memory the homes read
    /// them where they are written.
    pub fn output(&mut self) -> Result<&mut [u8]> {
        self.view.expert_output()
    }
}
