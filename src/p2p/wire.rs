//! Chunk headers of the channel protocol: what a sender writes beside each chunk, and the
//! checks a receiver makes before trusting it.

use crate::error::{Error, Result};

/// Bytes of a chunk header slot in the receiver's window (one cache line).
pub(crate) const HEADER_LEN: usize = 64;
/// Chunks up to this many bytes travel inside the header's cache line, not in the slot.
pub(crate) const INLINE_MAX: usize = 16;
const INLINE_AT: usize = HEADER_LEN - INLINE_MAX;
const MAGIC: u64 = u64::from_le_bytes(*b"XCCLCHNK");
/// Bytes of the arrival marker at the start of the header (chunk index + 1, so zeroed memory
/// reads as "nothing yet"); written last, with Release, where the window is mapped directly.
pub(crate) const MARKER_LEN: usize = 8;

/// One chunk of a message on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    /// Index of this chunk on its channel (0, 1, 2, ...).
    pub seq: u64,
    /// The message's tag.
    pub tag: u64,
    /// The message's total length in bytes.
    pub total: u64,
    /// Offset of this chunk in the message.
    pub offset: u64,
    /// Bytes in this chunk.
    pub len: u64,
}

impl ChunkHeader {
    /// Encodes the header; `inline` (at most `INLINE_MAX` bytes) rides in the same line.
    pub fn encode(&self, inline: &[u8]) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let words = [
            self.seq + 1,
            MAGIC,
            self.tag,
            self.total,
            self.offset,
            self.len,
        ];
        for (i, v) in words.into_iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[INLINE_AT..INLINE_AT + inline.len()].copy_from_slice(inline);
        b
    }

    /// Whether this chunk's bytes ride inside the header.
    pub fn is_inline(&self) -> bool {
        self.len as usize <= INLINE_MAX
    }

    /// The inline bytes of an encoded header (valid when `is_inline`).
    pub fn inline_bytes<'a>(&self, b: &'a [u8; HEADER_LEN]) -> &'a [u8] {
        &b[INLINE_AT..INLINE_AT + (self.len as usize).min(INLINE_MAX)]
    }

    /// Decodes and checks a header read from the window: magic, the expected chunk index,
    /// and a length that fits both the slot and the message (overflow-safe).
    pub fn decode(
        b: &[u8; HEADER_LEN],
        src: usize,
        expect_seq: u64,
        slot_bytes: usize,
    ) -> Result<Self> {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let bad = |what: String| {
            Err(Error::ProtocolViolation(format!(
                "chunk {expect_seq} from rank {src}: {what}"
            )))
        };
        if w(1) != MAGIC {
            return bad(format!("bad magic {:#x}", w(1)));
        }
        let h = ChunkHeader {
            seq: w(0).wrapping_sub(1),
            tag: w(2),
            total: w(3),
            offset: w(4),
            len: w(5),
        };
        if h.seq != expect_seq {
            return bad(format!("carries index {}", h.seq));
        }
        if h.len > slot_bytes as u64 {
            return bad(format!(
                "length {} exceeds the {slot_bytes}-byte slot",
                h.len
            ));
        }
        match h.offset.checked_add(h.len) {
            Some(end) if end <= h.total => Ok(h),
            _ => bad(format!(
                "offset {} + length {} exceeds message length {}",
                h.offset, h.len, h.total
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_lies_are_caught() {
        let h = ChunkHeader {
            seq: 3,
            tag: 9,
            total: 100,
            offset: 40,
            len: 60,
        };
        assert_eq!(ChunkHeader::decode(&h.encode(&[]), 1, 3, 64).unwrap(), h);
        assert!(ChunkHeader::decode(&h.encode(&[]), 1, 4, 64).is_err());
        assert!(ChunkHeader::decode(&h.encode(&[]), 1, 3, 59).is_err());
        let lie = ChunkHeader {
            offset: u64::MAX,
            ..h
        };
        assert!(ChunkHeader::decode(&lie.encode(&[]), 1, 3, 64).is_err());
        let mut garbage = h.encode(&[]);
        garbage[8] ^= 1;
        assert!(ChunkHeader::decode(&garbage, 1, 3, 64).is_err());
    }
}
