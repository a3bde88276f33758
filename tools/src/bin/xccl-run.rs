//! `xccl-run`: starts N local ranks of a program with the xccl environment set.

use clap::Parser;
use std::ffi::OsString;
use std::time::Duration;
use xccl::launch::{launch, LaunchSpec};

/// Starts N local ranks of an xccl program (as `mpirun -np N` does), each with its rank, the
/// world size, a rendezvous store and a job secret in its environment; prefixes their output
/// with the rank; when one rank fails, stops the others and exits with its code.
///
/// Example: xccl-run --np 2 --backend tcp -- target/release/examples/moe_layer
#[derive(Parser, Debug)]
#[command(name = "xccl-run", version, verbatim_doc_comment)]
struct Args {
    /// Number of ranks (at most 4 per CPU unless --oversubscribe).
    #[arg(
        short = 'n',
        long = "np",
        visible_alias = "ranks",
        default_value_t = 2,
        value_name = "N"
    )]
    ranks: usize,
    /// Allow more than 4 ranks per CPU.
    #[arg(long)]
    oversubscribe: bool,
    /// Transport backend for the ranks: auto, shm, tcp or hybrid (sets XCCL_BACKEND;
    /// default: the environment's, else auto: shm on one host, hybrid across hosts).
    #[arg(long, value_parser = ["auto", "shm", "tcp", "hybrid"])]
    backend: Option<String>,
    /// Emulate H hosts on this machine: rank r on host r / (N / H) (sets XCCL_HOST_ID and the
    /// local-rank variables; N must be a multiple of H).
    #[arg(long, default_value_t = 1, value_name = "H")]
    hosts: usize,
    /// Stop every rank after this many seconds (exit code 124).
    #[arg(long)]
    timeout: Option<f64>,
    /// Do not prefix output lines with the rank.
    #[arg(long)]
    no_prefix: bool,
    /// CPU binding: `auto` pins rank r to usable CPU r mod their count (shared memory only;
    /// one CPU each when there are enough, as Open MPI does by default), `none` leaves
    /// placement to the scheduler.
    #[arg(long, default_value = "auto")]
    bind: xccl::launch::Bind,
    /// The program and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    command: Vec<OsString>,
}

fn main() {
    let args = Args::parse();
    xccl::logging::init_labelled("[xccl-run] ");
    let mut spec = LaunchSpec::new(args.ranks, &args.command[0], args.command[1..].to_vec());
    spec.backend = args.backend;
    spec.prefix_output = !args.no_prefix;
    spec.timeout = args.timeout.map(Duration::from_secs_f64);
    spec.bind = args.bind;
    spec.oversubscribe = args.oversubscribe;
    spec.hosts = args.hosts;
    match launch(&spec) {
        Ok(outcome) => {
            if let Some(r) = outcome.first_failure {
                eprintln!(
                    "xccl-run: rank {r} failed ({}); the other ranks were stopped",
                    outcome.statuses[r]
                );
            } else if outcome.output_closed {
                // Its reader went away (`| head`): a quiet end.
            } else if outcome.timed_out {
                eprintln!("xccl-run: timeout; every rank was stopped");
            }
            std::process::exit(outcome.exit_code())
        }
        Err(e) => {
            eprintln!("xccl-run: error: {e}");
            std::process::exit(2);
        }
    }
}
