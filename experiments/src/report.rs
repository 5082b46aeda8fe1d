//! `strata report RUN_DIR... | SWEEP_DIR -o REPORT.md|DIR`: a Markdown report over finished runs, a
//! self-contained `REPORT.html` beside it, and its figures (PNG and SVG) in the folder of the same
//! name (`REPORT/`). Runs are grouped by config name (the seeds of one config form a group; a
//! sweep names its runs that way); the report has a table per run, one per group with the spread
//! over seeds and the difference to a baseline group, plots (validation loss against tokens and
//! wall time with the seed spread as a band, training loss, gradient norm, learning rate,
//! per-layer RMS of activations and gradients, AttnRes weight heat maps), benchmark results
//! (JSON lines or CSV; speed against sequence length on log axes), the configs and what differs
//! between them, and where and how it was made.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use strata::config::ExperimentConfig;
use strata::io::atomic_write;
use strata::train::TrainSummary;

#[derive(clap::Args)]
pub struct Args {
    /// Run directories, or folders holding run directories (a sweep's folder).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The Markdown file to write (or a folder: FOLDER/report.md); REPORT.html and the figures'
    /// folder REPORT/ go beside it.
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
    /// Benchmark results to include as tables (JSON lines, or CSV with `#` header lines); a CSV
    /// with a seq_len column is also plotted.
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
    // `-o REPORT.md`, or `-o DIR` for DIR/report.md.
    let args = match args.out.extension() {
        Some(e) if e == "md" => args,
        None => Args {
            out: args.out.join("report.md"),
            ..args
        },
        Some(_) => bail!(
            "-o {}: expected a Markdown file path ending in .md, or a folder",
            args.out.display()
        ),
    };
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
            // A sweep's runs in the order of its file (the first configuration is the baseline).
            let order = sweep_order(path);
            inside.sort_by_key(|p| {
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                order.iter().position(|n| *n == name).unwrap_or(usize::MAX)
            });
            if inside.is_empty() {
                bail!(
                    "{}: neither a finished run (no summary.json) nor a folder of runs",
                    path.display()
                );
            }
            dirs.extend(inside);
        }
    }
    if dirs.is_empty() {
        bail!("no finished runs given");
    }
    register_fonts()?;
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
    md += &plots(&figures, &figures_link, &groups)?;
    for bench in &args.bench {
        md += &bench_section(bench, &figures, &figures_link)?;
    }
    md += &config_section(&runs);
    md += &provenance(&args);
    atomic_write(&args.out, |f| f.write_all(md.as_bytes()))?;
    let html_path = args.out.with_extension("html");
    let html = to_html(&args.title, &md, &figures, &figures_link)?;
    atomic_write(&html_path, |f| f.write_all(html.as_bytes()))?;
    println!(
        "wrote {}, {} and {}/",
        args.out.display(),
        html_path.display(),
        figures.display()
    );
    Ok(())
}

