//! `xccl-perf alltoall` / `alltoallv`: the size swept is the block each rank sends each peer
//! (itself included); `size` in the table is what one rank sends per call (ranks × block).
//! Each call is timed on every rank (times are gathered after the loop). The table's time is
//! each rank's mean over the back-to-back calls, slowest rank (as Open MPI's benchmark in
//! `shared/bench` computes it); the JSON's percentiles are over calls, each call counted at
//! its slowest rank. busbw = algbw · (n−1)/n.
//!
//! `--api window` (default) runs the one-copy [`Exchange`]: blocks go from the send buffer
//! straight into the receivers' registered windows and are read in place. `--api buffer`
//! runs the MPI-style [`Coll`] calls that deliver into the caller's receive buffer.

use crate::memcpy_baseline::Memcpy;
use crate::options::ByteArgs;
use crate::report::{self, Row};
use crate::session::{self, Table};
use std::time::Instant;
use xccl::coll::{Coll, Exchange, ReduceOp};
use xccl::{Error, Result};

/// The byte that block (src → dst) carries at position k in the checked call.
fn cell(src: usize, dst: usize, k: usize) -> u8 {
    (src.wrapping_mul(37) ^ dst.wrapping_mul(101) ^ k.wrapping_mul(13)) as u8
}

/// The calls of one sweep: the exchange (window API) or the collectives (buffer API), and
/// the buffers they read and fill.
struct Calls<'k, 'c> {
    coll: &'k Coll<'c>,
    ex: Option<Exchange<'c>>,
    v: bool,
    n: usize,
    send: Vec<u8>,
    recv: Vec<u8>,
}

impl Calls<'_, '_> {
    /// Where the block from `src` lands in `recv`: alltoallv receives the blocks in reverse
    /// rank order, to exercise displacements.
    fn at(&self, src: usize, block: usize) -> usize {
        match self.v {
            true => (self.n - 1 - src) * block,
            false => src * block,
        }
    }

    /// One call with blocks of `block` bytes; `copy_out` makes the window path copy its blocks
    /// into `recv` (the checked call only).
    fn call(&mut self, block: usize, copy_out: bool) -> Result<()> {
        let (n, size) = (self.n, self.n * block);
        let counts = vec![block; n];
        let sdispls: Vec<usize> = (0..n).map(|j| j * block).collect();
        if let Some(ex) = self.ex.as_mut() {
            let view = ex.alltoallv(&self.send[..size], &counts, &sdispls)?;
            if copy_out {
                for s in 0..n {
                    let at = if self.v {
                        (n - 1 - s) * block
                    } else {
                        s * block
                    };
                    self.recv[at..at + block].copy_from_slice(view.block(s));
                }
            }
            Ok(())
        } else if self.v {
            let rdispls: Vec<usize> = (0..n).map(|s| self.at(s, block)).collect();
            self.coll.alltoallv_bytes(
                &self.send[..size],
                &counts,
                &sdispls,
                &mut self.recv[..size],
                &counts,
                &rdispls,
            )
        } else {
            self.coll
                .alltoall(&self.send[..size], &mut self.recv[..size])
        }
    }

    /// The checked call: every block a known pattern; the wrong bytes over all ranks.
    fn check(&mut self, me: usize, block: usize, inject: bool) -> Result<u64> {
        let size = self.n * block;
        for (d, chunk) in self.send[..size]
            .chunks_mut(block.max(1))
            .enumerate()
            .take(self.n)
        {
            for (k, b) in chunk.iter_mut().enumerate() {
                *b = cell(me, d, k);
            }
        }
        self.recv[..size].fill(0);
        self.call(block, true)?;
        if inject && size > 0 {
            self.recv[0] ^= 0xff;
        }
        let mut wrong = [0u64];
        for s in 0..self.n {
            let at = self.at(s, block);
            wrong[0] += (0..block)
                .filter(|&k| self.recv[at + k] != cell(s, me, k))
                .count() as u64;
        }
        self.coll.allreduce(&mut wrong, ReduceOp::Sum)?;
        Ok(wrong[0])
    }
}

/// The table's figures from every rank's call times (`all`, rank by rank, `calls` each):
/// the Open MPI benchmark's time (each rank's mean over back-to-back calls, slowest rank),
/// then p99, min and max per call, each call counted at its slowest rank.
fn figures(all: &[f64], n: usize, calls: usize) -> report::Stats {
    let per_call: Vec<f64> = (0..calls)
        .map(|i| (0..n).map(|r| all[r * calls + i]).fold(0.0, f64::max))
        .collect();
    let mean = (0..n)
        .map(|r| all[r * calls..(r + 1) * calls].iter().sum::<f64>() / calls as f64)
        .fold(0.0, f64::max);
    report::Stats {
        p50: mean,
        ..report::stats(&per_call)
    }
}

pub fn run(c: &ByteArgs, v: bool) -> Result<()> {
    let sizes = c.sizes(1 << 20).map_err(Error::InvalidArgument)?;
    let op = if v { "alltoallv" } else { "alltoall" };
    let comm = session::connect(c)?;
    let (me, n) = (comm.rank(), comm.world_size());
    let coll = Coll::new(&comm)?;
    let max = *sizes.iter().max().expect("at least one size");
    let mut calls = Calls {
        coll: &coll,
        ex: match c.api == "window" {
            true => Some(Exchange::new(&comm, max)?),
            false => None,
        },
        v,
        n,
        send: vec![0u8; n * max],
        recv: vec![0u8; n * max],
    };
    let mut memcpy = c.baseline.then(|| Memcpy::new(n * max));
    let mut notes = vec!["size = ranks x block; block = bytes each rank sends each peer"];
    if c.baseline {
        notes.push("base: one in-process memcpy of the size's bytes, timed after each size");
    }
    let mut table = Table::start(c, &comm, op, false, &notes);
    comm.barrier()?;
    for &block in &sizes {
        let size = n * block;
        let iters = c.iters_for(size);
        let warm = c.warmup_for(iters);
        let mut times = Vec::with_capacity(iters);
        for i in 0..warm + iters {
            let s = Instant::now();
            calls.call(block, false)?;
            if i >= warm {
                times.push(s.elapsed().as_secs_f64() * 1e6);
            }
        }
        let mut all = vec![0f64; times.len() * n];
        coll.allgather(&times, &mut all)?;
        let checked = match c.no_check() {
            true => None,
            false => Some(calls.check(me, block, c.inject_error)?),
        };
        table.count_wrong(checked);
        let bus = (n - 1) as f64 / n as f64;
        let stats = figures(&all, n, times.len());
        let mut row = Row::bytes(op, &c.backend, n, size, stats, bus, checked);
        if let Some(m) = memcpy.as_mut() {
            let us = m.time_us(size, iters.min(100));
            row.baseline_us = Some(us);
            row.baseline_gbps = Some(report::gbps(size, us));
        }
        table.row(row);
    }
    table.finish(&comm)?;
    let Calls { ex, .. } = calls;
    if let Some(ex) = ex {
        ex.close()?;
    }
    coll.close()?;
    comm.close()
}
