//! `strata sweep SWEEP.toml [--dry-run]`: one base config, many runs.
//!
//! ```toml
//! name = "attnres-modes"             # the sweep folder: <--runs>/<name>/
//! base = "../attnres/tiny_standard.toml"
//! [set]                              # overrides every run gets
//! "train.max_steps" = 200
//! [grid]                             # every combination of these values
//! "model.residual" = ["standard", "attnres_block"]
//! "train.seed" = [1, 2]
//! [random]                           # optional: `samples` draws, each crossed with the grid
//! samples = 4
//! seed = 0
//! "train.lr" = { log_uniform = [1e-4, 3e-3] }   # or uniform = [a, b], choice = [...]
//! ```
//!
//! Runs go one after another in this process, each in `<sweep folder>/<swept values>/`. Running
//! the same file again skips finished runs (those with a `summary.json`) and resumes a
//! half-finished one from its latest checkpoint. Runs that differ only in `train.seed` share a
//! config name, so `strata report` treats them as seeds of one configuration.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use strata::config::ExperimentConfig;
use strata::io::atomic_write;

use crate::backend::BackendArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The sweep file (TOML).
    sweep: PathBuf,
    /// List the runs (name and overrides) and check every config, without training.
    #[arg(long)]
    dry_run: bool,
    /// Parent folder of the sweep folder.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
}

/// One planned run: its folder name, the overrides that make it, and the resolved config.
pub struct PlannedRun {
    pub name: String,
    pub overrides: Vec<String>,
    pub config: ExperimentConfig,
}

pub fn run(args: Args) -> Result<()> {
    let (sweep_name, runs) = plan(&args.sweep)?;
    let folder = args.runs.join(&sweep_name);
    println!(
        "sweep {sweep_name}: {} runs in {}",
        runs.len(),
        folder.display()
    );
    for run in &runs {
        let state = run_state(&folder.join(&run.name));
        println!("  {} [{state}]  {}", run.name, run.overrides.join(" "));
    }
    if args.dry_run {
        return Ok(());
    }
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    let manifest = serde_json::json!({
        "sweep": args.sweep.display().to_string(),
        "runs": runs.iter().map(|r| serde_json::json!({"name": r.name, "overrides": r.overrides})).collect::<Vec<_>>(),
    });
    atomic_write(&folder.join("sweep.json"), |f| {
        serde_json::to_writer_pretty(&mut *f, &manifest)?;
        Ok(())
    })?;
    for (i, run) in runs.iter().enumerate() {
        let dir = folder.join(&run.name);
        if dir.join("summary.json").exists() {
            println!(
                "[{}/{}] {}: finished earlier, skipped",
                i + 1,
                runs.len(),
                run.name
            );
            continue;
        }
        if dir.join("config.toml").exists() {
            let saved = ExperimentConfig::load(&dir.join("config.toml"), &[])?;
            if saved != run.config {
                bail!(
                    "{}: this run was started with a different config than {} now gives it; \
                     restore the sweep file or remove the run folder",
                    dir.display(),
                    args.sweep.display()
                );
            }
        }
        println!("[{}/{}] {}", i + 1, runs.len(), run.name);
        // Resuming a folder without a checkpoint starts the run from step 0.
        crate::train::train_in(&run.config, &dir, true, &args.backend)
            .with_context(|| format!("sweep run {}", run.name))?;
    }
    println!(
        "sweep {sweep_name} finished: strata report {}",
        folder.display()
    );
    Ok(())
}

fn run_state(dir: &Path) -> &'static str {
    if dir.join("summary.json").exists() {
        "finished"
    } else if dir.join("config.toml").exists() {
        "started"
    } else {
        "new"
    }
}

