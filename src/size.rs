//! Checked size arithmetic for buffer layouts: every product, sum and round-up that sizes a
//! window fails with `InvalidArgument` naming what it sized, instead of wrapping around (a
//! small window, then out-of-bounds access).

use crate::error::{Error, Result};

/// Sizes one layout; every step names `what` in its error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizer<'a> {
    what: &'a str,
}

impl<'a> Sizer<'a> {
    /// A sizer for the layout described by `what` (e.g. "p2p rings").
    pub(crate) fn new(what: &'a str) -> Self {
        Sizer { what }
    }

    fn overflow(&self) -> Error {
        Error::InvalidArgument(format!("{} is larger than the address space", self.what))
    }

    /// The product of `factors`.
    pub(crate) fn mul(&self, factors: &[usize]) -> Result<usize> {
        factors
            .iter()
            .try_fold(1usize, |acc, &f| acc.checked_mul(f))
            .ok_or_else(|| self.overflow())
    }

    /// The sum of `terms`.
    pub(crate) fn add(&self, terms: &[usize]) -> Result<usize> {
        terms
            .iter()
            .try_fold(0usize, |acc, &t| acc.checked_add(t))
            .ok_or_else(|| self.overflow())
    }

    /// `x` rounded up to a multiple of `to` (> 0).
    pub(crate) fn round_up(&self, x: usize, to: usize) -> Result<usize> {
        x.div_ceil(to)
            .checked_mul(to)
            .ok_or_else(|| self.overflow())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let s = Sizer::new("test layout");
        assert_eq!(s.mul(&[3, 4, 5]).unwrap(), 60);
        assert!(s.mul(&[usize::MAX, 2]).is_err());
        assert_eq!(s.add(&[1, 2]).unwrap(), 3);
        assert!(s.add(&[usize::MAX, 1]).is_err());
        assert_eq!(s.round_up(4097, 4096).unwrap(), 8192);
        assert_eq!(s.round_up(0, 4096).unwrap(), 0);
        assert!(s.round_up(usize::MAX, 4096).is_err());
        let msg = s.mul(&[usize::MAX, 2]).unwrap_err().to_string();
        assert!(msg.contains("test layout"), "{msg}");
    }
}
