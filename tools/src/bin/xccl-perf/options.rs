//! Command-line options of `xccl-perf`, named as nccl-tests names them where the two overlap
//! (`-b -e -f -n -w -c -d`), and their checks, made once before any rank is launched.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Measures xccl's primitives between local processes (or ranks started by `xccl-run`,
/// `mpirun`, `srun`, `torchrun`), checks every result and prints an nccl-tests-style table.
///
/// Started without a launcher it launches `--np` ranks of itself. Examples:
///   xccl-perf pingpong --np 2 --baseline
///   xccl-perf alltoallv --np 4 -b 1K -e 1M
///   xccl-perf moe --np 2 --tokens 1,8,128,4096
///   xccl-perf plot a.json b.json -o sweep.svg
#[derive(Parser, Debug)]
#[command(name = "xccl-perf", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// put+signal ping-pong between rank pairs (0↔1, 2↔3, ...): one-way latency and bandwidth.
    Pingpong(ByteArgs),
    /// Tagged send/recv between rank pairs: one-way latency and streaming bandwidth.
    Sendrecv(ByteArgs),
    /// All-to-all with equal blocks; the size swept is the block each rank sends each peer.
    Alltoall(ByteArgs),
    /// All-to-all-v (MPI-style counts and displacements, equal counts, reversed layout).
    Alltoallv(ByteArgs),
    /// MoE dispatch + combine (normal or low-latency mode), each phase timed, results checked.
    Moe(MoeArgs),
    /// MoE dispatch timed alone (combine still runs, untimed, to check the results).
    Dispatch(MoeArgs),
    /// MoE combine timed alone (after an untimed dispatch each repetition).
    Combine(MoeArgs),
    /// Draws latency and bandwidth against size (one line per file) and MoE phase times from
    /// `--json` files into an SVG picture.
    Plot(PlotArgs),
}

/// Options every measuring subcommand takes: the job, the iterations, the output.
#[derive(Args, Debug, Clone)]
pub struct Job {
    /// Ranks to launch when not started by a launcher (as `mpirun -np`); under a launcher,
    /// the launcher's count (giving another is an error).
    #[arg(long = "np", value_name = "N")]
    pub np: Option<usize>,
    /// Run more ranks than 4 per CPU (refused otherwise: they would mostly wait their turn).
    #[arg(long)]
    pub oversubscribe: bool,
    /// Emulate H hosts with the ranks it launches: rank r on host r / (N / H), through
    /// XCCL_HOST_ID (as `xccl-run --hosts`; N a multiple of H).
    #[arg(long, default_value_t = 1, value_name = "H", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub hosts: u64,
    /// Transport backend: auto (shm on one host, hybrid across hosts), shm (processes on one
    /// host), tcp, or hybrid (shared memory within each host, TCP between hosts).
    #[arg(long, env = "XCCL_BACKEND", default_value = "auto", value_parser = parse_backend)]
    pub backend: String,
    /// Timed iterations per size (MoE: repetitions per configuration). Default: adaptive,
    /// 10,000 for small sizes and fewer for large ones (at least 20); MoE 10.
    #[arg(short = 'n', long = "iters", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub iters: Option<u64>,
    /// Untimed iterations before timing. Default: a tenth of the timed ones, at least 2.
    #[arg(short = 'w', long = "warmup_iters", value_name = "N", value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub warmup: Option<u64>,
    /// Check every result: 1 (default) or 0.
    #[arg(short = 'c', long = "check", value_name = "0|1", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub check: u8,
    /// Corrupt one received value before it is checked (tests that a failed check fails).
    #[arg(long, hide = true)]
    pub inject_error: bool,
    /// Also measure a baseline in the same run and print the ratios: an in-process memcpy of
    /// the same bytes; for pingpong and sendrecv over tcp, plain TCP between the same pair.
    #[arg(long)]
    pub baseline: bool,
    /// Also write the rows, with what ran where and when, as a JSON array to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Give up (every wait and the whole run) after this many seconds.
    #[arg(long, default_value_t = 120.0, value_parser = parse_seconds)]
    pub timeout: f64,
    /// Data path. All-to-all: `window` (one copy: blocks land in a registered receive window
    /// and are read in place) or `buffer` (MPI-style: into the caller's buffer, via rings).
    /// MoE combine: `window` (experts write their output into the buffer's window, homes read
    /// it there) or `buffer` (experts write a buffer of their own, combine copies it in).
    #[arg(long, default_value = "window", value_parser = ["window", "buffer"])]
    pub api: String,
    /// CPU binding of the ranks it launches: auto (rank r on CPU r mod the usable CPUs, shared
    /// memory only) or none.
    #[arg(long, default_value = "auto")]
    pub bind: xccl::launch::Bind,
    /// Log filter (as XCCL_DEBUG: `info`, `debug`, `xccl=debug,warn`).
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

/// Ranks launched when neither `--np` nor a launcher says.
pub const DEFAULT_NP: usize = 2;

impl Job {
    /// Results are not checked (`-c 0`).
    pub fn no_check(&self) -> bool {
        self.check == 0
    }

