//! Sizes that overflow the address space are refused with `InvalidArgument` on every rank,
//! before anything is registered: no wrapped-around small window, no abort on allocation.

mod common;

use common::{run_comms, Fabric};
use xccl::coll::Exchange;
use xccl::moe::{Dtype, LowLatencyBuffer, MoeBuffer, MoeConfig};
use xccl::p2p::{P2p, P2pConfig};
use xccl::Error;

fn refused<T>(what: &str, r: xccl::Result<T>) {
    match r {
        Err(Error::InvalidArgument(m)) => eprintln!("{what}: {m}"),
        Err(e) => panic!("{what}: expected InvalidArgument, got {e}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

#[test]
fn overflowing_sizes_are_invalid_arguments() {
    run_comms(Fabric::Loopback, 2, |comm| {
        let p2p = |slots, slot_bytes| P2p::new(comm, P2pConfig { slots, slot_bytes });
        refused("p2p slots 2217156739628552", p2p(2217156739628552, 4096));
        refused("p2p slot_bytes usize::MAX", p2p(4, usize::MAX));
        refused(
            "p2p slot_bytes just below usize::MAX",
            p2p(1, usize::MAX - 4095),
        );
        refused("exchange of usize::MAX", Exchange::new(comm, usize::MAX));
        refused(
            "exchange of usize::MAX / 2",
            Exchange::new(comm, usize::MAX / 2),
        );
        let moe = |experts, hidden, max_tokens| {
            MoeConfig::new(experts, hidden, 2, max_tokens, Dtype::Bf16)
        };
        refused("2^40 experts", MoeBuffer::new(comm, moe(1 << 40, 64, 8)));
        refused(
            "2^40 experts, low latency",
            LowLatencyBuffer::new(comm, moe(1 << 40, 64, 8)),
        );
        refused(
            "hidden usize::MAX",
            MoeBuffer::new(comm, moe(4, usize::MAX, 8)),
        );
        refused(
            "max_tokens usize::MAX",
            MoeBuffer::new(comm, moe(4, 64, usize::MAX)),
        );
        refused(
            "max_tokens usize::MAX / 4, low latency",
            LowLatencyBuffer::new(comm, moe(4, 64, usize::MAX / 4)),
        );
        // A size that fits the address space but not the backend: refused by its name before
        // anything is registered.
        let largest = comm.transport().caps().max_window_len;
        refused(
            "a window one byte past the backend's largest",
            comm.lease("an oversized object", largest + 1, 0, "x"),
        );
        // Everything was refused before registering: sane sizes still work afterwards.
        Exchange::new(comm, 4096).unwrap();
        MoeBuffer::new(comm, moe(4, 64, 8)).unwrap();
    });
}
