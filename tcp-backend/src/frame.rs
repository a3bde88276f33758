//! Frame headers: fixed 48 bytes, checked before anything they announce is read.

use crate::error::{Error, Result};

pub(crate) const HDR: usize = 48;
const MAGIC: u32 = 0x5843_5450; // "XCTP"

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// `len` payload bytes for `region` at `offset`; with `FLAG_SIGNAL`, then signal `a` by `b`.
    Write = 1,
    /// Signal `a` by `b` (`FLAG_SET`: store instead of add).
    Signal = 2,
    /// Read `len` bytes of `region` at `offset`; answer carries request id `a`.
    ReadReq = 3,
    /// Answer to request `a`: `len` payload bytes.
    ReadResp = 4,
    /// Answer with `FlushAck(a)` once everything before has been applied.
    Flush = 5,
    /// Everything up to flush `a` is applied.
    FlushAck = 6,
    /// Nothing, to show the link is alive.
    Heartbeat = 7,
    /// The sender aborted.
    Abort = 8,
    /// The sender registered region `region` of `len` bytes (collective registration).
    Reg = 9,
    /// The sender closes in an orderly way.
    Bye = 10,
}

pub(crate) const FLAG_SIGNAL: u8 = 1;
pub(crate) const FLAG_SET: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    pub kind: Kind,
    pub flags: u8,
    pub region: u64,
    pub offset: u64,
    pub len: u64,
    pub a: u64,
    pub b: u64,
}

impl Frame {
    pub fn new(kind: Kind) -> Frame {
        Frame {
            kind,
            flags: 0,
            region: 0,
            offset: 0,
            len: 0,
            a: 0,
            b: 0,
        }
    }

    pub fn encode(&self) -> [u8; HDR] {
        let mut h = [0u8; HDR];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = self.kind as u8;
        h[5] = self.flags;
        for (i, v) in [self.region, self.offset, self.len, self.a, self.b]
            .into_iter()
            .enumerate()
        {
            h[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    /// Decodes and checks a header from a peer: magic, kind, flags, and a payload length
    /// within `max_payload` (and zero for kinds that carry none).
    pub fn decode(h: &[u8; HDR], max_payload: u64) -> Result<Frame> {
        let w =
            |i: usize| u64::from_le_bytes(h[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        if u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) != MAGIC {
            return Err(Error::Protocol("bad frame magic".into()));
        }
        let kind = match h[4] {
            1 => Kind::Write,
            2 => Kind::Signal,
            3 => Kind::ReadReq,
            4 => Kind::ReadResp,
            5 => Kind::Flush,
            6 => Kind::FlushAck,
            7 => Kind::Heartbeat,
            8 => Kind::Abort,
            9 => Kind::Reg,
            10 => Kind::Bye,
            k => return Err(Error::Protocol(format!("unknown frame kind {k}"))),
        };
        let f = Frame {
            kind,
            flags: h[5],
            region: w(0),
            offset: w(1),
            len: w(2),
            a: w(3),
            b: w(4),
        };
        if f.flags & !(FLAG_SIGNAL | FLAG_SET) != 0 {
            return Err(Error::Protocol(format!(
                "unknown frame flags {:#x}",
                f.flags
            )));
        }
        let carries = matches!(kind, Kind::Write | Kind::ReadResp);
        if carries && f.len > max_payload {
            return Err(Error::Protocol(format!(
                "frame of {} bytes exceeds the cap of {max_payload}",
                f.len
            )));
        }
        if !carries && f.len != 0 && !matches!(kind, Kind::ReadReq | Kind::Reg) {
            return Err(Error::Protocol(format!(
                "{kind:?} frame announces {} payload bytes",
                f.len
            )));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_lies_are_refused() {
        let f = Frame {
            kind: Kind::Write,
            flags: FLAG_SIGNAL,
            region: 3,
            offset: 4,
            len: 5,
            a: 6,
            b: 7,
        };
        assert_eq!(Frame::decode(&f.encode(), 100).unwrap(), f);
        let huge = Frame { len: u64::MAX, ..f };
        assert!(Frame::decode(&huge.encode(), 100).is_err());
        let mut bad = f.encode();
        bad[4] = 99;
        assert!(Frame::decode(&bad, 100).is_err());
        bad = f.encode();
        bad[0] ^= 1;
        assert!(Frame::decode(&bad, 100).is_err());
        let sneaky = Frame {
            kind: Kind::Signal,
            len: 10,
            ..f
        };
        assert!(Frame::decode(&sneaky.encode(), 100).is_err());
    }
}