    /// Ranks to launch.
    pub fn np(&self) -> usize {
        self.np.unwrap_or(DEFAULT_NP)
    }
}

/// Options of the byte-sweep subcommands (point-to-point and all-to-all).
#[derive(Args, Debug, Clone)]
pub struct ByteArgs {
    #[command(flatten)]
    pub job: Job,
    /// Smallest size in bytes (suffixes K, M, G).
    #[arg(short = 'b', long = "minbytes", default_value = "8", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Largest size in bytes (suffixes K, M, G); default 64M, or 1M for all-to-all blocks.
    #[arg(short = 'e', long = "maxbytes", value_parser = parse_size)]
    pub max_bytes: Option<usize>,
    /// Size multiplication factor between steps (at least 2).
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    pub step_factor: usize,
    /// Element type named in the table's `count` and `type` columns (the bytes moved are
    /// the same): uint8, int8, int32, uint32, int64, uint64, half, bfloat16, float, double.
    #[arg(short = 'd', long = "datatype", default_value = "uint8", value_parser = ELEMENT_TYPES.map(|(n, _)| n))]
    pub datatype: String,
}

/// The element types of `-d` for byte sweeps and their sizes.
pub const ELEMENT_TYPES: [(&str, usize); 10] = [
    ("uint8", 1),
    ("int8", 1),
    ("int32", 4),
    ("uint32", 4),
    ("int64", 8),
    ("uint64", 8),
    ("half", 2),
    ("bfloat16", 2),
    ("float", 4),
    ("double", 8),
];

impl std::ops::Deref for ByteArgs {
    type Target = Job;
    fn deref(&self) -> &Job {
        &self.job
    }
}

impl ByteArgs {
    /// The `-d` type's name (static, for rows) and size in bytes.
    pub fn element(&self) -> (&'static str, usize) {
        ELEMENT_TYPES
            .into_iter()
            .find(|(n, _)| *n == self.datatype)
            .unwrap_or(ELEMENT_TYPES[0])
    }

    /// The size sweep, up to `-e` or else `default_max`.
    pub fn sizes(&self, default_max: usize) -> Result<Vec<usize>, String> {
        let max = self.max_bytes.unwrap_or(default_max);
        if self.min_bytes > max {
            return Err(format!(
                "-b {} is larger than -e {max}: the sweep runs from -b up to -e",
                self.min_bytes
            ));
        }
        if self.step_factor < 2 {
            return Err(format!(
                "-f {}: the step factor must be at least 2 (each size is the last times -f)",
                self.step_factor
            ));
        }
        let (name, size) = self.element();
        if self.min_bytes % size != 0 {
            return Err(format!(
                "-b {} is not a whole number of {name} elements ({size} bytes each)",
                self.min_bytes
            ));
        }
        let mut v = Vec::new();
        let mut s = self.min_bytes;
        loop {
            v.push(s);
            if s == 0 {
                s = size;
                continue;
            }
            match s.checked_mul(self.step_factor) {
                Some(n) if n <= max => s = n,
                _ => break,
            }
        }
        Ok(v)
    }

    /// Timed iterations for `size` bytes: `-n`, else fewer for large sizes, so each size takes
    /// roughly the same time, but never fewer than 20.
    pub fn iters_for(&self, size: usize) -> usize {
        match self.iters {
            Some(n) => n as usize,
            None => ((256usize << 20) / size.max(1)).clamp(20, 10_000),
        }
    }

