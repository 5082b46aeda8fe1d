//! `strata report RUN_DIR... -o REPORT.md`: a Markdown report over finished runs, its figures in
//! the folder beside it named after it (`REPORT/`). Runs are
//! grouped by config name (seeds of one config form a group); the report has a table per run,
//! one per group with the spread over seeds and the difference to a baseline group, SVG plots
//! (validation loss against tokens and wall time, training loss, per-layer RMS of activations and
//! gradients, AttnRes weight heat maps) and, optionally, benchmark JSONL files as tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use strata::config::ExperimentConfig;
use strata::io::atomic_write;
use strata::train::TrainSummary;

#[derive(clap::Args)]
pub struct Args {
    /// Run directories, or folders holding run directories.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The Markdown file to write; figures go into the folder of the same name beside it.
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long, default_value = "Experiment report")]
    title: String,
    /// Markdown placed under the title (the discussion of the results).
    #[arg(long)]
    notes: Option<PathBuf>,
    /// The group the others are compared with; default: the first group.
    #[arg(long)]
    baseline: Option<String>,
    /// Benchmark results (JSON lines) to include as tables.
    #[arg(long)]
    bench: Vec<PathBuf>,
}

/// One finished run, read back from its directory.
struct Run {
    dir: PathBuf,
    config: ExperimentConfig,
    summary: TrainSummary,
    /// metrics.csv columns by name.
    metrics: BTreeMap<String, Vec<f64>>,
    /// depth.csv columns by name (empty for runs from before depth profiles).
    depth: BTreeMap<String, Vec<f64>>,
    /// depth_weights.csv as (layer, source, weight).
    weights: Vec<(usize, usize, f64)>,
}

pub fn run(args: Args) -> Result<()> {
    if args.out.extension().is_none_or(|e| e != "md") {
        bail!(
            "-o {}: expected a Markdown file path ending in .md",
            args.out.display()
        );
    }
    let mut dirs = Vec::new();
    for path in &args.runs {
        if path.join("summary.json").exists() {
            dirs.push(path.clone());
        } else {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("summary.json").exists())
                .collect();
            inside.sort();
            if inside.is_empty() {
                bail!(
                    "{}: neither a finished run (no summary.json) nor a folder of runs",
                    path.display()
                );
            }
            dirs.extend(inside);
        }
    }
    let runs = dirs
        .iter()
        .map(|d| read_run(d).with_context(|| format!("reading run {}", d.display())))
        .collect::<Result<Vec<_>>>()?;

    let mut groups: Vec<(String, Vec<&Run>)> = Vec::new();
    for run in &runs {
        match groups
            .iter_mut()
            .find(|(name, _)| *name == run.summary.name)
        {
            Some((_, members)) => members.push(run),
            None => groups.push((run.summary.name.clone(), vec![run])),
        }
    }
    let baseline = match &args.baseline {
        Some(name) => groups
            .iter()
            .position(|(g, _)| g == name)
            .with_context(|| format!("--baseline {name}: no run has that name"))?,
        None => 0,
    };

    let figures = args.out.with_extension("");
    std::fs::create_dir_all(&figures).with_context(|| format!("creating {}", figures.display()))?;
    let figures_link = figures
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    // The baseline first, then the others in the order their runs were given.
    let base = groups.remove(baseline);
    groups.insert(0, base);
    let mut md = format!("# {}\n\n", args.title);
    if let Some(notes) = &args.notes {
        md += &std::fs::read_to_string(notes)
            .with_context(|| format!("reading {}", notes.display()))?;
        md += "\n\n";
    }
    md += &group_table(&groups, 0);
    md += &run_table(&runs);
    for bench in &args.bench {
        md += &bench_table(bench)?;
    }
    md += &plots(&figures, &figures_link, &groups)?;
    md += &provenance(&args);
    atomic_write(&args.out, |f| f.write_all(md.as_bytes()))?;
    println!("wrote {} and {}/", args.out.display(), figures.display());
    Ok(())
}

