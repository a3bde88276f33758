//! `xccl-perf`: the microbenchmark harness. Launches its own local ranks (or joins ranks
//! started by `xccl-run`, `mpirun`, `srun`, `torchrun`), runs one primitive over a size sweep,
//! checks every result and prints an nccl-tests-style table.

mod alltoall;
mod memcpy_baseline;
mod moe;
mod options;
mod pingpong;
mod report;
mod sendrecv;
mod session;
mod tcp_baseline;

use clap::Parser;
use options::{Cli, Command};
use xccl::launch::{launch, LaunchSpec};

fn main() {
    let cli = Cli::parse();
    let common = cli.command.common();
    if let Some(filter) = &common.log {
        // Before any thread starts; the ranks it launches inherit it.
        std::env::set_var("XCCL_DEBUG", filter);
    }
    xccl::logging::init();

    let launched = xccl::bootstrap::detect(None)
        .map(|i| i.source != "single")
        .unwrap_or(true);
    if !launched && common.ranks > 1 {
        // Not started by a launcher: become one, running this same command on every rank.
        let exe = std::env::current_exe().expect("path of this executable");
        let mut spec = LaunchSpec::new(common.ranks, exe, std::env::args_os().skip(1).collect());
        spec.backend = Some(common.backend.clone());
        spec.prefix_output = false;
        spec.bind = common.bind;
        spec.timeout = Some(std::time::Duration::from_secs_f64(common.timeout));
        match launch(&spec) {
            Ok(outcome) => std::process::exit(outcome.exit_code()),
            Err(e) => {
                eprintln!("xccl-perf: {e}");
                std::process::exit(2);
            }
        }
    }

    let result = match &cli.command {
        Command::Pingpong(a) => pingpong::run(a),
        Command::Sendrecv(a) => sendrecv::run(&a.common),
        Command::Alltoall(a) => alltoall::run(&a.common, false),
        Command::Alltoallv(a) => alltoall::run(&a.common, true),
        Command::Moe(a) => moe::run(a, moe::Phase::Both),
        Command::Dispatch(a) => moe::run(a, moe::Phase::Dispatch),
        Command::Combine(a) => moe::run(a, moe::Phase::Combine),
    };
    if let Err(e) = result {
        eprintln!("xccl-perf: {e}");
        std::process::exit(1);
    }
}