    /// Warm-up iterations for `iters` timed ones.
    pub fn warmup_for(&self, iters: usize) -> usize {
        self.warmup.map_or((iters / 10).max(2), |w| w as usize)
    }
}

/// Options of the MoE subcommands.
#[derive(Args, Debug, Clone)]
pub struct MoeArgs {
    #[command(flatten)]
    pub job: Job,
    /// Tokens per rank; a comma-separated list sweeps them, one table row each.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128",
        value_name = "T[,T...]"
    )]
    pub tokens: Vec<usize>,
    /// Hidden size.
    #[arg(long, default_value_t = 7168)]
    pub hidden: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 8)]
    pub topk: usize,
    /// Experts in all, spread evenly over the ranks (a multiple of the rank count).
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Row type: bf16, f16 or f32; int8 = bf16 rows dispatched as INT8 with per-row scales.
    #[arg(short = 'd', long = "datatype", alias = "dtype", default_value = "bf16", value_parser = ["bf16", "f16", "f32", "int8"])]
    pub dtype: String,
    /// Modes, a comma-separated list (each row of the sweep in each, side by side):
    /// normal (any batch) or low-latency (a fixed maximum batch, rows grouped by expert).
    #[arg(long = "mode", value_delimiter = ',', default_value = "normal", value_parser = ["normal", "low-latency"], value_name = "MODE[,MODE]")]
    pub modes: Vec<String>,
    /// The experts: identity (each rank returns each token's row times the sum of its
    /// experts' weights, untimed) or copy (each expert reads every row it received once and
    /// writes its output row, the least any expert does; the table adds the expert's time and
    /// the layer's, dispatch → expert → combine, timed as one).
    #[arg(long, default_value = "identity", value_parser = ["identity", "copy"])]
    pub expert: String,
    /// Normal-mode dispatch, a comma-separated list: copy (rows written into the experts'
    /// ranks' windows) or zero-copy (rows written once into the sender's window, mapped ranks
    /// read them in place). Default: copy, and both with `--expert copy`.
    #[arg(long = "dispatch", value_delimiter = ',', value_parser = ["copy", "zero-copy"], value_name = "KIND[,KIND]")]
    pub dispatch: Option<Vec<String>>,
    /// Routing: `uniform` (each token picks top-k distinct experts at random) or `zipf:S`
    /// (expert e is picked with weight 1/(e+1)^S, S > 0, without replacement: low expert ids,
    /// and so the first ranks, are hot).
    #[arg(long, default_value = "uniform", value_parser = parse_routing)]
    pub routing: Routing,
    /// Random seed of data and routing.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Model expert compute: each rank spends X µs per (token, expert) row it received,
    /// asleep (accelerator time, which takes no CPU: the core is free for other ranks
    /// meanwhile). Times the experts and the layer (dispatch → experts → combine, a barrier
    /// before combine so that combine is timed alone) and reports the load imbalance.
    #[arg(long = "expert-us", default_value_t = 0.0, value_name = "X", value_parser = parse_expert_us)]
    pub expert_us: f64,
    /// Expert load balancing: EXTRA replica slots in all (every rank gets experts/ranks +
    /// EXTRA/ranks slots, rounded up), the map built by `xccl::moe::rebalance` from the
    /// load of the warm-up steps, and POLICY fewest (default: fewest ranks per token, the
    /// fewest bytes), rotate or local (local-first). Each row is then
    /// measured without and with EPLB, repetitions interleaved, and the ratio printed.
    #[arg(long, value_name = "EXTRA[,POLICY]", value_parser = parse_eplb)]
    pub eplb: Option<Eplb>,
    /// Normal mode across hosts, a comma-separated list: auto (the buffer's choice:
    /// two-level on the hybrid backend), flat (every rank sends to every rank) or two-level
    /// (once per remote host, through a gateway rank there). Two of them: each row is
    /// measured in both, repetitions interleaved, and the ratio printed.
    #[arg(long = "levels", value_delimiter = ',', default_value = "auto", value_parser = ["auto", "flat", "two-level"], value_name = "KIND[,KIND]")]
    pub levels: Vec<String>,
}

/// `--eplb`: replica slots in all and the replica policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eplb {
    pub extra: usize,
    pub policy: xccl::moe::ReplicaPolicy,
}

impl std::fmt::Display for Eplb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.extra, policy_name(self.policy))
    }
}

fn parse_eplb(v: &str) -> Result<Eplb, String> {
    let (extra, policy) = v.split_once(',').unwrap_or((v, "fewest"));
    let extra = extra
        .parse::<usize>()
        .map_err(|_| format!("--eplb {v:?}: expected EXTRA[,rotate|local], EXTRA a count"))?;
    use xccl::moe::ReplicaPolicy;
    let policy = match policy {
        "rotate" => ReplicaPolicy::Rotate,
        "local" => ReplicaPolicy::LocalFirst,
        "fewest" => ReplicaPolicy::FewestRanks,
        _ => {
            return Err(format!(
                "--eplb policy {policy:?}: expected rotate, local or fewest"
            ))
        }
    };
    Ok(Eplb { extra, policy })
}

