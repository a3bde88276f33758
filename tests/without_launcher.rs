//! A program started on its own (no launcher) is a job of one rank; addressing another rank
//! fails with an error that says how to launch it, not just that the rank is out of range.

mod common;

use xccl::transport::SignalOp;

#[test]
fn a_program_started_alone_is_told_how_to_launch_it() {
    // This test binary holds this one test: clearing the launcher variables races nothing.
    for v in common::LAUNCHER_VARS {
        std::env::remove_var(v);
    }
    let comm = xccl::Communicator::from_env().expect("a job of one rank");
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let lease = comm.lease("first steps", 4096, 1, "v1").unwrap();
    let (win, sig) = (lease.window(), lease.signals().start);
    let err = comm
        .transport()
        .put_signal(1, win, 0, b"kv block", sig, SignalOp::Add, 1)
        .unwrap_err();
    assert!(matches!(err, xccl::Error::InvalidArgument(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("peer rank 1 >= world size 1"), "{text}");
    assert!(text.contains("xccl-run --np N -- PROGRAM"), "{text}");
    lease.close().unwrap();
    comm.close().unwrap();
}
