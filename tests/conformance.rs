//! The transport conformance suite, run for every backend at world sizes 1, 2, 3 and 8, and
//! for every backend on the even ranks split from twice as many (world sizes 1, 2 and 3), and
//! for a backend whose path kinds differ by peer (shared memory mapped between even ranks only),
//! and for the hybrid backend over emulated hosts: two hosts of 2 and of 3 ranks, three hosts
//! of one rank each, and the even ranks split from a hybrid job (2 ranks over two hosts).

use xccl::transport::Transport;

mod loopback {
    use super::*;
    use xccl::transport::loopback::Loopback;

    fn loopback_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        Loopback::create(world)
            .expect("loopback fabric")
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    }

    xccl::transport_conformance!(loopback_ranks);
}

mod shm {
    use super::*;
    use xccl::transport::shm::{in_process, DEFAULT_SIGNALS};

    fn shm_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        in_process(world, DEFAULT_SIGNALS)
            .expect("shm ranks")
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    }

    xccl::transport_conformance!(shm_ranks);
}

mod tcp {
    use super::*;
    use xccl::transport::tcp::in_process;

    fn tcp_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        in_process(world, 4096)
            .expect("tcp ranks")
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    }

    xccl::transport_conformance!(tcp_ranks);
}

mod partly_mapped {
    use super::*;
    use xccl::transport::{partly_mapped::PartlyMapped, shm::in_process};

    /// Shared memory where only even ranks map each other: path kinds differ by peer.
    fn partly_mapped_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        PartlyMapped::wrap_all(in_process(world, 4096).expect("shm ranks"))
    }

    xccl::transport_conformance!(partly_mapped_ranks);
}

mod hybrid_two_hosts {
    use super::*;
    use xccl::transport::hybrid::in_process;

    /// The first half of the ranks (rounded up) on one emulated host, the rest on another.
    fn two_host_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        let host_of: Vec<usize> = (0..world).map(|r| r * 2 / world).collect();
        in_process(&host_of, 4096)
            .expect("hybrid ranks")
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    }

    xccl::transport_conformance!(two_host_ranks; worlds 4, 6);
}

mod hybrid_one_rank_per_host {
    use super::*;
    use xccl::transport::hybrid::in_process;

    fn one_rank_per_host(world: usize) -> Vec<Box<dyn Transport>> {
        let host_of: Vec<usize> = (0..world).collect();
        in_process(&host_of, 4096)
            .expect("hybrid ranks")
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    }

    xccl::transport_conformance!(one_rank_per_host; worlds 1, 3);
}

mod split_loopback {
    use super::*;
    use xccl::transport::{conformance::evens_of, loopback::Loopback};

    fn split_loopback_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        let parents = Loopback::create(2 * world).expect("loopback fabric");
        evens_of(
            parents
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .collect(),
        )
    }

    xccl::transport_conformance!(split_loopback_ranks; worlds 1, 2, 3);
}

mod split_shm {
    use super::*;
    use xccl::transport::{
        conformance::evens_of,
        shm::{in_process, DEFAULT_SIGNALS},
    };

    fn split_shm_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        let parents = in_process(2 * world, DEFAULT_SIGNALS).expect("shm ranks");
        evens_of(
            parents
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .collect(),
        )
    }

    xccl::transport_conformance!(split_shm_ranks; worlds 1, 2, 3);
}

mod split_tcp {
    use super::*;
    use xccl::transport::{conformance::evens_of, tcp::in_process};

    fn split_tcp_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        let parents = in_process(2 * world, 4096).expect("tcp ranks");
        evens_of(
            parents
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .collect(),
        )
    }

    xccl::transport_conformance!(split_tcp_ranks; worlds 1, 2, 3);
}

mod split_hybrid {
    use super::*;
    use xccl::transport::{conformance::evens_of, hybrid::in_process};

    /// The even ranks of twice as many on two emulated hosts: each group spans both hosts.
    fn split_hybrid_ranks(world: usize) -> Vec<Box<dyn Transport>> {
        let n = 2 * world;
        let host_of: Vec<usize> = (0..n).map(|r| r * 2 / n).collect();
        let parents = in_process(&host_of, 4096).expect("hybrid ranks");
        evens_of(
            parents
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .collect(),
        )
    }

    xccl::transport_conformance!(split_hybrid_ranks; worlds 1, 2);
}