/// The `--eplb` name of a replica policy.
pub fn policy_name(p: xccl::moe::ReplicaPolicy) -> &'static str {
    match p {
        xccl::moe::ReplicaPolicy::Rotate => "rotate",
        xccl::moe::ReplicaPolicy::LocalFirst => "local",
        xccl::moe::ReplicaPolicy::FewestRanks => "fewest",
    }
}

fn parse_expert_us(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=1e6).contains(&x) => Ok(x),
        _ => Err(format!(
            "--expert-us {v:?}: expected microseconds, 0 or more"
        )),
    }
}

impl MoeArgs {
    /// Timed repetitions per configuration (`-n`, default 10).
    pub fn reps(&self) -> usize {
        self.job.iters.map_or(10, |n| n as usize)
    }

    /// Whether the experts (and the layer) are timed: copy experts or modelled compute.
    pub fn timed_experts(&self) -> bool {
        self.expert == "copy" || self.expert_us > 0.0
    }

    /// Untimed repetitions first (`-w`, default 2).
    pub fn warmup(&self) -> usize {
        self.job.warmup.map_or(2, |w| w as usize)
    }

    /// The routings across hosts each normal-mode row runs (`--levels`).
    pub fn two_levels(&self) -> Vec<xccl::moe::TwoLevel> {
        use xccl::moe::TwoLevel;
        (self.levels.iter())
            .map(|l| match l.as_str() {
                "flat" => TwoLevel::Off,
                "two-level" => TwoLevel::On,
                _ => TwoLevel::Auto,
            })
            .collect()
    }

    /// The dispatches each normal-mode row runs (`--dispatch`, or its default).
    pub fn dispatches(&self) -> Vec<&str> {
        match &self.dispatch {
            Some(d) => d.iter().map(String::as_str).collect(),
            None if self.expert == "copy" => vec!["copy", "zero-copy"],
            None => vec!["copy"],
        }
    }

    /// Every (mode, dispatch) of the sweep, in table order: zero-copy is a normal-mode
    /// dispatch.
    pub fn variants(&self) -> Vec<(&str, &str)> {
        let mut v = Vec::new();
        for mode in &self.modes {
            for kind in self.dispatches() {
                if mode == "normal" || kind == "copy" {
                    v.push((mode.as_str(), kind));
                }
            }
        }
        v.dedup();
        v
    }