/// The run names of a sweep folder's `sweep.json`, in the sweep's order; empty elsewhere.
fn sweep_order(folder: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(folder.join("sweep.json")) else {
        return Vec::new();
    };
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    manifest["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The PNG backend draws text with ab_glyph, from font bytes registered here.
fn register_fonts() -> Result<()> {
    for style in [FontStyle::Normal, FontStyle::Bold] {
        let bytes = match style {
            FontStyle::Bold => dejavu::sans::bold(),
            _ => dejavu::sans::regular(),
        };
        plotters::style::register_font("sans-serif", style, bytes)
            .map_err(|_| anyhow::anyhow!("the embedded DejaVu Sans font did not load"))?;
    }
    Ok(())
}

fn read_run(dir: &Path) -> Result<Run> {
    let summary: TrainSummary =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    let config = ExperimentConfig::load(&dir.join("config.toml"), &[])?;
    let metrics = read_csv(&dir.join("metrics.csv"))?;
    // The columns the figures plot.
    for column in [
        "step",
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
    let (header, rows) = csv_table(&text).with_context(|| path.display().to_string())?;
    let mut columns: BTreeMap<String, Vec<f64>> =
        header.iter().map(|h| (h.clone(), Vec::new())).collect();
    for row in rows {
        for (name, cell) in header.iter().zip(row) {
            columns
                .get_mut(name)
                .expect("every header name has a column")
                .push(cell.parse().unwrap_or(f64::NAN));
        }
    }
    Ok(columns)
}

/// A CSV's header and rows, cells as written; `#` lines and blank lines are skipped. A header
/// that names a column twice is an error (one name would hide the other).
fn csv_table(text: &str) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty());
    let header = split_csv_line(lines.next().context("empty file: no CSV header")?);
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = header.iter().find(|h| !seen.insert(h.as_str())) {
        bail!(
            "the CSV's header names column {dup:?} twice: {}",
            header.join(",")
        );
    }
    Ok((header, lines.map(split_csv_line).collect()))
}

/// [`csv_table`]'s rows as (column, cell) pairs.
pub fn csv_rows(text: &str) -> Result<Vec<Vec<(String, String)>>> {
    let (header, rows) = csv_table(text)?;
    Ok(rows
        .into_iter()
        .map(|row| header.iter().cloned().zip(row).collect())
        .collect())
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
        "## Runs\n\nPeak host memory is the training process's peak resident memory (on CPU \
         backends, the model's device). Peak device memory (CUDA backends) is the GPU's memory in \
         use above its level when the run started, sampled every 100 ms.\n\n\
         | run | configuration | seed | parameters | steps | tokens | final train loss | \
         val loss | perplexity | bits/byte | tokens/s as run | wall (s) | peak host memory (MiB) | \
         peak device memory (MiB) | backend | machine |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let s = &r.summary;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2}M | {} | {:.2}M | {:.4} | {:.4} | {:.2} | {:.4} | {:.0} | {:.0} | {} | {} | {} | {} |",
            r.dir.file_name().unwrap_or_default().to_string_lossy(),
            s.name,
            r.config.train.seed,
            s.params as f64 / 1e6,
            s.steps,
            s.tokens as f64 / 1e6,
            s.final_train_loss,
            s.val_loss,
            s.val_perplexity,
            s.val_bits_per_byte,
            s.tokens_per_sec,
            s.wall_secs,
            s.peak_host_mib
                .map_or("—".to_owned(), |m| format!("{m:.0}")),
            s.peak_device_mib
                .map_or("—".to_owned(), |m| format!("{m:.0}")),
            s.backend,
            if s.machine.is_empty() {
                "—"
            } else {
                &s.machine
            },
        );
    }
    md + "\n"
}

/// One CSV line split at commas outside double quotes (`""` inside quotes is a quote).
fn split_csv_line(line: &str) -> Vec<String> {
    let (mut cells, mut cell, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => cells.push(std::mem::take(&mut cell).trim().to_owned()),
            c => cell.push(c),
        }
    }
    cells.push(cell.trim().to_owned());
    cells
}

type Row = serde_json::Map<String, serde_json::Value>;

/// Benchmark rows from JSON lines, or from a CSV (numbers where a cell parses as one) whose
/// `#` lines describe the machine and are returned as notes.
fn read_bench(path: &Path) -> Result<(Vec<String>, Vec<Row>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "csv") {
        let notes = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .map(|l| l.trim().to_owned())
            .collect();
        let rows = csv_rows(&text)
            .with_context(|| path.display().to_string())?
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|(k, v)| {
                        let value = match v.parse::<f64>() {
                            Ok(x) => serde_json::Number::from_f64(x)
                                .map_or(serde_json::Value::Null, serde_json::Value::Number),
                            Err(_) => serde_json::Value::String(v),
                        };
                        (k, value)
                    })
                    .collect()
            })
            .collect();
        return Ok((notes, rows));
    }
    let rows = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).with_context(|| format!("{}: not JSON: {l}", path.display()))
        })
        .collect::<Result<_>>()?;
    Ok((Vec::new(), rows))
}

