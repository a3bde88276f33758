//! The transport conformance suite, run for every backend at world sizes 1, 2, 3 and 8.

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
