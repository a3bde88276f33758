//! The skeleton every subcommand shares: connect with the common options, pair the ranks of
//! the point-to-point tests, print the table's header on rank 0, time a loop with one clock
//! read per iteration, keep the sweep's rows and wrong-byte count, and finish (footer, JSON,
//! failure on any wrong byte).

use crate::options::{ByteArgs, Job};
use crate::report::{self, Row};
use std::time::{Duration, Instant};
use xccl::{Backend, Communicator, Result};

/// A communicator on the backend and with the timeout the options name (the rank count was
/// checked against the operation before anything started: `Command::check`).
pub fn connect(c: &Job) -> Result<Communicator> {
    let comm = Communicator::builder()
        .backend(c.backend.parse::<Backend>()?)
        .timeout(Duration::from_secs_f64(c.timeout))
        .build()?;
    report::set_hosts(comm.hosts().count());
    report::set_backend(comm.transport().caps().backend);
    Ok(comm)
}

/// This rank's part in a point-to-point test: ranks pair up 0↔1, 2↔3, ...; the even one
/// initiates, and a last odd-out rank sits the sweep out.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    /// This rank starts each round trip.
    pub initiator: bool,
    /// The other rank of the pair.
    pub partner: usize,
    /// The partner exists.
    pub active: bool,
}

impl Pair {
    /// This rank's pair.
    pub fn of(comm: &Communicator) -> Self {
        let me = comm.rank();
        let initiator = me % 2 == 0;
        let partner = if initiator { me + 1 } else { me - 1 };
        Pair {
            initiator,
            partner,
            active: partner < comm.world_size(),
        }
    }
}

/// Runs `step` `warm + iters` times and returns the last `iters` durations in µs, divided by
/// `per` (2 for a round trip's one way). One clock read per step: each sample ends where the
/// next begins.
pub fn timed(
    warm: usize,
    iters: usize,
    per: f64,
    mut step: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(iters);
    let mut last = Instant::now();
    for i in 0..warm + iters {
        step()?;
        let now = Instant::now();
        if i >= warm {
            times.push((now - last).as_secs_f64() * 1e6 / per);
        }
        last = now;
    }
    Ok(times)
}

/// The table of one sweep: its rows and the wrong bytes its checks found on this rank.
pub struct Table<'o> {
    c: &'o ByteArgs,
    rank: usize,
    rows: Vec<Row>,
    wrong: u64,
}

impl<'o> Table<'o> {
    /// Prints the header of `op` (with the streaming column for point-to-point tests, and
    /// `notes`) on rank 0.
    pub fn start(
        c: &'o ByteArgs,
        comm: &Communicator,
        op: &str,
        stream: bool,
        notes: &[&str],
    ) -> Self {
        if comm.rank() == 0 {
            report::out(report::header(op, &c.backend, comm.world_size()));
            report::out(report::columns(stream, c.baseline));
            for note in notes {
                report::out(format_args!("#  {note}"));
            }
        }
        Table {
            c,
            rank: comm.rank(),
            rows: Vec::new(),
            wrong: 0,
        }
    }

    /// Counts `wrong` bytes found by a check.
    pub fn count_wrong(&mut self, wrong: Option<u64>) {
        self.wrong += wrong.unwrap_or(0);
    }

    /// Keeps `row`, printing its line on rank 0; its `count` and `type` are in `-d` elements.
    pub fn row(&mut self, mut row: Row) {
        let (name, size) = self.c.element();
        row.dtype = name;
        row.count = Some(row.bytes / size);
        report::emit(self.rank, &mut self.rows, row);
    }

    /// Collective: once every rank is done, prints the footer and writes the JSON on rank 0;
    /// fails on any wrong byte.
    pub fn finish(self, comm: &Communicator) -> Result<()> {
        comm.barrier()?;
        report::finish(self.rank, self.c, &self.rows, self.wrong)
    }
}
