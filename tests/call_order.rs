//! Calls out of order are the caller's mistake (`InvalidUsage`, refused before anything is
//! sent), never a protocol error blamed on a correct peer: a combine with no dispatch to
//! combine, in both MoE modes, and in low-latency mode a second dispatch before the first is
//! combined (there, a rank holding no experts used to run a call ahead of its peer).

mod common;

use common::{run_comms, Fabric};
use xccl::moe::{Dtype, LowLatencyBuffer, MoeBuffer, MoeConfig};
use xccl::{Communicator, Error};

const HIDDEN: usize = 8;

/// Four experts, all on rank 0: rank 1 holds none.
fn config() -> MoeConfig {
    let mut cfg = MoeConfig::new(4, HIDDEN, 2, 4, Dtype::F32);
    cfg.placement = Some(vec![0; 4]);
    cfg
}

fn input() -> (Vec<u8>, Vec<i64>, Vec<f32>) {
    let x: Vec<u8> = (0..2 * HIDDEN)
        .flat_map(|v| (v as f32).to_le_bytes())
        .collect();
    (x, vec![0, 1, 2, 3], vec![0.5, 0.25, 1.0, 2.0])
}

fn misuse<T: std::fmt::Debug>(what: &str, r: xccl::Result<T>) {
    match r {
        Err(Error::InvalidUsage(m)) => eprintln!("{what}: {m}"),
        other => panic!("{what}: expected InvalidUsage, got {other:?}"),
    }
}

fn low_latency(comm: &Communicator) {
    let mut buf = LowLatencyBuffer::new(comm, config()).unwrap();
    let (x, idx, w) = input();
    let mut out = vec![0u8; x.len()];
    misuse(
        "combine before any dispatch",
        buf.combine_in_place(&mut out),
    );
    for round in 0..3 {
        let outputs: Vec<u8> = {
            let view = buf.dispatch(&x, &idx, &w).unwrap();
            vec![0u8; view.len() * HIDDEN * 4]
        };
        misuse(
            &format!("round {round}: a second dispatch"),
            buf.dispatch(&x, &idx, &w).map(|_| ()),
        );
        buf.combine(&outputs, &mut out).unwrap();
        misuse(
            &format!("round {round}: a second combine"),
            buf.combine(&outputs, &mut out),
        );
    }
}

fn normal(comm: &Communicator) {
    let mut buf = MoeBuffer::new(comm, config()).unwrap();
    let (x, idx, w) = input();
    let mut out = vec![0u8; x.len()];
    misuse(
        "combine before any dispatch",
        buf.combine_in_place(&mut out),
    );
    for round in 0..3 {
        let reduced = {
            let view = buf.dispatch(&x, &idx, &w).unwrap();
            vec![0u8; view.rows().unwrap().len() * HIDDEN * 4]
        };
        buf.combine(&reduced, &mut out).unwrap();
        misuse(
            &format!("round {round}: a second combine"),
            buf.combine(&reduced, &mut out),
        );
    }
}

#[test]
fn calls_out_of_order_are_invalid_usage_on_every_fabric() {
    for fabric in [Fabric::Loopback, Fabric::Shm, Fabric::Tcp] {
        run_comms(fabric, 2, |comm| {
            low_latency(comm);
            normal(comm);
        });
    }
}
