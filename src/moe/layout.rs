//! Dispatch layout, as DeepEP's `get_dispatch_layout`: tokens per rank, tokens per expert and
//! `is_token_in_rank`, from `topk_idx [T, k]` (`-1` = no expert).

use crate::error::{Error, Result};

/// Where each token goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Tokens sent to each rank (a token counts once per rank, however many of its experts
    /// that rank holds).
    pub tokens_per_rank: Vec<usize>,
    /// Tokens choosing each expert.
    pub tokens_per_expert: Vec<usize>,
    /// Row-major `[tokens, ranks]`.
    pub is_token_in_rank: Vec<bool>,
    /// Number of ranks (row length of `is_token_in_rank`).
    pub ranks: usize,
    /// Tokens sent to each host (once per host, however many of its ranks the token goes
    /// to), by host index ([`crate::Communicator::hosts`]); filled by dispatch, empty from
    /// [`dispatch_layout`] until [`Layout::count_hosts`].
    pub tokens_per_host: Vec<usize>,
    /// Row-major `[tokens, hosts]`.
    pub is_token_in_host: Vec<bool>,
}

impl Layout {
    /// Whether token `t` goes to rank `r`.
    pub fn in_rank(&self, t: usize, r: usize) -> bool {
        self.is_token_in_rank[t * self.ranks + r]
    }

    /// Whether token `t` goes to a rank on host `h` (after [`Layout::count_hosts`]).
    pub fn in_host(&self, t: usize, h: usize) -> bool {
        let hosts = self.tokens_per_host.len();
        self.is_token_in_host[t * hosts + h]
    }

    /// Fills the per-host counts from the per-rank ones, rank r on host `host_of[r]`.
    ///
    /// ```
    /// use xccl::moe::dispatch_layout;
    /// // Experts 0..4 on ranks 0..4; ranks 0, 1 on host 0 and 2, 3 on host 1.
    /// let mut l = dispatch_layout(&[0, 1, 1, 2], 2, &[0, 1, 2, 3], 4).unwrap();
    /// l.count_hosts(&[0, 0, 1, 1]);
    /// assert_eq!(l.tokens_per_host, [2, 1]);
    /// ```
    pub fn count_hosts(&mut self, host_of: &[usize]) {
        let hosts = host_of.iter().max().map_or(0, |h| h + 1);
        let tokens = self.is_token_in_rank.len() / self.ranks.max(1);
        self.tokens_per_host.clear();
        self.tokens_per_host.resize(hosts, 0);
        self.is_token_in_host.clear();
        self.is_token_in_host.resize(tokens * hosts, false);
        for t in 0..tokens {
            for (r, &h) in host_of.iter().enumerate().take(self.ranks) {
                if self.is_token_in_rank[t * self.ranks + r]
                    && !self.is_token_in_host[t * hosts + h]
                {
                    self.is_token_in_host[t * hosts + h] = true;
                    self.tokens_per_host[h] += 1;
                }
            }
        }
    }
}

/// Computes the layout, checking every expert id (`-1` or `0..experts`) and that no token
/// names an expert twice.
pub fn dispatch_layout(
    topk_idx: &[i64],
    topk: usize,
    placement: &[usize],
    ranks: usize,
) -> Result<Layout> {
    let mut l = Layout::default();
    l.fill(topk_idx, topk, placement, ranks)?;
    Ok(l)
}

/// Entry `j` of token `t`'s choices `row`, checked: `None` for `-1` (no expert), else an
/// expert id below `experts` that the token has not chosen before.
pub(crate) fn chosen_expert(
    t: usize,
    row: &[i64],
    j: usize,
    experts: usize,
) -> Result<Option<usize>> {
    let e = row[j];
    if e == -1 {
        return Ok(None);
    }
    if e < 0 || e as usize >= experts {
        return Err(Error::InvalidArgument(format!(
            "token {t}: expert id {e} is outside -1..{experts}"
        )));
    }
    if row[..j].contains(&e) {
        return Err(Error::InvalidArgument(format!(
            "token {t}: expert {e} chosen twice"
        )));
    }
    Ok(Some(e as usize))
}

impl Layout {
    /// [`dispatch_layout`] into this layout, reusing its memory (no allocation once it has
    /// held a call as large).
    pub(crate) fn fill(
        &mut self,
        topk_idx: &[i64],
        topk: usize,
        placement: &[usize],
        ranks: usize,
    ) -> Result<()> {
        let experts = placement.len();
        if topk == 0 || topk_idx.len() % topk != 0 {
            return Err(Error::InvalidArgument(format!(
                "topk_idx has {} entries, not a multiple of top-k {topk}",
                topk_idx.len()
            )));
        }
        let tokens = topk_idx.len() / topk;
        let reset = |v: &mut Vec<usize>, n: usize| {
            v.clear();
            v.resize(n, 0);
        };
        reset(&mut self.tokens_per_rank, ranks);
        reset(&mut self.tokens_per_expert, experts);
        self.is_token_in_rank.clear();
        self.is_token_in_rank.resize(tokens * ranks, false);
        self.ranks = ranks;
        for (t, row) in topk_idx.chunks(topk).enumerate() {
            for j in 0..row.len() {
                let Some(e) = chosen_expert(t, row, j, experts)? else {
                    continue;
                };
                self.tokens_per_expert[e] += 1;
                let r = placement[e];
                if !self.is_token_in_rank[t * ranks + r] {
                    self.is_token_in_rank[t * ranks + r] = true;
                    self.tokens_per_rank[r] += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_once_per_rank_and_rejects_bad_ids() {
        // 4 experts on 2 ranks: 0,1 -> rank 0; 2,3 -> rank 1.
        let p = [0, 0, 1, 1];
        let l = dispatch_layout(&[0, 1, 2, -1, -1, -1, 3, 0], 2, &p, 2).unwrap();
        assert_eq!(l.tokens_per_rank, vec![2, 2]);
        assert_eq!(l.tokens_per_expert, vec![2, 1, 1, 1]);
        assert_eq!(
            l.is_token_in_rank,
            vec![true, false, false, true, false, false, true, true]
        );
        assert!(dispatch_layout(&[0, 4], 2, &p, 2).is_err());
        assert!(dispatch_layout(&[1, 1], 2, &p, 2).is_err());
        assert!(dispatch_layout(&[-2, 0], 2, &p, 2).is_err());
        assert!(dispatch_layout(&[0, 1, 2], 2, &p, 2).is_err());
    }
}