/// Reads a sweep file and expands it into runs, each config loaded and validated.
pub fn plan(path: &Path) -> Result<(String, Vec<PlannedRun>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let key_error =
        |key: &str, expected: &str| anyhow::anyhow!("{}: `{key}`: {expected}", path.display());

    let name = match table.remove("name") {
        Some(toml::Value::String(s)) if !s.is_empty() && !s.contains(['/', '\\']) => s,
        Some(_) => {
            return Err(key_error(
                "name",
                "expected a non-empty string without slashes",
            ));
        }
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "sweep".into()),
    };
    let base = match table.remove("base") {
        Some(toml::Value::String(s)) => path.parent().unwrap_or(Path::new(".")).join(s),
        _ => {
            return Err(key_error(
                "base",
                "expected the path of the base config, relative to this file",
            ));
        }
    };
    let fixed = match table.remove("set") {
        Some(toml::Value::Table(t)) => assignments(&t),
        None => Vec::new(),
        Some(_) => return Err(key_error("set", "expected a table of \"key.path\" = value")),
    };
    let mut grid: Vec<(String, Vec<toml::Value>)> = Vec::new();
    match table.remove("grid") {
        Some(toml::Value::Table(t)) => {
            for (key, values) in t {
                match values {
                    toml::Value::Array(v) if !v.is_empty() => grid.push((key, v)),
                    _ => {
                        return Err(key_error(
                            &format!("grid.\"{key}\""),
                            "expected a non-empty array of values",
                        ));
                    }
                }
            }
        }
        None => {}
        Some(_) => {
            return Err(key_error(
                "grid",
                "expected a table of \"key.path\" = [values]",
            ));
        }
    }
    let samples = match table.remove("random") {
        Some(toml::Value::Table(t)) => random_samples(t, path)?,
        None => vec![Vec::new()],
        Some(_) => return Err(key_error("random", "expected a table")),
    };
    if let Some(key) = table.keys().next() {
        return Err(key_error(
            key,
            "unknown key; expected name, base, set, grid or random",
        ));
    }

    // The grid's cartesian product, first key slowest; each random draw crossed with it.
    let mut points: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (key, values) in &grid {
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut p = p.clone();
                    p.push((key.clone(), v.clone()));
                    p
                })
            })
            .collect();
    }
    let mut runs = Vec::new();
    for sample in &samples {
        for point in &points {
            let swept: Vec<(String, toml::Value)> =
                sample.iter().chain(point.iter()).cloned().collect();
            let keys: Vec<&str> = swept.iter().map(|(k, _)| k.as_str()).collect();
            let label = |skip_seed: bool| -> String {
                swept
                    .iter()
                    .filter(|(k, _)| !(skip_seed && k == "train.seed"))
                    .map(|(k, v)| format!("{}={}", short_key(k, &keys), value_label(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let run_name = if swept.is_empty() {
                name.clone()
            } else {
                label(false)
            };
            let group = label(true);
            let mut overrides = fixed.clone();
            overrides.extend(swept.iter().map(|(k, v)| format!("{k}={v}")));
            let config_name = if group.is_empty() {
                name.clone()
            } else {
                format!("{name}-{group}")
            };
            overrides.push(format!("name={}", toml::Value::String(config_name)));
            let config = ExperimentConfig::load(&base, &overrides)
                .with_context(|| format!("{}: run {run_name}", path.display()))?;
            runs.push(PlannedRun {
                name: run_name,
                overrides,
                config,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = runs.iter().find(|r| !seen.insert(r.name.clone())) {
        bail!(
            "{}: two runs would share the folder {}",
            path.display(),
            dup.name
        );
    }
    Ok((name, runs))
}

fn assignments(table: &toml::Table) -> Vec<String> {
    table.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `samples` draws of the `[random]` keys, reproducible from its `seed`.
fn random_samples(mut t: toml::Table, path: &Path) -> Result<Vec<Vec<(String, toml::Value)>>> {
    let int = |t: &mut toml::Table, key: &str, default: i64| -> Result<u64> {
        match t.remove(key) {
            None => Ok(default as u64),
            Some(toml::Value::Integer(n)) if n >= 0 => Ok(n as u64),
            Some(v) => bail!(
                "{}: random.{key} = {v}: expected a non-negative integer",
                path.display()
            ),
        }
    };
    let samples = int(&mut t, "samples", 1)?;
    let mut rng = StdRng::seed_from_u64(int(&mut t, "seed", 0)?);
    let mut draws = Vec::new();
    for _ in 0..samples {
        let mut draw = Vec::new();
        for (key, spec) in &t {
            let bad = || {
                anyhow::anyhow!(
                    "{}: random.\"{key}\" = {spec}: expected {{ uniform = [a, b] }}, \
                     {{ log_uniform = [a, b] }} with 0 < a <= b, or {{ choice = [values] }}",
                    path.display()
                )
            };
            let (kind, arg) = spec
                .as_table()
                .and_then(|s| s.iter().next())
                .ok_or_else(bad)?;
            let bounds = || -> Result<(f64, f64)> {
                let v = arg.as_array().filter(|a| a.len() == 2).ok_or_else(bad)?;
                let num = |x: &toml::Value| x.as_float().or(x.as_integer().map(|i| i as f64));
                match (num(&v[0]), num(&v[1])) {
                    (Some(a), Some(b)) if a <= b => Ok((a, b)),
                    _ => Err(bad()),
                }
            };
            let value = match kind.as_str() {
                "uniform" => {
                    let (a, b) = bounds()?;
                    toml::Value::Float(round_sig(a + (b - a) * rng.random::<f64>()))
                }
                "log_uniform" => {
                    let (a, b) = bounds()?;
                    if a <= 0.0 {
                        return Err(bad());
                    }
                    let u = rng.random::<f64>();
                    toml::Value::Float(round_sig((a.ln() + (b.ln() - a.ln()) * u).exp()))
                }
                "choice" => {
                    let options = arg.as_array().filter(|a| !a.is_empty()).ok_or_else(bad)?;
                    options[rng.random_range(0..options.len())].clone()
                }
                _ => return Err(bad()),
            };
            draw.push((key.clone(), value));
        }
        draws.push(draw);
    }
    Ok(draws)
}

/// Three significant digits: run names stay short, and a draw is as good as its neighbours.
fn round_sig(x: f64) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(2 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// The last part of a dotted key, or the whole key where two swept keys share that last part.
fn short_key<'a>(key: &'a str, keys: &[&str]) -> &'a str {
    let last = key.rsplit('.').next().unwrap_or(key);
    let clashes = keys
        .iter()
        .filter(|k| k.rsplit('.').next() == Some(last))
        .count();
    if clashes > 1 { key } else { last }
}

fn value_label(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Float(f) => format!("{f:e}").replace("e0", ""),
        other => other.to_string(),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_and_safe() {
        assert_eq!(value_label(&toml::Value::Float(3e-4)), "3e-4");
        assert_eq!(value_label(&toml::Value::Float(0.5)), "5e-1");
        assert_eq!(value_label(&toml::Value::Float(2.0)), "2");
        assert_eq!(value_label(&toml::Value::String("a/b c".into())), "a_b_c");
        assert_eq!(short_key("train.lr", &["train.lr", "train.seed"]), "lr");
        assert_eq!(short_key("model.x", &["model.x", "train.x"]), "model.x");
        assert_eq!(round_sig(0.000123456), 0.000123);
        assert_eq!(round_sig(98765.0), 98800.0);
    }
}