/// A benchmark file as a table: one column per key that varies between rows; keys that every
/// row shares with one value are listed above it. With a `seq_len` column, each `ms_*` column is
/// also plotted against it on log axes, one line per value of the remaining text columns.
fn bench_section(path: &Path, figures: &Path, link: &str) -> Result<String> {
    let (notes, rows) = read_bench(path)?;
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
        Some(serde_json::Value::Null) => "—".into(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_f64().map(number).unwrap_or_else(|| i.to_string()))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let (common, varying): (Vec<String>, Vec<String>) = keys.iter().cloned().partition(|k| {
        let first = rows.iter().find_map(|r| r.get(k));
        let present = rows.iter().filter(|r| r.contains_key(k.as_str())).count();
        present > 1
            && rows
                .iter()
                .all(|r| r.get(k).is_none_or(|v| Some(v) == first))
    });
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut md = format!("## Benchmark: {file_name}\n\n");
    for note in &notes {
        let _ = writeln!(md, "- {note}");
    }
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
    md.push('\n');

    if !varying.iter().any(|k| k == "seq_len") {
        return Ok(md);
    }
    let labels: Vec<&String> = varying
        .iter()
        .filter(|k| {
            rows.iter()
                .any(|r| matches!(r.get(*k), Some(serde_json::Value::String(_))))
        })
        .collect();
    let stem = file_name
        .trim_end_matches(".csv")
        .trim_end_matches(".jsonl");
    for metric in varying.iter().filter(|k| k.starts_with("ms_")) {
        let mut series: Vec<Series> = Vec::new();
        for row in &rows {
            let label = labels
                .iter()
                .map(|k| cell(row.get(*k)))
                .collect::<Vec<_>>()
                .join(" ");
            let x = row.get("seq_len").and_then(|v| v.as_f64());
            let y = row.get(metric).and_then(|v| v.as_f64());
            let (Some(x), Some(y)) = (x, y) else { continue };
            if !(x > 0.0 && y > 0.0) {
                continue;
            }
            match series.iter_mut().find(|s| s.name == label) {
                Some(s) => s.points.push((x, y)),
                None => {
                    let color = PALETTE[series.len() % PALETTE.len()];
                    series.push(Series::line(label, color, vec![(x, y)]));
                }
            }
        }
        let file = format!("bench_{stem}_{metric}");
        let title = format!("{stem}: {metric} against sequence length");
        let drawn = line_plot(
            &figures.join(&file),
            &title,
            "sequence length (tokens, log scale)",
            &format!("{metric} (milliseconds, log scale)"),
            &series,
            (true, true),
        )?;
        if drawn {
            let _ = writeln!(md, "![{title}]({link}/{file}.png)\n");
        }
    }
    Ok(md)
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

/// One line of a plot; `band` (x, low, high) is shaded under it where a group has several seeds.
struct Series {
    name: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
    band: Vec<(f64, f64, f64)>,
    /// Drawn dashed (validation beside training in one figure).
    dashed: bool,
}

impl Series {
    fn line(name: String, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Self {
            name,
            color,
            points,
            band: Vec::new(),
            dashed: false,
        }
    }
}

/// A group's runs as one series: the mean over seeds at each logged row, with mean ± one sample
/// standard deviation as the band. The runs of a group share their logging schedule, so the
/// n-th finite point of each run is the same step.
fn group_series(
    name: &str,
    color: RGBColor,
    runs: &[&Run],
    x: &str,
    y: &str,
    x_scale: f64,
) -> Series {
    let per_run: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|run| {
            run.metrics[x]
                .iter()
                .zip(&run.metrics[y])
                .filter(|(a, b)| a.is_finite() && b.is_finite())
                .map(|(a, b)| (a * x_scale, *b))
                .collect()
        })
        .collect();
    let len = per_run.iter().map(Vec::len).min().unwrap_or(0);
    let mut series = Series::line(
        if runs.len() > 1 {
            format!("{name} ({} seeds, ±1 sd)", runs.len())
        } else {
            name.to_owned()
        },
        color,
        Vec::new(),
    );
    for i in 0..len {
        let xs: Vec<f64> = per_run.iter().map(|p| p[i].0).collect();
        let ys: Vec<f64> = per_run.iter().map(|p| p[i].1).collect();
        let (x, (y, sd)) = (mean_std(&xs).0, mean_std(&ys));
        series.points.push((x, y));
        if runs.len() > 1 {
            series.band.push((x, y - sd, y + sd));
        }
    }
    series
}