fn read_run(dir: &Path) -> Result<Run> {
    let summary: TrainSummary =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    let config = ExperimentConfig::load(&dir.join("config.toml"), &[])?;
    let metrics = read_csv(&dir.join("metrics.csv"))?;
    // The columns the figures plot.
    for column in [
        "tokens",
        "elapsed_sec",
        "lr",
        "train_loss",
        "val_loss",
        "grad_norm",
    ] {
        if !metrics.contains_key(column) {
            bail!("{}: no column {column}", dir.join("metrics.csv").display());
        }
    }
    let depth = if dir.join("depth.csv").exists() {
        read_csv(&dir.join("depth.csv"))?
    } else {
        BTreeMap::new()
    };
    let weights = if dir.join("depth_weights.csv").exists() {
        let table = read_csv(&dir.join("depth_weights.csv"))?;
        let col = |k: &str| table.get(k).cloned().unwrap_or_default();
        let (layers, sources, weights) = (col("layer"), col("source"), col("weight"));
        (0..layers.len())
            .map(|i| (layers[i] as usize, sources[i] as usize, weights[i]))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Run {
        dir: dir.to_owned(),
        config,
        summary,
        metrics,
        depth,
        weights,
    })
}

/// Numeric columns of a CSV with a header; empty or non-numeric cells read as NaN.
fn read_csv(path: &Path) -> Result<BTreeMap<String, Vec<f64>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .with_context(|| format!("{}: empty file", path.display()))?
        .split(',')
        .map(str::to_owned)
        .collect();
    let mut columns: BTreeMap<String, Vec<f64>> =
        header.iter().map(|h| (h.clone(), Vec::new())).collect();
    for line in lines {
        for (name, cell) in header.iter().zip(line.split(',')) {
            columns
                .get_mut(name)
                .expect("every header name has a column")
                .push(cell.trim().parse().unwrap_or(f64::NAN));
        }
    }
    Ok(columns)
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn group_table(groups: &[(String, Vec<&Run>)], baseline: usize) -> String {
    let losses = |runs: &[&Run]| runs.iter().map(|r| r.summary.val_loss).collect::<Vec<_>>();
    let (base_mean, base_std) = mean_std(&losses(&groups[baseline].1));
    let base_n = groups[baseline].1.len();
    let mut md = format!(
        "## Results by configuration\n\nFinal validation loss (nats per token) over the runs of \
         each configuration (seeds), mean ± sample standard deviation. Δ is the difference to \
         `{}`; a difference counts as real only where it exceeds twice the larger of the two \
         standard deviations (groups of one run borrow the other group's). Tokens/s are as measured \
         during the runs, on whatever else the machine was running then.\n\n\
         | configuration | runs | tokens | val loss | Δ vs baseline | beyond 2σ | bits/byte | tokens/s |\n\
         |---|---|---|---|---|---|---|---|\n",
        groups[baseline].0
    );
    for (i, (name, runs)) in groups.iter().enumerate() {
        let (mean, std) = mean_std(&losses(runs));
        let bpb = mean_std(
            &runs
                .iter()
                .map(|r| r.summary.val_bits_per_byte)
                .collect::<Vec<_>>(),
        )
        .0;
        let speed = mean_std(
            &runs
                .iter()
                .map(|r| r.summary.tokens_per_sec)
                .collect::<Vec<_>>(),
        )
        .0;
        let tokens = runs[0].summary.tokens as f64 / 1e6;
        let (delta, verdict) = if i == baseline {
            ("—".to_owned(), "—".to_owned())
        } else {
            let sigma = match (runs.len() > 1, base_n > 1) {
                (true, true) => std.max(base_std),
                (true, false) => std,
                (false, true) => base_std,
                (false, false) => f64::NAN,
            };
            let d = mean - base_mean;
            let verdict = if sigma.is_nan() {
                "no spread (1 run each)".to_owned()
            } else if d.abs() > 2.0 * sigma {
                if d < 0.0 {
                    "yes: lower".into()
                } else {
                    "yes: higher".into()
                }
            } else {
                format!("no (2σ = {:.4})", 2.0 * sigma)
            };
            (format!("{d:+.4}"), verdict)
        };
        let spread = if runs.len() > 1 {
            format!(" ± {std:.4}")
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {tokens:.1}M | {mean:.4}{spread} | {delta} | {verdict} | {bpb:.4} | {speed:.0} |",
            runs.len()
        );
    }
    md + "\n"
}

fn run_table(runs: &[Run]) -> String {
    let mut md = String::from(
        "## Runs\n\n| run | configuration | seed | residual | attention | parameters | steps | tokens | \
         final train loss | val loss | bits/byte | tokens/s as run | wall (s) | backend |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let s = &r.summary;
        let m = &r.config.model;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:?} | {:?} | {:.2}M | {} | {:.2}M | {:.4} | {:.4} | {:.4} | {:.0} | {:.0} | {} |",
            r.dir.file_name().unwrap_or_default().to_string_lossy(),
            s.name,
            r.config.train.seed,
            m.residual,
            m.attention,
            s.params as f64 / 1e6,
            s.steps,
            s.tokens as f64 / 1e6,
            s.final_train_loss,
            s.val_loss,
            s.val_bits_per_byte,
            s.tokens_per_sec,
            s.wall_secs,
            s.backend
        );
    }
    md + "\n"
}

