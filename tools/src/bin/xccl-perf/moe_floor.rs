//! The floor printed beside each MoE row: what moving that row's bytes between two ranks
//! costs on this machine, measured in the same run. The bytes a rank sends must be written
//! into the other rank's memory (dispatch: from one core's cache into another's) and as many
//! read back from where the other rank's experts wrote them (combine), each phase with at
//! least one signal. The floor is one transfer that does both halves of that copy — a put of
//! the bytes with its signal, read once by the receiver (half a round trip between ranks 0
//! and 1, median) — plus one more signal latency (a put of 24 bytes, also printed in the
//! header). An in-process `memcpy` of the same bytes (`--baseline`) stays within one core's
//! cache, which no transfer between processes does.

use crate::put_pair::{Layout, Pair};
use crate::report;
use crate::session;
use std::time::Duration;
use xccl::coll::{Coll, ReduceOp};
use xccl::{Communicator, Result};

/// Bytes of the put whose one-way time is the signal latency (a mailbox slot's size).
const SIGNAL_BYTES: usize = 24;
/// Bytes moved by the round trips of one measurement, at most (fewer round trips for larger
/// rows), and the most round trips: enough for a stable median, little time on a loaded
/// machine (where a round trip can wait for a time slice).
const BUDGET_BYTES: usize = 8 << 20;
const TRIPS: usize = 60;

/// Collective: the one-way time (µs, median, slowest of ranks 0 and 1) of a put of `bytes`
/// with its signal between ranks 0 and 1, the receiver reading the bytes once before it
/// answers (`read`); 0 with a single rank.
fn one_way_us(
    comm: &Communicator,
    coll: &Coll<'_>,
    bytes: usize,
    read: bool,
    timeout: Duration,
) -> Result<f64> {
    let ranks = session::Pair::of(comm);
    let (lease, mut pair) = Pair::lease(comm, Layout::for_messages(bytes), ranks, timeout)?;
    comm.barrier()?;
    let trips = (BUDGET_BYTES / bytes.max(1)).clamp(5, TRIPS);
    let mut one_way = [0f64];
    if ranks.active && ranks.partner < 2 {
        let mut scratch = vec![0u8; if read { bytes } else { 0 }];
        let times = pair.round_trips_reading(ranks.initiator, bytes, &mut scratch, trips)?;
        if ranks.initiator {
            one_way[0] = report::stats(&times).p50;
        }
    }
    coll.allreduce(&mut one_way, ReduceOp::Max)?;
    lease.close()?;
    Ok(one_way[0])
}

/// Collective: the one-way latency (µs) of a small put with its signal between ranks 0 and 1.
pub fn signal_latency_us(comm: &Communicator, coll: &Coll<'_>, timeout: Duration) -> Result<f64> {
    one_way_us(comm, coll, SIGNAL_BYTES, false, timeout)
}

/// Collective: the floor (µs) of a row whose dispatch sends `my_bytes` from this rank (the
/// largest of any rank counts): the one-way transfer of those bytes, read by the receiver,
/// plus the signal `latency`.
pub fn floor_us(
    comm: &Communicator,
    coll: &Coll<'_>,
    my_bytes: usize,
    latency: f64,
    timeout: Duration,
) -> Result<f64> {
    let mut bytes = [my_bytes as f64];
    coll.allreduce(&mut bytes, ReduceOp::Max)?;
    let bytes = bytes[0] as usize;
    if bytes == 0 {
        return Ok(0.0);
    }
    Ok(one_way_us(comm, coll, bytes, true, timeout)? + latency)
}
