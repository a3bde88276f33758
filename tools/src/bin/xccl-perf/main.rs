//! `xccl-perf`: the microbenchmark harness. Launches its own local ranks (or joins ranks
//! started by `xccl-run`, `mpirun`, `srun`, `torchrun`), runs one primitive over a size sweep,
//! checks every result and prints an nccl-tests-style table; `plot` draws its JSON files.

mod alltoall;
mod memcpy_baseline;
mod moe;
mod moe_floor;
mod moe_table;
mod moe_work;
mod options;
mod pingpong;
mod plot;
mod put_pair;
mod report;
mod sendrecv;
mod session;
mod tcp_baseline;

use clap::Parser;
use options::{Cli, Command};
use xccl::launch::{launch, LaunchSpec};

/// Exit code of a bad command line (as clap's own).
const USAGE: i32 = 2;

/// Holds SIGTERM back (`hold`) or lets it through again. Ranks with the same bad command line
/// all stop at once, and the launcher then stops the others: held back until the options are
/// checked, rank 0 always gets to say what was wrong.
fn hold_sigterm(hold: bool) {
    let how = if hold {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: sigset operations on a local set; sigprocmask on this (the only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigprocmask(how, &set, std::ptr::null_mut());
    }
}

fn main() {
    hold_sigterm(true);
    let cli = Cli::parse();
    let Some(job) = cli.command.job() else {
        let Command::Plot(a) = &cli.command else {
            unreachable!("only plot has no job")
        };
        hold_sigterm(false);
        if let Err(e) = plot::run(a) {
            eprintln!("xccl-perf plot: {e}");
            std::process::exit(1);
        }
        return;
    };
    if let Some(filter) = &job.log {
        // Before any thread starts; the ranks it launches inherit it.
        std::env::set_var("XCCL_DEBUG", filter);
    }
    // Who launched this process, if anyone, and so how many ranks the job has.
    let launched = xccl::bootstrap::detect(None)
        .ok()
        .filter(|i| i.source != "single");
    let ranks = match &launched {
        Some(info) => {
            if let Some(np) = job.np.filter(|&np| np != info.world_size) {
                usage_error(
                    info.rank,
                    &format!(
                        "--np {np}, but the launcher ({}) started {} ranks: drop --np or give the \
                         launcher's count",
                        info.source, info.world_size
                    ),
                );
            }
            info.world_size
        }
        None => job.np(),
    };
    let rank = launched.as_ref().map_or(0, |i| i.rank);
    // Log lines say which rank wrote them; a harness launching its own ranks says so.
    match launched.is_none() && ranks > 1 {
        true => xccl::logging::init_labelled("[xccl-perf] "),
        false => xccl::logging::init(),
    };
    if let Err(msg) = cli.command.check(ranks) {
        usage_error(rank, &msg);
    }
    // The ranks xccl-perf launches see their own --hosts with XCCL_HOST_ID set.
    if launched.is_some() && job.hosts > 1 && std::env::var_os("XCCL_HOST_ID").is_none() {
        usage_error(
            rank,
            "--hosts emulates hosts with the ranks xccl-perf launches itself; under a launcher, \
             give each rank its host with XCCL_HOST_ID (or xccl-run --hosts)",
        );
    }
    // The options are good: SIGTERM stops this process again (and the ranks it launches
    // inherit the mask).
    hold_sigterm(false);

    if launched.is_none() && ranks > 1 {
        // Not started by a launcher: become one, running this same command on every rank.
        let exe = std::env::current_exe().expect("path of this executable");
        let mut spec = LaunchSpec::new(ranks, exe, std::env::args_os().skip(1).collect());
        spec.backend = Some(job.backend.clone());
        spec.prefix_output = false;
        spec.bind = job.bind;
        spec.oversubscribe = job.oversubscribe;
        spec.hosts = job.hosts as usize;
        spec.timeout = Some(std::time::Duration::from_secs_f64(job.timeout));
        match launch(&spec) {
            Ok(outcome) => {
                if outcome.timed_out {
                    eprintln!(
                        "xccl-perf: the run took longer than --timeout {} s; every rank was \
                         stopped (raise --timeout, or lower -n or -e)",
                        job.timeout
                    );
                }
                std::process::exit(outcome.exit_code())
            }
            Err(e @ xccl::Error::InvalidArgument(_)) => usage_error(0, &e.to_string()),
            Err(e) => {
                eprintln!("xccl-perf: {e}");
                std::process::exit(1);
            }
        }
    }

    let result = match &cli.command {
        Command::Pingpong(a) => pingpong::run(a),
        Command::Sendrecv(a) => sendrecv::run(a),
        Command::Alltoall(a) => alltoall::run(a, false),
        Command::Alltoallv(a) => alltoall::run(a, true),
        Command::Moe(a) => moe::run(a, moe::Phase::Both),
        Command::Dispatch(a) => moe::run(a, moe::Phase::Dispatch),
        Command::Combine(a) => moe::run(a, moe::Phase::Combine),
        Command::Plot(_) => unreachable!("handled above"),
    };
    if let Err(e) = result {
        eprintln!("xccl-perf: {e}");
        std::process::exit(1);
    }
}

/// Ends the program over a bad command line: rank 0 says why, once; every rank exits 2.
fn usage_error(rank: usize, msg: &str) -> ! {
    if rank == 0 {
        // One write (SIGTERM is still held back, see `hold_sigterm`).
        let text = format!("xccl-perf: error: {msg}\n\nFor more information, try '--help'.\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    }
    std::process::exit(USAGE)
}