    /// Checks the shape against `ranks` ranks, naming the options to change.
    pub fn check(&self, ranks: usize) -> Result<(), String> {
        if self.tokens.is_empty() {
            return Err("--tokens: give at least one count, like 128 or 1,8,128".into());
        }
        if self.levels.len() > 2 || (self.levels.len() == 2 && self.levels[0] == self.levels[1]) {
            return Err("--levels: give one kind, or two to compare (like flat,two-level)".into());
        }
        if self.levels.len() > 1 && self.eplb.is_some() {
            return Err("--levels with two kinds and --eplb: compare one at a time".into());
        }
        if self.variants().is_empty() {
            return Err("--dispatch zero-copy is a normal-mode dispatch: add --mode normal".into());
        }
        if self.dtype == "int8" && self.dispatches().contains(&"zero-copy") {
            return Err(
                "--dispatch zero-copy leaves rows unquantized where they are written: use \
                 -d bf16 (or --dispatch copy with -d int8)"
                    .into(),
            );
        }
        if self.hidden == 0 {
            return Err("--hidden must be at least 1".into());
        }
        if self.experts == 0 {
            return Err("--experts must be at least 1".into());
        }
        if self.topk == 0 || self.topk > self.experts {
            return Err(format!(
                "--topk {} needs 1 to {} (--experts {}): each token picks distinct experts",
                self.topk, self.experts, self.experts
            ));
        }
        if self.experts % ranks != 0 {
            let lower = self.experts / ranks * ranks;
            let upper = lower + ranks;
            let near = if lower == 0 {
                format!("{upper}")
            } else {
                format!("{lower} or {upper}")
            };
            return Err(format!(
                "--experts {} cannot be spread evenly over {ranks} ranks: use a multiple of \
                 {ranks} (such as {near}) or another rank count",
                self.experts
            ));
        }
        if self.eplb.is_some() && self.expert == "copy" {
            return Err(
                "--eplb checks outputs against identity experts (a copy expert's output depends \
                 on which replica served a row): drop --expert copy, and model expert time \
                 with --expert-us"
                    .into(),
            );
        }
        let local = xccl::moe::ReplicaPolicy::LocalFirst;
        let one_host_shm =
            self.job.backend == "shm" || (self.job.backend == "auto" && self.job.hosts == 1);
        if self.eplb.is_some_and(|e| e.policy == local) && !one_host_shm {
            return Err(
                "--eplb ...,local needs the hosts of the ranks: the harness knows them on \
                 shm (one host); use rotate over tcp"
                    .into(),
            );
        }
        // The library's own check of the shape (the token count does not enter it).
        let cfg = xccl::moe::MoeConfig::new(
            self.experts,
            self.hidden,
            self.topk,
            1,
            xccl::moe::Dtype::Bf16,
        );
        cfg.placement_for(ranks)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Options of `plot`.
#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// `--json` files written by xccl-perf: one line per file.
    #[arg(required = true, value_name = "FILE.json")]
    pub files: Vec<PathBuf>,
    /// The picture to write (SVG).
    #[arg(short = 'o', long = "output", value_name = "FILE.svg")]
    pub output: PathBuf,
    /// Picture title (default: the ops and backends of the files).
    #[arg(long)]
    pub title: Option<String>,
}

/// How the harness routes tokens to experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Every expert equally likely.
    Uniform,
    /// Expert `e` with weight `1 / (e + 1)^s`.
    Zipf(f64),
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Routing::Uniform => write!(f, "uniform"),
            Routing::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

fn parse_routing(v: &str) -> Result<Routing, String> {
    if v == "uniform" {
        return Ok(Routing::Uniform);
    }
    let s = v
        .strip_prefix("zipf:")
        .ok_or_else(|| format!("routing {v:?}: expected uniform or zipf:S"))?;
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 100.0 => Ok(Routing::Zipf(x)),
        _ => Err(format!(
            "zipf exponent {s:?}: expected a number in (0, 100]"
        )),
    }
}

/// The backends the harness runs on. The loopback backend (ranks as threads of one process)
/// is for library tests, not for a harness that launches processes.
fn parse_backend(v: &str) -> Result<String, String> {
    match v {
        "auto" | "shm" | "tcp" | "hybrid" => Ok(v.to_string()),
        "loopback" => Err(
            "loopback runs ranks as threads of one process, for library tests; the harness \
             runs processes: use auto, shm (one host), tcp or hybrid"
                .into(),
        ),
        _ => Err(format!(
            "{v:?} is not a backend (from --backend or XCCL_BACKEND): use auto, shm (one \
             host), tcp or hybrid"
        )),
    }
}

fn parse_seconds(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 1e6 => Ok(s),
        _ => Err(format!("{v:?}: expected seconds, more than 0")),
    }
}

impl Command {
    /// The job options of a measuring subcommand (`None` for `plot`).
    pub fn job(&self) -> Option<&Job> {
        match self {
            Command::Pingpong(a)
            | Command::Sendrecv(a)
            | Command::Alltoall(a)
            | Command::Alltoallv(a) => Some(&a.job),
            Command::Moe(a) | Command::Dispatch(a) | Command::Combine(a) => Some(&a.job),
            Command::Plot(_) => None,
        }
    }

    /// Checks what can be checked before any rank starts, for `ranks` ranks; the message
    /// names the option to change.
    pub fn check(&self, ranks: usize) -> Result<(), String> {
        let min_ranks = match self {
            Command::Pingpong(a) | Command::Sendrecv(a) => {
                a.sizes(64 << 20)?;
                2
            }
            Command::Alltoall(a) | Command::Alltoallv(a) => {
                a.sizes(1 << 20)?;
                1
            }
            Command::Moe(a) | Command::Dispatch(a) | Command::Combine(a) => {
                a.check(ranks)?;
                1
            }
            Command::Plot(_) => return Ok(()),
        };
        if ranks < min_ranks {
            return Err(format!(
                "this test needs at least {min_ranks} ranks (--np {min_ranks})"
            ));
        }
        Ok(())
    }
}

/// Parses `123`, `4K`, `64M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (like 8, 64K, 16M, 1G)"))
}
