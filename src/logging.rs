//! Opt-in log output for applications (feature `log`): xccl's `tracing` events on stderr,
//! filtered by `XCCL_DEBUG`, each line starting with the rank that wrote it.

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The filter used when `XCCL_DEBUG` is unset: warnings and errors only.
pub const DEFAULT_FILTER: &str = "warn";

/// Installs a global subscriber that prints xccl's (and the application's) `tracing` events
/// on stderr, filtered by `XCCL_DEBUG` (`info`, `debug`, `trace`, or per target:
/// `xccl=debug,warn`; [`DEFAULT_FILTER`] when unset), each line starting with `[rank R]`, the
/// rank the launcher gave this process (`xccl-run`, `mpirun`, `srun`, `torchrun`).
///
/// Returns `false`, changing nothing, when the program already installed a subscriber of
/// its own (which then receives xccl's events instead). A filter that does not parse is
/// reported once on stderr and the default is used.
///
/// ```no_run
/// xccl::logging::init();                      // XCCL_DEBUG=debug shows setup steps
/// let comm = xccl::Communicator::from_env()?; // "[rank 1] ... DEBUG xccl::...: ..."
/// # Ok::<(), xccl::Error>(())
/// ```
pub fn init() -> bool {
    let label = match crate::bootstrap::detect(None) {
        Ok(info) => format!("[rank {}] ", info.rank),
        Err(_) => "[rank ?] ".to_string(),
    };
    init_labelled(&label)
}

/// [`init`] with `label` in place of the rank (for a launcher, which has none).
pub fn init_labelled(label: &str) -> bool {
    let spec = std::env::var("XCCL_DEBUG").unwrap_or_else(|_| DEFAULT_FILTER.into());
    let filter = parse_filter(&spec).unwrap_or_else(|e| {
        eprintln!("{label}XCCL_DEBUG={spec:?} is not a log filter ({e}); using {DEFAULT_FILTER:?}");
        DEFAULT_FILTER.parse().expect("the default filter parses")
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(Labelled {
            label: label.to_string(),
            inner: Format::default(),
        });
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .is_ok()
}

/// Parses an `XCCL_DEBUG` filter: a level, or comma-separated `target=level` and a default.
pub fn parse_filter(spec: &str) -> Result<Targets, String> {
    spec.trim().parse::<Targets>().map_err(|e| e.to_string())
}

/// The default line format after a fixed label.
struct Labelled<F> {
    label: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Labelled<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(&self.label)?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_filter;

    #[test]
    fn filters_parse_as_levels_or_per_target() {
        assert!(parse_filter("debug").is_ok());
        assert!(parse_filter("xccl=debug,warn").is_ok());
        assert!(parse_filter(" info ").is_ok());
        assert!(parse_filter("xccl=loud").is_err());
    }
}
