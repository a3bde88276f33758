//! Launching N local ranks of a program: environment, output prefixing, and failure
//! propagation (one rank fails → the others are stopped; no orphans, non-zero exit).

use crate::bootstrap::TcpStoreServer;
use crate::error::{Error, Result};
use rustix::process::{
    getpid, getppid, kill_process, set_parent_process_death_signal, Pid, Signal,
};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Number of ranks.
    pub ranks: usize,
    /// Program to run for every rank.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// `XCCL_BACKEND` for the ranks, if set.
    pub backend: Option<String>,
    /// Extra environment for every rank.
    pub env: Vec<(OsString, OsString)>,
    /// Prefix each output line with `[rank] `. Either way the ranks' output passes through
    /// the launcher, which ends the job quietly when its own stdout is closed.
    pub prefix_output: bool,
    /// Stop every rank after this long.
    pub timeout: Option<Duration>,
    /// How long ranks get to exit after SIGTERM before SIGKILL.
    pub grace: Duration,
    /// Pin each rank to one CPU.
    pub bind: Bind,
    /// Allow more than [`MAX_RANKS_PER_CPU`] ranks per CPU (refused otherwise).
    pub oversubscribe: bool,
    /// Emulated hosts: rank r is on host r / (ranks / hosts), through `XCCL_HOST_ID` and the
    /// local-rank variables (1: the machine's own identity).
    pub hosts: usize,
}

/// Ranks per usable CPU a launch accepts unless told to oversubscribe: beyond it ranks
/// mostly wait their turn (and a typo like `--np 1000` would start a thousand processes).
pub const MAX_RANKS_PER_CPU: usize = 4;

/// CPU binding of the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// Rank r runs on CPU r mod n of the n CPUs this launcher may use (one each when there
    /// are enough, as Open MPI binds by default; in turn when oversubscribed), unless the
    /// ranks have a TCP node (backend tcp or hybrid, or auto across emulated hosts: progress
    /// threads run beside the caller); unbound otherwise. Unbound
    /// shared-memory ranks get moved onto one CPU by the scheduler now and then, which makes
    /// timings bimodal; oversubscribed, they also migrate between the CPUs while they take
    /// turns (4 ranks on 2 CPUs: MoE decode calls 1.3–1.8× faster pinned).
    Auto,
    /// Never pin.
    None,
}

impl std::str::FromStr for Bind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" | "core" => Ok(Bind::Auto),
            "none" => Ok(Bind::None),
            other => Err(format!("--bind {other:?}: expected auto or none")),
        }
    }
}

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => Vec::new(),
    }
}

impl LaunchSpec {
    /// `ranks` copies of `program` with `args`, prefixed output, no timeout.
    pub fn new(ranks: usize, program: impl Into<PathBuf>, args: Vec<OsString>) -> Self {
        LaunchSpec {
            ranks,
            program: program.into(),
            args,
            backend: None,
            env: Vec::new(),
            prefix_output: true,
            timeout: None,
            grace: Duration::from_secs(3),
            bind: Bind::Auto,
            oversubscribe: false,
            hosts: 1,
        }
    }

    /// Ranks per emulated host.
    fn per_host(&self) -> usize {
        self.ranks / self.hosts.max(1)
    }
}

/// How a launch ended.
#[derive(Debug)]
pub struct LaunchOutcome {
    /// Each rank's exit status, by rank.
    pub statuses: Vec<ExitStatus>,
    /// The first rank that failed (non-zero exit or killed by a signal we did not send).
    pub first_failure: Option<usize>,
    /// The launcher stopped the ranks because the timeout passed.
    pub timed_out: bool,
    /// A rank ended because its output was closed (killed by SIGPIPE, or exited with
    /// [`OUTPUT_CLOSED`], as a reader like `head` going away makes it); the launcher stopped
    /// the others quietly.
    pub output_closed: bool,
}

/// The exit code of a program whose output was closed: that of a SIGPIPE death (128 + 13),
/// which shells do not report.
pub const OUTPUT_CLOSED: i32 = 141;

impl LaunchOutcome {
    /// A process exit code summarizing the launch: 0 on success, else the failing rank's
    /// code (128 + signal for a signal), 124 on timeout.
    pub fn exit_code(&self) -> i32 {
        if self.output_closed {
            return OUTPUT_CLOSED;
        }
        if self.timed_out {
            return 124;
        }
        match self.first_failure {
            None => 0,
            Some(r) => {
                let s = self.statuses[r];
                s.code()
                    .unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
                    .max(1)
            }
        }
    }
}

/// What the launcher hears while ranks run.
enum Event {
    /// A rank's exit.
    Exit(usize, std::io::Result<ExitStatus>),
    /// The launcher's own stdout was closed (its reader went away).
    OutputClosed,
}

