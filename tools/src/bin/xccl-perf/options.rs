//! Command-line options of `xccl-perf`.

use clap::{Args, Parser, Subcommand};

/// Microbenchmarks of xccl primitives with checked results.
#[derive(Parser, Debug)]
#[command(name = "xccl-perf", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// put+signal ping-pong between rank pairs (0↔1, 2↔3, ...): one-way latency and bandwidth.
    Pingpong(PingpongArgs),
    /// Tagged send/recv between rank pairs: one-way latency and streaming bandwidth.
    Sendrecv(PingpongArgs),
    /// All-to-all with equal blocks; the size swept is the block each rank sends each peer.
    Alltoall(PingpongArgs),
    /// All-to-all-v (MPI-style counts and displacements, equal counts, reversed layout).
    Alltoallv(PingpongArgs),
    /// MoE dispatch + combine (normal mode), timed separately, results checked.
    Moe(MoeArgs),
    /// MoE dispatch alone in the table (combine still runs, untimed, to check the results).
    Dispatch(MoeArgs),
    /// MoE combine alone in the table (after an untimed dispatch each repetition).
    Combine(MoeArgs),
}

/// Options of the MoE subcommand.
#[derive(Args, Debug)]
pub struct MoeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Tokens per rank.
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 7168)]
    pub hidden: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 8)]
    pub topk: usize,
    /// Experts in all (spread evenly over the ranks).
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Row type: bf16, f16 or f32; int8 = bf16 rows dispatched as INT8 with per-row scales.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32", "int8"])]
    pub dtype: String,
    /// Mode: normal (one row per token and destination rank) or low-latency (one row per
    /// token and expert, fixed slots, one round).
    #[arg(long, default_value = "normal", value_parser = ["normal", "low-latency"])]
    pub mode: String,
    /// Routing: `uniform` (each token picks top-k distinct experts at random) or `zipf:S`
    /// (expert e is picked with weight 1/(e+1)^S, S > 0, without replacement: low expert ids,
    /// and so the first ranks, are hot).
    #[arg(long, default_value = "uniform", value_parser = parse_routing)]
    pub routing: Routing,
    /// Timed repetitions.
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Random seed of data and routing.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
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

impl Command {
    /// The options every subcommand has.
    pub fn common(&self) -> &Common {
        match self {
            Command::Pingpong(a)
            | Command::Sendrecv(a)
            | Command::Alltoall(a)
            | Command::Alltoallv(a) => &a.common,
            Command::Moe(a) | Command::Dispatch(a) | Command::Combine(a) => &a.common,
        }
    }
}

/// Options every subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Ranks to launch when not started by a launcher.
    #[arg(short = 'n', long = "ranks", default_value_t = 2)]
    pub ranks: usize,
    /// Transport backend.
    #[arg(long, default_value = "shm")]
    pub backend: String,
    /// Smallest size in bytes (suffixes K, M, G).
    #[arg(short = 'b', long = "minbytes", default_value = "8", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Largest size in bytes (suffixes K, M, G); default 64M, or 1M for all-to-all blocks.
    #[arg(short = 'e', long = "maxbytes", value_parser = parse_size)]
    pub max_bytes: Option<usize>,
    /// Size multiplication factor between steps.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    pub step_factor: usize,
    /// Timed iterations for small sizes (large sizes use fewer, at least 20).
    #[arg(long, default_value_t = 10_000)]
    pub iters: usize,
    /// Untimed iterations before timing (default: a tenth of the timed ones, at least 2).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Skip the result check.
    #[arg(long)]
    pub no_check: bool,
    /// Corrupt one received value before it is checked (tests that a failed check fails).
    #[arg(long, hide = true)]
    pub inject_error: bool,
    /// Also measure a baseline in the same run and print the ratios: an in-process memcpy of
    /// the same bytes; for pingpong and sendrecv over tcp, plain TCP between the same pair.
    #[arg(long)]
    pub baseline: bool,
    /// Write the rows as a JSON array to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Give up (every wait and the whole run) after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Data path. All-to-all: `window` (one copy: blocks land in a registered receive window
    /// and are read in place) or `buffer` (MPI-style: into the caller's buffer, via rings).
    /// MoE combine: `window` (experts write their output into the buffer's window, homes read
    /// it there) or `buffer` (experts write a buffer of their own, combine copies it in).
    #[arg(long, default_value = "window", value_parser = ["window", "buffer"])]
    pub api: String,
    /// CPU binding of the ranks it launches: auto (one CPU each when there are enough) or none.
    #[arg(long, default_value = "auto")]
    pub bind: xccl::launch::Bind,
    /// Log filter (else XCCL_DEBUG, else warn).
    #[arg(long)]
    pub log: Option<String>,
}

impl Common {
    /// The size sweep, up to `-e` or else `default_max`.
    pub fn sizes(&self, default_max: usize) -> Result<Vec<usize>, String> {
        let max = self.max_bytes.unwrap_or(default_max);
        if self.min_bytes > max {
            return Err(format!("-b {} is larger than -e {max}", self.min_bytes));
        }
        if self.step_factor < 2 {
            return Err("-f must be at least 2".into());
        }
        let mut v = Vec::new();
        let mut s = self.min_bytes;
        loop {
            v.push(s);
            if s == 0 {
                s = 1;
                continue;
            }
            match s.checked_mul(self.step_factor) {
                Some(n) if n <= max => s = n,
                _ => break,
            }
        }
        Ok(v)
    }

    /// Timed iterations for `size` bytes: fewer for large sizes, so each size takes roughly
    /// the same time, but never fewer than 20.
    pub fn iters_for(&self, size: usize) -> usize {
        let budget = (256usize << 20) / size.max(1);
        budget.clamp(20, self.iters.max(20))
    }

    /// Warm-up iterations for `iters` timed ones.
    pub fn warmup_for(&self, iters: usize) -> usize {
        self.warmup.unwrap_or((iters / 10).max(2))
    }
}

#[derive(Args, Debug)]
pub struct PingpongArgs {
    #[command(flatten)]
    pub common: Common,
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