/// Group names for legends: without the prefix they all share (a sweep's name), cut at a `-`.
fn legend_names(groups: &[(String, Vec<&Run>)]) -> Vec<String> {
    let names: Vec<&str> = groups.iter().map(|(n, _)| n.as_str()).collect();
    if names.len() < 2 {
        return names.iter().map(|n| n.to_string()).collect();
    }
    let mut common = names[0].len();
    for n in &names[1..] {
        let shared = names[0]
            .bytes()
            .zip(n.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        common = common.min(shared);
    }
    let cut = names[0][..common].rfind('-').map_or(0, |i| i + 1);
    names
        .iter()
        .map(|n| {
            if n.len() > cut {
                n[cut..].to_owned()
            } else {
                n.to_string()
            }
        })
        .collect()
}

fn plots(out: &Path, link: &str, groups: &[(String, Vec<&Run>)]) -> Result<String> {
    let mut md = String::from(
        "## Figures\n\nEach configuration's line is the mean over its runs; where it has several \
         seeds, the band is the mean ± one sample standard deviation. Every figure is in the \
         report's folder as PNG and SVG.\n\n",
    );
    let names = legend_names(groups);
    let per_group = |x: &str, y: &str, x_scale: f64| -> Vec<Series> {
        groups
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(g, ((_, runs), name))| {
                group_series(name, PALETTE[g % PALETTE.len()], runs, x, y, x_scale)
            })
            .collect()
    };
    let figures = [
        (
            "loss_steps",
            "Training and validation loss against step",
            "optimizer step",
            "loss (nats/token)",
            per_group("step", "train_loss", 1.0)
                .into_iter()
                .map(|s| Series {
                    name: format!("{} train", s.name),
                    ..s
                })
                // Validation: the same colour, dashed.
                .chain(
                    per_group("step", "val_loss", 1.0)
                        .into_iter()
                        .map(|s| Series {
                            name: format!("{} validation", s.name),
                            dashed: true,
                            ..s
                        }),
                )
                .collect(),
            false,
        ),
        (
            "val_loss_tokens",
            "Validation loss against tokens",
            "tokens seen (millions)",
            "validation loss (nats/token)",
            per_group("tokens", "val_loss", 1e-6),
            false,
        ),
        (
            "val_loss_time",
            "Validation loss against wall time",
            "wall time (s)",
            "validation loss (nats/token)",
            per_group("elapsed_sec", "val_loss", 1.0),
            false,
        ),
        (
            "train_loss",
            "Training loss",
            "tokens seen (millions)",
            "training loss (nats/token)",
            per_group("tokens", "train_loss", 1e-6),
            false,
        ),
        (
            "throughput",
            "Training throughput",
            "tokens seen (millions)",
            "tokens per second",
            per_group("tokens", "tokens_per_sec", 1e-6),
            false,
        ),
        (
            "grad_norm",
            "Gradient norm (before clipping)",
            "tokens seen (millions)",
            "global gradient L2 norm (log scale)",
            per_group("tokens", "grad_norm", 1e-6),
            true,
        ),
        (
            "learning_rate",
            "Learning rate",
            "tokens seen (millions)",
            "learning rate",
            per_group("tokens", "lr", 1e-6),
            false,
        ),
    ];
    for (file, title, x, y, series, log_y) in figures {
        if line_plot(&out.join(file), title, x, y, &series, (false, log_y))? {
            let _ = writeln!(md, "![{title}]({link}/{file}.png)\n");
        }
    }

    // Per-layer RMS, averaged over each group's runs.
    for (column, file, title, y) in [
        (
            "input_rms",
            "depth_input_rms",
            "RMS of each sub-layer's input h_l (validation tokens)",
            "RMS of h_l (log scale)",
        ),
        (
            "output_rms",
            "depth_output_rms",
            "RMS of each sub-layer's output f_l(h_l)",
            "RMS of f_l(h_l) (log scale)",
        ),
        (
            "grad_rms",
            "depth_grad_rms",
            "RMS of each sub-layer's parameter gradient (last step)",
            "gradient RMS (log scale)",
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
                Some(Series::line(
                    name.clone(),
                    PALETTE[g % PALETTE.len()],
                    points,
                ))
            })
            .collect();
        let drawn = line_plot(
            &out.join(file),
            title,
            "sub-layer (attention 2i, MLP 2i+1; last: final read)",
            y,
            &series,
            (false, true),
        )?;
        if drawn {
            let _ = writeln!(md, "![{title}]({link}/{file}.png)\n");
        }
    }

    for ((name, runs), short) in groups.iter().zip(&names) {
        if runs.iter().all(|r| r.weights.is_empty()) {
            continue;
        }
        let file = format!(
            "depth_weights_{}",
            name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        );
        let title = format!("{short}: mean AttnRes weight of each source (white 0, dark blue 1)");
        heat_map(&out.join(&file), &title, runs)?;
        let _ = writeln!(md, "![{title}]({link}/{file}.png)\n");
    }
    Ok(md)
}

