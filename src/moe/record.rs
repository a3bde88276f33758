//! The metadata record MoE dispatch sends with each row (one per token and expert rank, in
//! both modes), encoded and decoded in one place.
//! Decoding checks what a record can say by itself; callers check it against their call.

/// Normal mode: the token, how many of the receiving rank's experts chose it, those experts
/// with their gate weights (top-k order), the INT8 scale, and where a gateway keeps the row
/// (two-level routing: the record's index among those its source relayed). Little-endian:
/// `token u32 | count u32 | (expert i32, weight f32) × topk | scale f32 | relay u32`, padded
/// to a line.
pub(super) struct TokenRecord<'m> {
    bytes: &'m [u8],
    topk: usize,
}

impl<'m> TokenRecord<'m> {
    /// Bytes of one record for `topk` choices (a multiple of 64).
    pub fn len(topk: usize) -> usize {
        (16 + 8 * topk).div_ceil(64) * 64
    }

    /// Sets the relay index of the record in `out` (written by [`Self::write`], which leaves
    /// it 0).
    pub fn set_relay(out: &mut [u8], topk: usize, relay: u32) {
        let at = 12 + 8 * topk;
        out[at..at + 4].copy_from_slice(&relay.to_le_bytes());
    }

    /// Writes a record into `out` (`len(topk)` bytes): `token`, the `experts` chosen with
    /// their weights (at most `topk`), and `scale` (INT8 rows) or zero.
    pub fn write(
        out: &mut [u8],
        topk: usize,
        token: usize,
        experts: impl Iterator<Item = (i64, f32)>,
        scale: Option<f32>,
    ) {
        out.fill(0);
        out[..4].copy_from_slice(&(token as u32).to_le_bytes());
        let mut count = 0;
        for (e, w) in experts.take(topk) {
            let at = 8 + 8 * count;
            out[at..at + 4].copy_from_slice(&(e as i32).to_le_bytes());
            out[at + 4..at + 8].copy_from_slice(&w.to_le_bytes());
            count += 1;
        }
        out[4..8].copy_from_slice(&(count as u32).to_le_bytes());
        let at = 8 + 8 * topk;
        out[at..at + 4].copy_from_slice(&scale.unwrap_or(0.0).to_le_bytes());
    }

    /// Reads a record of `topk` choices.
    pub fn read(bytes: &'m [u8], topk: usize) -> Self {
        debug_assert!(bytes.len() >= 16 + 8 * topk);
        TokenRecord { bytes, topk }
    }

    fn word(&self, at: usize) -> [u8; 4] {
        self.bytes[at..at + 4].try_into().expect("4 bytes")
    }

    /// The token's index on its home rank.
    pub fn token(&self) -> usize {
        u32::from_le_bytes(self.word(0)) as usize
    }

    /// How many experts the record says it names.
    pub fn count(&self) -> usize {
        u32::from_le_bytes(self.word(4)) as usize
    }

    /// The experts the record names, with their weights; `None` when it says it names none
    /// or more than `topk` (the record is corrupt).
    pub fn experts(&self) -> Option<impl Iterator<Item = (i32, f32)> + '_> {
        let count = self.count();
        if count == 0 || count > self.topk {
            return None;
        }
        Some((0..count).map(|j| {
            let e = i32::from_le_bytes(self.word(8 + 8 * j));
            (e, f32::from_le_bytes(self.word(12 + 8 * j)))
        }))
    }

    /// The INT8 scale's bytes (checked by [`super::quant::landed_scale`]).
    pub fn scale(&self) -> [u8; 4] {
        self.word(8 + 8 * self.topk)
    }

    /// The relay index (unchecked: the reader bounds it).
    pub fn relay(&self) -> usize {
        u32::from_le_bytes(self.word(12 + 8 * self.topk)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_records_round_trip() {
        let topk = 3;
        let mut buf = vec![0xAAu8; TokenRecord::len(topk)];
        assert_eq!(buf.len(), 64);
        TokenRecord::write(
            &mut buf,
            topk,
            7,
            [(5, 0.5), (2, 1.5)].into_iter(),
            Some(0.25),
        );
        let r = TokenRecord::read(&buf, topk);
        assert_eq!(r.token(), 7);
        assert_eq!(
            r.experts().unwrap().collect::<Vec<_>>(),
            [(5, 0.5), (2, 1.5)]
        );
        assert_eq!(f32::from_le_bytes(r.scale()), 0.25);
        assert_eq!(r.relay(), 0);
        TokenRecord::set_relay(&mut buf, topk, 9);
        assert_eq!(TokenRecord::read(&buf, topk).relay(), 9);
        // A count past top-k is refused, as is none.
        buf[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(TokenRecord::read(&buf, topk).experts().is_none());
        buf[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(TokenRecord::read(&buf, topk).experts().is_none());
    }
}
