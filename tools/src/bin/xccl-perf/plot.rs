//! `xccl-perf plot`: draws `--json` files as an SVG picture: for size sweeps, latency and
//! bandwidth against size (log scales, one line per file); for MoE sweeps, each phase's time
//! against tokens per rank.

use crate::options::PlotArgs;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

type Failure = Box<dyn std::error::Error>;

/// One drawn line: its legend, colour and points.
type Line = (String, RGBColor, Vec<(f64, f64)>);

/// One file's points.
struct Series {
    name: String,
    /// (bytes, median µs, GB/s) of size-sweep rows.
    sweep: Vec<(f64, f64, f64)>,
    /// (tokens, dispatch µs, combine µs) of MoE rows.
    moe: Vec<MoePoint>,
}

/// Tokens, dispatch µs, combine µs.
type MoePoint = (f64, f64, f64);

/// A number field of a row, checked.
fn number(row: &serde_json::Value, key: &str, file: &Path, i: usize) -> Result<f64, Failure> {
    row.get(key)
        .and_then(|v| v.as_f64())
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("{}: row {i} has no positive number {key:?}", file.display()).into())
}

/// Reads one `--json` file of xccl-perf: its size sweep, and its MoE rows as one series per
/// mode and dispatch it holds (named after the file, and the variant when there are several).
fn read(file: &Path) -> Result<Vec<Series>, Failure> {
    let text = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a JSON array of rows ({e})", file.display()))?;
    let name = file.file_stem().map_or_else(
        || file.display().to_string(),
        |s| s.to_string_lossy().into(),
    );
    let mut sweep = Vec::new();
    // (variant, points), in the order the variants first appear.
    let mut moe: Vec<(String, Vec<MoePoint>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.get("tokens").is_some() {
            let field = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let variant = match field("dispatch") {
                "zero-copy" => format!("{} zero-copy", field("mode")),
                _ => field("mode").to_string(),
            };
            let point = (
                number(r, "tokens", file, i)?,
                number(r, "dispatch_us_p50", file, i)?,
                number(r, "combine_us_p50", file, i)?,
            );
            match moe.iter_mut().find(|(v, _)| *v == variant) {
                Some((_, points)) => points.push(point),
                None => moe.push((variant, vec![point])),
            }
        } else {
            let bw = r.get("put_bw_gbps").map_or("busbw_gbps", |_| "put_bw_gbps");
            // A size of 0 cannot sit on a log scale.
            if r.get("bytes").and_then(|b| b.as_u64()) == Some(0) {
                continue;
            }
            sweep.push((
                number(r, "bytes", file, i)?,
                number(r, "time_us_p50", file, i)?,
                r.get(bw).and_then(|v| v.as_f64()).unwrap_or(0.0),
            ));
        }
    }
    if sweep.is_empty() && moe.is_empty() {
        return Err(format!("{}: no rows to draw", file.display()).into());
    }
    let mut series = Vec::new();
    if !sweep.is_empty() {
        series.push(Series {
            name: name.clone(),
            sweep,
            moe: Vec::new(),
        });
    }
    let several = moe.len() > 1;
    for (variant, points) in moe {
        series.push(Series {
            name: match several {
                true => format!("{name} {variant}"),
                false => name.clone(),
            },
            sweep: Vec::new(),
            moe: points,
        });
    }
    Ok(series)
}

/// The smallest and largest of `v`, widened a little for a log axis.
fn span(v: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = v
        .filter(|x| *x > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if lo > hi {
        return 1.0..10.0;
    }
    lo / 1.5..hi * 1.5
}

/// An axis value in decimal units, as the log axis puts its marks at powers of ten: 10,
/// 100, 1k, 10k, 1M.
fn size_label(v: &f64) -> String {
    let v = *v;
    match v {
        _ if v >= 1e9 => format!("{}G", v / 1e9),
        _ if v >= 1e6 => format!("{}M", v / 1e6),
        _ if v >= 1e3 => format!("{}k", v / 1e3),
        _ => format!("{v}"),
    }
}

/// One log-scaled panel of `lines` (name, colour, points) with its labels.
fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    (caption, x_desc, y_desc): (&str, &str, &str),
    log_y: bool,
    lines: &[Line],
) -> Result<(), Failure> {
    let xs = span(lines.iter().flat_map(|l| l.2.iter().map(|p| p.0)));
    let ys = span(lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)));
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&size_label)
                .draw()?;
            for (name, colour, points) in lines {
                let colour = *colour;
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        colour.stroke_width(2),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if log_y {
        draw!(builder.build_cartesian_2d(xs.log_scale(), ys.log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d(xs.log_scale(), 0.0..ys.end)?);
    }
    Ok(())
}

/// Writes the picture `a.output` of `a.files`.
pub fn run(a: &PlotArgs) -> Result<(), Failure> {
    if a.output.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(format!(
            "{}: pictures are written as SVG; name the output FILE.svg",
            a.output.display()
        )
        .into());
    }
    let series: Vec<Series> = a
        .files
        .iter()
        .map(|f| read(f))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let colour = |i: usize| {
        let c = Palette99::pick(i).to_rgba();
        RGBColor(c.0, c.1, c.2)
    };
    let sweeps: Vec<(usize, &Series)> = series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.sweep.is_empty())
        .collect();
    let moes: Vec<(usize, &Series)> = series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.moe.is_empty())
        .collect();
    let rows = usize::from(!sweeps.is_empty()) + usize::from(!moes.is_empty());
    let root = SVGBackend::new(&a.output, (1200, 460 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = a.title.clone().unwrap_or_else(|| {
        let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
        format!("xccl-perf: {}", names.join(", "))
    });
    let root = root.titled(&title, ("sans-serif", 22))?;
    let bands = root.split_evenly((rows, 1));
    let mut band = bands.iter();
    if !sweeps.is_empty() {
        let halves = band.next().expect("a band per kind").split_evenly((1, 2));
        let pick = |f: fn(&(f64, f64, f64)) -> (f64, f64)| {
            sweeps
                .iter()
                .map(|(i, s)| (s.name.clone(), colour(*i), s.sweep.iter().map(f).collect()))
                .collect::<Vec<_>>()
        };
        let latency = pick(|p| (p.0, p.1));
        let bandwidth = pick(|p| (p.0, p.2));
        panel(
            &halves[0],
            ("latency (median)", "bytes", "time (us)"),
            true,
            &latency,
        )?;
        panel(
            &halves[1],
            ("bandwidth", "bytes", "GB/s"),
            false,
            &bandwidth,
        )?;
    }
    if !moes.is_empty() {
        let area = band.next().expect("a band per kind");
        let mut lines = Vec::new();
        for (i, s) in &moes {
            let (d, c) = (colour(2 * i), colour(2 * i + 1));
            lines.push((
                format!("{} dispatch", s.name),
                d,
                s.moe.iter().map(|p| (p.0, p.1)).collect(),
            ));
            lines.push((
                format!("{} combine", s.name),
                c,
                s.moe.iter().map(|p| (p.0, p.2)).collect(),
            ));
        }
        panel(
            area,
            (
                "MoE phase time (median, slowest rank)",
                "tokens per rank",
                "time (us)",
            ),
            true,
            &lines,
        )?;
    }
    root.present()?;
    Ok(())
}
