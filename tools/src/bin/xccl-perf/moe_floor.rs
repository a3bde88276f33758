//! The floor printed beside each MoE row: what moving that row's bytes must cost on this
//! machine, measured in the same run. Dispatch copies the token rows a rank sends and combine
//! brings as many back, each phase at least one signal after its data: the floor is twice an
//! in-process `memcpy` of the row bytes a rank sends, plus twice the one-way latency of a
//! small put with its signal between ranks 0 and 1 (slowest rank).

use crate::memcpy_baseline::Memcpy;
use crate::put_pair::{Layout, Pair};
use crate::report;
use crate::session;
use std::time::Duration;
use xccl::coll::{Coll, ReduceOp};
use xccl::{Communicator, Result};

/// Bytes of the put whose one-way time is the signal latency (a mailbox slot's size).
const SIGNAL_BYTES: usize = 24;
/// Round trips timed (after a tenth as many untimed): enough for a stable median, few
/// enough to cost nothing on a loaded machine.
const ROUND_TRIPS: usize = 200;

/// Collective: the one-way latency (µs, median) of a small put with its signal between ranks
/// 0 and 1; 0 with a single rank.
pub fn signal_latency_us(comm: &Communicator, coll: &Coll<'_>, timeout: Duration) -> Result<f64> {
    let ranks = session::Pair::of(comm);
    let (lease, mut pair) = Pair::lease(comm, Layout::for_messages(SIGNAL_BYTES), ranks, timeout)?;
    comm.barrier()?;
    let mut one_way = [0f64];
    if ranks.active && ranks.partner < 2 {
        let times =
            pair.round_trips(ranks.initiator, SIGNAL_BYTES, ROUND_TRIPS / 10, ROUND_TRIPS)?;
        if ranks.initiator {
            one_way[0] = report::stats(&times).p50;
        }
    }
    coll.allreduce(&mut one_way, ReduceOp::Max)?;
    lease.close()?;
    Ok(one_way[0])
}

/// Collective: the floor (µs) of a row whose dispatch sends `my_bytes` from this rank,
/// given the one-way `latency`: 2 × memcpy(`my_bytes`) + 2 × `latency`, slowest rank.
pub fn floor_us(coll: &Coll<'_>, my_bytes: usize, latency: f64, reps: usize) -> Result<f64> {
    let copy = match my_bytes {
        0 => 0.0,
        b => Memcpy::new(b).time_us(b, reps.max(5)),
    };
    let mut floor = [2.0 * copy + 2.0 * latency];
    coll.allreduce(&mut floor, ReduceOp::Max)?;
    Ok(floor[0])
}