/// Forwards `src` line by line to the launcher's stdout (or stderr), each line after
/// `prefix`. Once the stdout is closed (`| head` is done) nothing more is written, to either
/// stream, and the rest is drained so no rank blocks on a full pipe.
fn copy_lines(
    src: impl Read,
    prefix: String,
    to_stderr: bool,
    closed: &AtomicBool,
    events: &mpsc::Sender<Event>,
) {
    let mut reader = BufReader::new(src);
    let mut line = Vec::new();
    while reader
        .read_until(b'\n', &mut line)
        .map(|n| n > 0)
        .unwrap_or(false)
    {
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        if !closed.load(Ordering::Relaxed) {
            let written = if to_stderr {
                write_line(&mut std::io::stderr().lock(), &prefix, &line)
            } else {
                write_line(&mut std::io::stdout().lock(), &prefix, &line)
            };
            if let Err(e) = written {
                if !to_stderr && e.kind() == std::io::ErrorKind::BrokenPipe {
                    closed.store(true, Ordering::Relaxed);
                    let _ = events.send(Event::OutputClosed);
                }
            }
        }
        line.clear();
    }
}

fn write_line(out: &mut impl Write, prefix: &str, line: &[u8]) -> std::io::Result<()> {
    out.write_all(prefix.as_bytes())?;
    out.write_all(line)?;
    out.flush()
}

fn send_signal(pid: u32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        // A child we spawned and have not yet seen reaped; one already gone is no error.
        let _ = kill_process(pid, sig);
    }
}

/// Runs the ranks to completion. The launcher serves the job's rendezvous store itself, so
/// no rank has to bind a port. Children die with the launcher (`PR_SET_PDEATHSIG`).
pub fn launch(spec: &LaunchSpec) -> Result<LaunchOutcome> {
    if spec.ranks == 0 {
        return Err(Error::InvalidArgument("need at least one rank".into()));
    }
    if spec.hosts == 0 || spec.ranks % spec.hosts != 0 {
        return Err(Error::InvalidArgument(format!(
            "{} ranks cannot be spread evenly over {} hosts: use a multiple of the host count",
            spec.ranks, spec.hosts
        )));
    }
    let cpus = allowed_cpus();
    let limit = MAX_RANKS_PER_CPU * cpus.len().max(1);
    if spec.ranks > limit && !spec.oversubscribe {
        return Err(Error::InvalidArgument(format!(
            "{} ranks on {} CPUs is more than {MAX_RANKS_PER_CPU} per CPU (at most {limit}): \
             they would mostly wait their turn; to run them anyway, oversubscribe \
             (--oversubscribe)",
            spec.ranks,
            cpus.len()
        )));
    }
    let secret = job_secret(spec);
    // Names the emulated hosts of this launch apart from any other's.
    let host_prefix = crate::bootstrap::random_job_id();
    let store = TcpStoreServer::bind("127.0.0.1:0", Some(secret.as_bytes()))?;
    let store_url = format!("tcp://{}", store.addr());
    let (tx, rx) = mpsc::channel::<Event>();
    let closed = Arc::new(AtomicBool::new(false));
    let mut pids = Vec::with_capacity(spec.ranks);
    let mut pipes = Vec::new();
    // Ranks with a TCP node run progress threads beside the caller: pinning a rank to one
    // CPU would make them take turns, so only shared-memory ranks are pinned.
    let networked = match spec.backend.as_deref() {
        Some("tcp" | "hybrid") => true,
        Some("shm") => false,
        _ => spec.hosts > 1,
    };
    let pin = spec.bind == Bind::Auto && !networked && !cpus.is_empty();
    for rank in 0..spec.ranks {
        let cpu = cpus.get(rank % cpus.len().max(1)).copied().filter(|_| pin);
        let mut child =
            match rank_command(spec, rank, &store_url, &secret, cpu, &host_prefix).spawn() {
                Ok(c) => c,
                Err(e) => {
                    pids.iter().for_each(|&p| send_signal(p, Signal::KILL));
                    return Err(Error::system(
                        format!("starting rank {rank}: {}", spec.program.display()),
                        e,
                    ));
                }
            };
        pids.push(child.id());
        let (out, err) = (
            child.stdout.take().expect("piped"),
            child.stderr.take().expect("piped"),
        );
        let prefix = match spec.prefix_output {
            true => format!("[{rank}] "),
            false => String::new(),
        };
        for (src, to_stderr) in [
            (Box::new(out) as Box<dyn Read + Send>, false),
            (Box::new(err), true),
        ] {
            let (prefix, closed, tx) = (prefix.clone(), closed.clone(), tx.clone());
            pipes.push(std::thread::spawn(move || {
                copy_lines(src, prefix, to_stderr, &closed, &tx)
            }));
        }
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Event::Exit(rank, child.wait()));
        });
    }
    drop(tx);
    let outcome = supervise(spec, &rx, &pids);
    for p in pipes {
        let _ = p.join();
    }
    drop(store);
    outcome
}