/// A JSON-lines benchmark file as a table: one column per key that varies between rows; keys
/// that several rows share with one value are listed above the table.
fn bench_table(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<serde_json::Map<String, serde_json::Value>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).with_context(|| format!("{}: not JSON: {l}", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut keys: Vec<String> = Vec::new();
    for row in &rows {
        for k in row.keys() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let cell = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::Number(n)) => number(n.as_f64().unwrap_or(f64::NAN)),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_f64().map(number).unwrap_or_else(|| i.to_string()))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let (common, varying): (Vec<String>, Vec<String>) = keys.into_iter().partition(|k| {
        let first = rows.iter().find_map(|r| r.get(k));
        let present = rows.iter().filter(|r| r.contains_key(k.as_str())).count();
        present > 1
            && rows
                .iter()
                .all(|r| r.get(k).is_none_or(|v| Some(v) == first))
    });
    let mut md = format!(
        "## Benchmark: {}\n\n",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    for k in &common {
        let value = rows.iter().find_map(|r| r.get(k));
        let _ = writeln!(md, "- {k}: {}", cell(value));
    }
    let _ = write!(
        md,
        "\n| {} |\n|{}\n",
        varying.join(" | "),
        "---|".repeat(varying.len())
    );
    for row in &rows {
        let cells: Vec<String> = varying.iter().map(|k| cell(row.get(k))).collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
    Ok(md + "\n")
}

/// Very large values in scientific notation, large ones as integers, small ones to 4 decimals.
fn number(v: f64) -> String {
    if v.abs() >= 1e8 {
        format!("{v:.3e}")
    } else if v.abs() >= 1e4 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{:.4}", v)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

type Series = (String, RGBColor, Vec<(f64, f64)>);

fn plots(out: &Path, link: &str, groups: &[(String, Vec<&Run>)]) -> Result<String> {
    let mut md = String::from("## Figures\n\n");
    let per_run = |x: &str, y: &str, x_scale: f64| -> Vec<Series> {
        let mut series = Vec::new();
        for (g, (name, runs)) in groups.iter().enumerate() {
            for run in runs {
                let (xs, ys) = (&run.metrics[x], &run.metrics[y]);
                let points: Vec<(f64, f64)> = xs
                    .iter()
                    .zip(ys)
                    .filter(|(a, b)| a.is_finite() && b.is_finite())
                    .map(|(a, b)| (a * x_scale, *b))
                    .collect();
                series.push((name.clone(), PALETTE[g % PALETTE.len()], points));
            }
        }
        series
    };
    let figures = [
        (
            "val_loss_tokens.svg",
            "Validation loss against tokens",
            "tokens seen (millions)",
            "validation loss (nats/token)",
            per_run("tokens", "val_loss", 1e-6),
            false,
        ),
        (
            "val_loss_time.svg",
            "Validation loss against wall time",
            "wall time (s)",
            "validation loss (nats/token)",
            per_run("elapsed_sec", "val_loss", 1.0),
            false,
        ),
        (
            "train_loss.svg",
            "Training loss",
            "tokens seen (millions)",
            "training loss (nats/token)",
            per_run("tokens", "train_loss", 1e-6),
            false,
        ),
        (
            "grad_norm.svg",
            "Gradient norm (before clipping)",
            "tokens seen (millions)",
            "global gradient L2 norm",
            per_run("tokens", "grad_norm", 1e-6),
            true,
        ),
        (
            "learning_rate.svg",
            "Learning rate",
            "tokens seen (millions)",
            "learning rate",
            per_run("tokens", "lr", 1e-6),
            false,
        ),
    ];
    for (file, title, x, y, series, log_y) in figures {
        line_plot(&out.join(file), title, x, y, &series, log_y)?;
        let _ = writeln!(md, "![{title}]({link}/{file})\n");
    }

    // Per-layer RMS, averaged over each group's runs.
    for (column, file, title, y) in [
        (
            "input_rms",
            "depth_input_rms.svg",
            "RMS of each sub-layer's input h_l (validation tokens)",
            "RMS of h_l",
        ),
        (
            "output_rms",
            "depth_output_rms.svg",
            "RMS of each sub-layer's output f_l(h_l)",
            "RMS of f_l(h_l)",
        ),
        (
            "grad_rms",
            "depth_grad_rms.svg",
            "RMS of each sub-layer's parameter gradient (last step)",
            "gradient RMS",
        ),
    ] {
        let series: Vec<Series> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (name, runs))| {
                let columns: Vec<&Vec<f64>> =
                    runs.iter().filter_map(|r| r.depth.get(column)).collect();
                let layers = columns.first()?.len();
                let points = (0..layers)
                    .map(|l| {
                        let values: Vec<f64> = columns
                            .iter()
                            .map(|c| c[l])
                            .filter(|v| v.is_finite())
                            .collect();
                        (l as f64, mean_std(&values).0)
                    })
                    .filter(|(_, v)| v.is_finite() && *v > 0.0)
                    .collect();
                Some((name.clone(), PALETTE[g % PALETTE.len()], points))
            })
            .collect();
        if series.iter().any(|(_, _, p)| !p.is_empty()) {
            line_plot(
                &out.join(file),
                title,
                "sub-layer (attention 2i, MLP 2i+1; last: final read)",
                y,
                &series,
                true,
            )?;
            let _ = writeln!(md, "![{title}]({link}/{file})\n");
        }
    }

    for (name, runs) in groups {
        if runs.iter().all(|r| r.weights.is_empty()) {
            continue;
        }
        let file = format!(
            "depth_weights_{}.svg",
            name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        );
        let title = format!("{name}: mean AttnRes weight of each source (rows: reading sub-layer)");
        heat_map(&out.join(&file), &title, runs)?;
        let _ = writeln!(md, "![{title}]({link}/{file})\n");
    }
    Ok(md)
}

fn line_plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let points = series.iter().flat_map(|(_, _, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Ok(());
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1e-3;
    }
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80);
    let style = |s: &RGBColor| s.stroke_width(2);
    let mut legend: Vec<String> = Vec::new();
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .axis_desc_style(("sans-serif", 17))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(plot_error)?;
            for (name, color, pts) in series {
                let drawn = chart
                    .draw_series(LineSeries::new(pts.iter().copied(), style(color)))
                    .map_err(plot_error)?;
                // One legend entry per group, however many seeds it has.
                if !legend.contains(name) {
                    legend.push(name.clone());
                    let color = *color;
                    drawn.label(name.as_str()).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                    });
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(plot_error)?;
        }};
    }
    if log_y && y0 > 0.0 {
        draw!(
            builder
                .build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale())
                .map_err(plot_error)?
        );
    } else {
        let pad = (y1 - y0) * 0.05;
        draw!(
            builder
                .build_cartesian_2d(x0..x1, y0 - pad..y1 + pad)
                .map_err(plot_error)?
        );
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Rows: the reading sub-layer (bottom: the first; top: the final read); columns: its sources;
/// shade: the mean weight over the group's runs, white 0 to dark blue 1.
fn heat_map(path: &Path, title: &str, runs: &[&Run]) -> Result<()> {
    let mut sum: BTreeMap<(usize, usize), (f64, usize)> = BTreeMap::new();
    for run in runs {
        for &(layer, source, weight) in &run.weights {
            let entry = sum.entry((layer, source)).or_default();
            entry.0 += weight;
            entry.1 += 1;
        }
    }
    let layers = sum.keys().map(|k| k.0).max().unwrap_or(0) + 1;
    let sources = sum.keys().map(|k| k.1).max().unwrap_or(0) + 1;
    let cell = (26u32).min(700 / sources.max(1) as u32).max(12);
    let width = 140 + cell * sources as u32;
    let height = 110 + cell * layers as u32;
    let root = SVGBackend::new(path, (width.max(520), height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..sources, (0..layers).into_segmented())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("source (0: embedding; then blocks / sub-layer outputs; last: partial sum)")
        .y_desc("reading sub-layer (0: first attention; top: final read)")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(sum.iter().map(|(&(layer, source), &(total, n))| {
            let w = total / n as f64;
            let shade = |c: u8| (255.0 - w * (255.0 - f64::from(c))) as u8;
            Rectangle::new(
                [
                    (source, SegmentValue::Exact(layer)),
                    (source + 1, SegmentValue::Exact(layer + 1)),
                ],
                RGBColor(shade(8), shade(48), shade(107)).filled(),
            )
        }))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a figure: {e:?}")
}

fn provenance(args: &Args) -> String {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let command: Vec<String> = std::env::args().collect();
    format!(
        "## Provenance\n\n- generated by strata {} at commit {commit} with `{}`\n- runs: {}\n",
        env!("CARGO_PKG_VERSION"),
        command.join(" "),
        args.runs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}
