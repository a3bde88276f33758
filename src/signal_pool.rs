//! The communicator's signal words as a pool: ranges reserved by collective objects and
//! given back when they close, first fit, so every rank that reserves and returns in the same
//! order holds the same ranges.

use crate::error::{Error, Result};
use std::ops::Range;

/// Free ranges of signal words below the communicator's own.
#[derive(Debug)]
pub(crate) struct SignalPool {
    /// Free ranges, sorted by start, never adjacent (merged on return).
    free: Vec<Range<usize>>,
    total: usize,
    /// Words held by objects whose end could not be agreed with every peer: a peer may still
    /// signal them, so they are never handed out again.
    retired: usize,
}

impl SignalPool {
    /// A pool of words `0..total`.
    pub(crate) fn new(total: usize) -> Self {
        SignalPool {
            free: std::iter::once(0..total)
                .filter(|r| !r.is_empty())
                .collect(),
            total,
            retired: 0,
        }
    }

    /// Reserves `n` consecutive words: the lowest free range that holds them.
    pub(crate) fn take(&mut self, n: usize) -> Result<Range<usize>> {
        if n == 0 {
            return Ok(0..0);
        }
        let Some(i) = self.free.iter().position(|r| r.len() >= n) else {
            return Err(Error::InvalidArgument(format!(
                "cannot reserve {n} more signals ({} of {} in use, {} retired; largest free run \
                 {})",
                self.in_use(),
                self.total,
                self.retired,
                self.free.iter().map(|r| r.len()).max().unwrap_or(0)
            )));
        };
        let start = self.free[i].start;
        self.free[i].start += n;
        if self.free[i].is_empty() {
            self.free.remove(i);
        }
        Ok(start..start + n)
    }

    /// Returns a range taken before, merging it with its free neighbours.
    pub(crate) fn give_back(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        let i = self.free.partition_point(|f| f.start < r.start);
        debug_assert!(i == 0 || self.free[i - 1].end <= r.start, "double return");
        debug_assert!(
            i == self.free.len() || r.end <= self.free[i].start,
            "double return"
        );
        self.free.insert(i, r);
        if i + 1 < self.free.len() && self.free[i].end == self.free[i + 1].start {
            self.free[i].end = self.free[i + 1].end;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].end == self.free[i].start {
            self.free[i - 1].end = self.free[i].end;
            self.free.remove(i);
        }
    }

    /// Gives up a range for good (see `retired`).
    pub(crate) fn retire(&mut self, r: Range<usize>) {
        self.retired += r.len();
    }

    /// Words reserved now, retired ones included.
    pub(crate) fn in_use(&self) -> usize {
        self.total - self.free.iter().map(|r| r.len()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_fit_and_merge() {
        let mut p = SignalPool::new(100);
        let a = p.take(10).unwrap();
        let b = p.take(20).unwrap();
        let c = p.take(30).unwrap();
        assert_eq!((a.clone(), b.clone(), c.clone()), (0..10, 10..30, 30..60));
        p.give_back(b);
        assert_eq!(p.take(5).unwrap(), 10..15, "first fit reuses the hole");
        p.give_back(10..15);
        p.give_back(a);
        p.give_back(c);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.free.len(), 1, "neighbours merge back into one range");
        assert_eq!(p.free[0], 0..100);
        assert!(p.take(101).is_err());
        let r = p.take(40).unwrap();
        p.retire(r);
        assert_eq!(p.in_use(), 40);
        let e = p.take(61).unwrap_err().to_string();
        assert!(e.contains("40 retired"), "{e}");
    }

    proptest! {
        /// Any sequence of takes and returns keeps ranges disjoint, and returning everything
        /// gives back the whole pool as one range.
        #[test]
        fn takes_and_returns_stay_disjoint(ops in proptest::collection::vec((1usize..40, any::<bool>()), 1..60)) {
            let mut p = SignalPool::new(500);
            let mut held: Vec<Range<usize>> = Vec::new();
            for (n, give) in ops {
                if give && !held.is_empty() {
                    let r = held.remove(n % held.len());
                    p.give_back(r);
                } else if let Ok(r) = p.take(n) {
                    prop_assert!(held.iter().all(|h| r.end <= h.start || h.end <= r.start));
                    held.push(r);
                }
                prop_assert_eq!(p.in_use(), held.iter().map(|r| r.len()).sum::<usize>());
            }
            for r in held {
                p.give_back(r);
            }
            prop_assert_eq!(p.free.len(), 1);
            prop_assert_eq!(p.free[0].clone(), 0..500);
        }
    }
}
