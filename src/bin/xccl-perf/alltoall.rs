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
use crate::options::Common;
use crate::report::{self, Row};
use std::time::{Duration, Instant};
use xccl::coll::{Coll, Exchange, ReduceOp};
use xccl::{Backend, Communicator, Error, Result};

/// The byte that block (src → dst) carries at position k in the checked call.
fn cell(src: usize, dst: usize, k: usize) -> u8 {
    (src.wrapping_mul(37) ^ dst.wrapping_mul(101) ^ k.wrapping_mul(13)) as u8
}

pub fn run(c: &Common, v: bool) -> Result<()> {
    let sizes = c.sizes(1 << 20).map_err(Error::InvalidArgument)?;
    let comm = Communicator::builder()
        .backend(c.backend.parse::<Backend>()?)
        .timeout(Duration::from_secs_f64(c.timeout))
        .build()?;
    let (me, n) = (comm.rank(), comm.world_size());
    let coll = Coll::new(&comm)?;
    let op = if v { "alltoallv" } else { "alltoall" };
    let max = *sizes.iter().max().expect("at least one size");
    let window = c.api == "window";
    let mut ex = if window {
        Some(Exchange::new(&comm, max)?)
    } else {
        None
    };
    let mut send = vec![0u8; n * max];
    let mut recv = vec![0u8; n * max];
    let mut memcpy = c.baseline.then(|| Memcpy::new(n * max));
    if me == 0 {
        println!("{}", report::header(op, &c.backend, n));
        println!("{}", report::columns(false, c.baseline));
        println!("#  size = ranks x block; block = bytes each rank sends each peer");
        if c.baseline {
            println!("#  base: one in-process memcpy of the size's bytes, timed after each size");
        }
    }
    comm.barrier()?;
    let mut rows = Vec::new();
    let mut total_wrong = 0u64;
    for &block in &sizes {
        let size = n * block;
        let iters = c.iters_for(size);
        let warm = c.warmup_for(iters);
        let counts = vec![block; n];
        let sdispls: Vec<usize> = (0..n).map(|j| j * block).collect();
        // alltoallv receives the blocks in reverse rank order, to exercise displacements.
        let rdispls: Vec<usize> = (0..n).map(|j| (n - 1 - j) * block).collect();
        // `copy_out` makes the window path copy its blocks into `recv` (the checked call only).
        let mut call = |send: &[u8], recv: &mut [u8], copy_out: bool| -> Result<()> {
            if let Some(ex) = ex.as_mut() {
                let view = ex.alltoallv(&send[..size], &counts, &sdispls)?;
                if copy_out {
                    for (s, &rd) in rdispls.iter().enumerate() {
                        let at = if v { rd } else { s * block };
                        recv[at..at + block].copy_from_slice(view.block(s));
                    }
                }
                Ok(())
            } else if v {
                coll.alltoallv_bytes(
                    &send[..size],
                    &counts,
                    &sdispls,
                    &mut recv[..size],
                    &counts,
                    &rdispls,
                )
            } else {
                coll.alltoall(&send[..size], &mut recv[..size])
            }
        };
        let mut times = Vec::with_capacity(iters);
        for i in 0..warm + iters {
            let s = Instant::now();
            call(&send, &mut recv, false)?;
            if i >= warm {
                times.push(s.elapsed().as_secs_f64() * 1e6);
            }
        }
        // Slowest rank per call.
        let mut all = vec![0f64; times.len() * n];
        coll.allgather(&times, &mut all)?;
        let mut per_call: Vec<f64> = (0..times.len())
            .map(|i| (0..n).map(|r| all[r * times.len() + i]).fold(0.0, f64::max))
            .collect();
        let mut wrong = [0u64];
        if !c.no_check {
            for (d, chunk) in send[..size].chunks_mut(block.max(1)).enumerate().take(n) {
                for (k, b) in chunk.iter_mut().enumerate() {
                    *b = cell(me, d, k);
                }
            }
            recv[..size].fill(0);
            call(&send, &mut recv, true)?;
            if c.inject_error && size > 0 {
                recv[0] ^= 0xff;
            }
            for (s, &rd) in rdispls.iter().enumerate() {
                let at = if v { rd } else { s * block };
                wrong[0] += (0..block)
                    .filter(|&k| recv[at + k] != cell(s, me, k))
                    .count() as u64;
            }
            coll.allreduce(&mut wrong, ReduceOp::Sum)?;
        }
        total_wrong += wrong[0];
        // The table's time is the Open MPI benchmark's: each rank's mean over back-to-back
        // calls, slowest rank. The JSON percentiles are per call (slowest rank per call).
        let mean = (0..n)
            .map(|r| {
                all[r * times.len()..(r + 1) * times.len()]
                    .iter()
                    .sum::<f64>()
                    / times.len() as f64
            })
            .fold(0.0, f64::max);
        let (_, p99, min, max) = report::stats(&mut per_call);
        let p50 = mean;
        let bus = (n - 1) as f64 / n as f64;
        let checked = (!c.no_check).then_some(wrong[0]);
        let mut row = Row::bytes(op, &c.backend, n, size, (p50, p99, min, max), bus, checked);
        if let Some(m) = memcpy.as_mut() {
            let us = m.time_us(size, iters.min(100));
            row.baseline_us = Some(us);
            row.baseline_gbps = Some(report::gbps(size, us));
        }
        report::emit(me, &mut rows, row);
    }
    comm.barrier()?;
    report::finish(me, c, &rows, total_wrong)?;
    if let Some(ex) = ex {
        ex.close()?;
    }
    coll.close()?;
    comm.close()
}