const LINE_PLOT_SIZE: (u32, u32) = (900, 520);

/// Draws `series` into `<stem>.svg` and `<stem>.png`; false (and no files) when there is
/// nothing to draw. `log` is (x, y); a log axis needs positive values.
fn line_plot(
    stem: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log: (bool, bool),
) -> Result<bool> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for s in series {
        let bands = s.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]);
        for (x, y) in s.points.iter().copied().chain(bands) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        return Ok(false);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1e-3;
    }
    let frame = Frame {
        title,
        x_desc,
        y_desc,
        x: (x0, x1),
        y: (y0, y1),
        log: (log.0 && x0 > 0.0, log.1 && y0 > 0.0),
    };
    let svg = stem.with_extension("svg");
    draw_lines(
        &SVGBackend::new(&svg, LINE_PLOT_SIZE).into_drawing_area(),
        &frame,
        series,
    )?;
    let png = stem.with_extension("png");
    draw_lines(
        &BitMapBackend::new(&png, LINE_PLOT_SIZE).into_drawing_area(),
        &frame,
        series,
    )?;
    Ok(true)
}

struct Frame<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x: (f64, f64),
    y: (f64, f64),
    log: (bool, bool),
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    frame: &Frame,
    series: &[Series],
) -> Result<()> {
    root.fill(&WHITE).map_err(plot_error)?;
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(frame.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(85);
    let (x0, x1) = frame.x;
    let (y0, y1) = frame.y;
    let pad = (y1 - y0) * 0.05;
    let (ly0, ly1) = (y0 * 0.9, y1 * 1.1);
    let (lx0, lx1) = (x0 * 0.9, x1 * 1.1);
    // Each axis kind is its own coordinate type, so the same drawing code is expanded per pair.
    macro_rules! draw {
        ($x:expr, $y:expr) => {{
            let mut chart = builder.build_cartesian_2d($x, $y).map_err(plot_error)?;
            chart
                .configure_mesh()
                .x_desc(frame.x_desc)
                .y_desc(frame.y_desc)
                .axis_desc_style(("sans-serif", 17))
                .label_style(("sans-serif", 14))
                .x_label_formatter(&|v: &f64| number(*v))
                .y_label_formatter(&|v: &f64| number(*v))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(plot_error)?;
            for s in series.iter().filter(|s| !s.band.is_empty()) {
                let outline: Vec<(f64, f64)> = s
                    .band
                    .iter()
                    .map(|&(x, _, hi)| (x, hi))
                    .chain(s.band.iter().rev().map(|&(x, lo, _)| (x, lo)))
                    .collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        outline,
                        s.color.mix(0.18).filled(),
                    )))
                    .map_err(plot_error)?;
            }
            for s in series.iter().filter(|s| !s.points.is_empty()) {
                let color = s.color;
                let points = s.points.iter().copied();
                if s.dashed {
                    chart
                        .draw_series(DashedLineSeries::new(points, 9, 6, color.stroke_width(2)))
                        .map_err(plot_error)?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| {
                            let style = color.stroke_width(3);
                            DashedPathElement::new(vec![(x, y), (x + 24, y)], 6, 4, style)
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(points, color.stroke_width(2)))
                        .map_err(plot_error)?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                        });
                }
                if s.points.len() <= 12 {
                    chart
                        .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(plot_error)?;
                }
            }
            chart
                .configure_series_labels()
                .position(if frame.log.0 {
                    // Speed against length rises to the right.
                    SeriesLabelPosition::UpperLeft
                } else {
                    SeriesLabelPosition::UpperRight
                })
                .label_font(("sans-serif", 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(plot_error)?;
        }};
    }
    match frame.log {
        // Sequence lengths are powers of two: label the x axis at them.
        (true, true) => draw!((lx0..lx1).log_scale().base(2.0), (ly0..ly1).log_scale()),
        (true, false) => draw!((lx0..lx1).log_scale().base(2.0), y0 - pad..y1 + pad),
        (false, true) => draw!(x0..x1, (ly0..ly1).log_scale()),
        (false, false) => draw!(x0..x1, y0 - pad..y1 + pad),
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Rows: the reading sub-layer (bottom: the first; top: the final read); columns: its sources;
/// shade: the mean weight over the group's runs, white 0 to dark blue 1. Written as SVG and PNG.
fn heat_map(stem: &Path, title: &str, runs: &[&Run]) -> Result<()> {
    let mut sum: BTreeMap<(usize, usize), (f64, usize)> = BTreeMap::new();
    for run in runs {
        for &(layer, source, weight) in &run.weights {
            let entry = sum.entry((layer, source)).or_default();
            entry.0 += weight;
            entry.1 += 1;
        }
    }
    let mean: BTreeMap<(usize, usize), f64> = sum
        .into_iter()
        .map(|(k, (total, n))| (k, total / n as f64))
        .collect();
    let layers = mean.keys().map(|k| k.0).max().unwrap_or(0) + 1;
    let sources = mean.keys().map(|k| k.1).max().unwrap_or(0) + 1;
    let cell = (26u32).min(700 / sources.max(1) as u32).max(12);
    let size = (
        (140 + cell * sources as u32).max(760),
        120 + cell * layers as u32,
    );
    let svg = stem.with_extension("svg");
    draw_heat_map(
        &SVGBackend::new(&svg, size).into_drawing_area(),
        title,
        &mean,
        (layers, sources),
    )?;
    let png = stem.with_extension("png");
    draw_heat_map(
        &BitMapBackend::new(&png, size).into_drawing_area(),
        title,
        &mean,
        (layers, sources),
    )
}

fn draw_heat_map<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    mean: &BTreeMap<(usize, usize), f64>,
    (layers, sources): (usize, usize),
) -> Result<()> {
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(root)
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
        .draw_series(mean.iter().map(|(&(layer, source), &w)| {
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

/// A config as dotted keys and TOML values, for the diff between runs.
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        toml::Value::String(text) => {
            out.insert(prefix.to_owned(), text.clone());
        }
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}

/// The keys whose values differ between runs, then every run's resolved config.
fn config_section(runs: &[Run]) -> String {
    let flat: Vec<BTreeMap<String, String>> = runs
        .iter()
        .map(|r| {
            let mut out = BTreeMap::new();
            if let Ok(value) = toml::Value::try_from(&r.config) {
                flatten("", &value, &mut out);
            }
            out
        })
        .collect();
    let mut keys: Vec<&String> = flat.iter().flat_map(|f| f.keys()).collect();
    keys.sort();
    keys.dedup();
    let differing: Vec<&String> = keys
        .into_iter()
        // The name follows from the rest (a sweep names runs by their swept values).
        .filter(|k| *k != "name" && flat.iter().any(|f| f.get(*k) != flat[0].get(*k)))
        .collect();
    let mut md = String::from("## Configurations\n\n");
    if differing.is_empty() {
        md += "Every run has the same config.\n\n";
    } else {
        let _ = write!(
            md,
            "The keys whose values differ between runs (— where a run's config has no such key):\n\n\
             | run | {} |\n|---|{}\n",
            differing
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(differing.len())
        );
        for (run, f) in runs.iter().zip(&flat) {
            let cells: Vec<String> = differing
                .iter()
                .map(|k| f.get(*k).cloned().unwrap_or_else(|| "—".into()))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} |",
                run.dir.file_name().unwrap_or_default().to_string_lossy(),
                cells.join(" | ")
            );
        }
        md.push('\n');
    }
    for run in runs {
        let _ = write!(
            md,
            "<details><summary>{}/config.toml</summary>\n\n```toml\n{}```\n\n</details>\n\n",
            run.dir.display(),
            run.config.to_toml()
        );
    }
    md
}

fn provenance(args: &Args) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!(" {}", s.trim()))
        .unwrap_or_default();
    let command: Vec<String> = std::env::args().collect();
    format!(
        "## Provenance\n\n\
         - command: `{}`\n\
         - strata {} built from commit {} (a `-dirty` suffix: with uncommitted changes)\n\
         - burn {}, cubecl {}, {}\n\
         - report made on: {} ({}{kernel}); each run's own machine is in the runs table\n\
         - runs: {}\n",
        command.join(" "),
        env!("CARGO_PKG_VERSION"),
        env!("STRATA_GIT_COMMIT"),
        env!("STRATA_BURN_VERSION"),
        env!("STRATA_CUBECL_VERSION"),
        env!("STRATA_RUSTC_VERSION"),
        strata::train::machine_name(),
        std::env::consts::OS,
        args.runs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The report as one HTML file: the Markdown rendered, each figure inlined as its SVG.
fn to_html(title: &str, md: &str, figures: &Path, link: &str) -> Result<String> {
    let mut options = pulldown_cmark::Options::empty();
    options.insert(pulldown_cmark::Options::ENABLE_TABLES);
    let mut body = String::new();
    pulldown_cmark::html::push_html(&mut body, pulldown_cmark::Parser::new_ext(md, options));
    let prefix = format!("src=\"{link}/");
    let mut html = String::new();
    let mut rest = body.as_str();
    while let Some(at) = rest.find(&prefix) {
        html.push_str(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let end = after.find('"').context("unterminated image link")?;
        let svg_path = figures.join(&after[..end]).with_extension("svg");
        let svg =
            std::fs::read(&svg_path).with_context(|| format!("reading {}", svg_path.display()))?;
        let _ = write!(
            html,
            "src=\"data:image/svg+xml;base64,{}\"",
            base64::engine::general_purpose::STANDARD.encode(svg)
        );
        rest = &after[end + 1..];
    }
    html.push_str(rest);
    Ok(format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>\n\
         body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }}\n\
         table {{ border-collapse: collapse; font-size: 0.85em; display: block; overflow-x: auto; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; }}\n\
         img {{ max-width: 100%; }}\n\
         pre {{ background: #f6f6f6; padding: 0.5em; overflow-x: auto; }}\n\
         </style></head><body>\n{html}</body></html>\n",
        title.replace('&', "&amp;").replace('<', "&lt;")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_keep_quoted_commas() {
        assert_eq!(
            split_csv_line(r#"dense,1024,"Xeon, 2 threads","say ""hi""""#),
            ["dense", "1024", "Xeon, 2 threads", r#"say "hi""#]
        );
        assert_eq!(split_csv_line("a,,b"), ["a", "", "b"]);
    }
}
