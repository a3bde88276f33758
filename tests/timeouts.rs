//! A timeout says how long it waited: a registration that a peer never joins fails with
//! `Timeout` at its deadline on every backend, naming the time waited (not "0ns").

use std::time::Duration;
use xccl::transport::{loopback::Loopback, Transport};
use xccl::Error;

fn lonely_register_reports_its_wait(ranks: Vec<Box<dyn Transport>>, limit: Duration) {
    let backend = ranks[0].caps().backend;
    let mut ranks = ranks.into_iter();
    let alone = ranks.next().unwrap();
    match alone.register(4096) {
        Err(Error::Timeout { waited, op }) => {
            assert!(waited >= limit, "{backend}: {op} waited {waited:?}");
            assert!(
                waited < limit + Duration::from_secs(5),
                "{backend}: waited {waited:?}"
            );
            let msg = Error::Timeout { waited, op }.to_string();
            assert!(!msg.contains("after 0ns"), "{backend}: {msg}");
        }
        other => panic!("{backend}: {other:?}"),
    }
    // The abort lets the other rank drop without waiting for a registration.
    alone.abort();
}

fn boxed<T: Transport + 'static>(ranks: Vec<T>) -> Vec<Box<dyn Transport>> {
    ranks
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn Transport>)
        .collect()
}

#[test]
fn a_registration_nobody_joins_times_out_saying_how_long() {
    use xccl::transport::{shm, tcp};
    let limit = Duration::from_millis(300);
    lonely_register_reports_its_wait(boxed(Loopback::create_with(2, 256, limit).unwrap()), limit);
    lonely_register_reports_its_wait(boxed(shm::in_process_with(2, 256, limit).unwrap()), limit);
    lonely_register_reports_its_wait(boxed(tcp::in_process_with(2, 256, limit).unwrap()), limit);
}