/// The job secret: the caller's, else a fresh one. It reaches the ranks only through their
/// environment (readable by this user alone), never through the store, which demands it
/// from every client.
fn job_secret(spec: &LaunchSpec) -> String {
    spec.env
        .iter()
        .find(|(k, _)| k == "XCCL_JOB_SECRET")
        .map(|(_, v)| v.to_string_lossy().into_owned())
        .or_else(|| std::env::var("XCCL_JOB_SECRET").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(crate::bootstrap::random_job_id)
}

/// The command that starts `rank`: its environment, its output piped for prefixing, and in
/// the child a death signal tied to this launcher and the CPU it is pinned to, if any.
fn rank_command(
    spec: &LaunchSpec,
    rank: usize,
    store_url: &str,
    secret: &str,
    cpu: Option<usize>,
    host_prefix: &str,
) -> Command {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env("XCCL_RANK", rank.to_string())
        .env("XCCL_WORLD_SIZE", spec.ranks.to_string())
        .env("XCCL_LOCAL_RANK", (rank % spec.per_host()).to_string())
        .env("XCCL_LOCAL_SIZE", spec.per_host().to_string())
        .env("XCCL_STORE", store_url)
        .env("XCCL_STORE_SERVER", "external")
        .env("XCCL_JOB_SECRET", secret)
        .stdin(Stdio::null());
    if let Some(b) = &spec.backend {
        cmd.env("XCCL_BACKEND", b);
    }
    if spec.hosts > 1 {
        // One name per emulated host, unique to this launch.
        let host = rank / spec.per_host();
        cmd.env("XCCL_HOST_ID", format!("{host_prefix}-host{host}"));
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let launcher_pid = getpid();
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (raw prctl, getppid and sched_setaffinity system calls through
    // rustix, _exit) on values it owns.
    unsafe {
        cmd.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            if getppid() != Some(launcher_pid) {
                libc::_exit(127); // the launcher died before the death signal was armed
            }
            if let Some(cpu) = cpu {
                let mut set = rustix::thread::CpuSet::new();
                set.set(cpu);
                // Unpinned is still correct, only noisier.
                let _ = rustix::thread::sched_setaffinity(None, &set);
            }
            Ok(())
        });
    }
    cmd
}

/// Collects every rank's exit. The first failure, or the launch timeout, sends the others
/// SIGTERM; those still running after the grace period get SIGKILL.
fn supervise(spec: &LaunchSpec, rx: &mpsc::Receiver<Event>, pids: &[u32]) -> Result<LaunchOutcome> {
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; spec.ranks];
    let mut first_failure = None;
    let mut timed_out = false;
    let mut output_closed = false;
    let mut stop_at: Option<Instant> = spec.timeout.map(|t| Instant::now() + t);
    let mut killed = false;
    let signal_running = |statuses: &[Option<ExitStatus>], sig| {
        for (r, &pid) in pids.iter().enumerate() {
            if statuses[r].is_none() {
                send_signal(pid, sig);
            }
        }
    };
    let mut remaining = spec.ranks;
    while remaining > 0 {
        let wait = stop_at.map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(Event::OutputClosed) => {
                if !output_closed && first_failure.is_none() && !timed_out {
                    // The reader of the output went away (`| head`): nothing failed, the job
                    // is over; the ranks stop without a word.
                    output_closed = true;
                    signal_running(&statuses, Signal::TERM);
                    stop_at = Some(Instant::now() + spec.grace);
                }
            }
            Ok(Event::Exit(rank, status)) => {
                remaining -= 1;
                let status =
                    status.map_err(|e| Error::system(format!("waiting for rank {rank}"), e))?;
                statuses[rank] = Some(status);
                let closed =
                    status.signal() == Some(libc::SIGPIPE) || status.code() == Some(OUTPUT_CLOSED);
                if output_closed || first_failure.is_some() || timed_out || status.success() {
                    continue;
                }
                if closed {
                    // The rank's own output was closed (started with another stdout).
                    output_closed = true;
                } else {
                    first_failure = Some(rank);
                    tracing::warn!(rank, %status, "a rank failed; stopping the other ranks");
                }
                signal_running(&statuses, Signal::TERM);
                stop_at = Some(Instant::now() + spec.grace);
            }
            Err(mpsc::RecvTimeoutError::Timeout)
                if first_failure.is_none() && !timed_out && !output_closed =>
            {
                timed_out = true;
                tracing::warn!("launch timeout; stopping every rank");
                signal_running(&statuses, Signal::TERM);
                stop_at = Some(Instant::now() + spec.grace);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !killed => {
                killed = true;
                signal_running(&statuses, Signal::KILL);
                stop_at = None;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(LaunchOutcome {
        statuses: statuses
            .into_iter()
            .map(|s| s.unwrap_or_else(|| ExitStatus::from_raw(9)))
            .collect(),
        first_failure,
        timed_out,
        output_closed,
    })
}
