//! `bench-train --kernel-trace FILE`: the GPU kernels of the timed steps, summed by name, as
//! CSV, and how much of the steps' wall time the GPU was busy (CUDA backend, through CUPTI).
//!
//! The busy time is the union of the kernels' intervals: a step of 78 ms in which the GPU ran
//! kernels for 50 ms waited 28 ms on the host (or on a handoff between streams).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};

/// Starts recording the GPU's kernels; only the CUDA backend can.
pub fn start(backend: &str) -> Result<()> {
    #[cfg(feature = "cuda")]
    if backend.starts_with("cuda") {
        return strata::nn::fused::kernel::kernel_trace::start().map_err(anyhow::Error::msg);
    }
    anyhow::bail!(
        "--kernel-trace: needs --backend cuda (a build with the cuda feature), not {backend}"
    )
}

/// Stops recording (after the device finished the traced steps) and writes the CSV.
pub fn finish(path: &Path, steps: usize) -> Result<Summary> {
    #[cfg(feature = "cuda")]
    let runs: Vec<Run> = strata::nn::fused::kernel::kernel_trace::stop()
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .map(|run| Run {
            name: run.name,
            start: run.start,
            end: run.end,
        })
        .collect();
    #[cfg(not(feature = "cuda"))]
    let runs: Vec<Run> = Vec::new();
    let summary = summarise(&runs, steps);
    write_csv(&summary, path)?;
    Ok(summary)
}

/// One kernel as it ran: name and GPU timestamps (ns).
pub struct Run {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// Kernel time per step, by kernel name, and the GPU's busy time.
#[derive(Debug, PartialEq)]
pub struct Summary {
    /// (name, launches per step, ms per step), most time first.
    pub kernels: Vec<(String, f64, f64)>,
    pub kernel_ms_per_step: f64,
    pub busy_ms_per_step: f64,
    pub launches_per_step: f64,
}

pub fn summarise(runs: &[Run], steps: usize) -> Summary {
    let per_step = |x: f64| x / steps as f64;
    let mut by_name: HashMap<&str, (usize, u64)> = HashMap::new();
    for run in runs {
        let entry = by_name.entry(&run.name).or_default();
        entry.0 += 1;
        entry.1 += run.end.saturating_sub(run.start);
    }
    let mut kernels: Vec<_> = by_name
        .into_iter()
        .map(|(name, (launches, ns))| {
            (
                name.to_string(),
                per_step(launches as f64),
                per_step(ns as f64 / 1e6),
            )
        })
        .collect();
    kernels.sort_by(|a, b| b.2.total_cmp(&a.2));
    // Union of the intervals (kernels on two streams may overlap).
    let mut intervals: Vec<(u64, u64)> = runs.iter().map(|r| (r.start, r.end)).collect();
    intervals.sort_unstable();
    let mut busy = 0u64;
    let mut current: Option<(u64, u64)> = None;
    for (start, end) in intervals {
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                busy += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    busy += current.map_or(0, |(s, e)| e - s);
    Summary {
        kernel_ms_per_step: kernels.iter().map(|k| k.2).sum(),
        kernels,
        busy_ms_per_step: per_step(busy as f64 / 1e6),
        launches_per_step: per_step(runs.len() as f64),
    }
}

/// `kernel,launches_per_step,ms_per_step,share` rows, written atomically.
pub fn write_csv(summary: &Summary, path: &Path) -> Result<()> {
    let mut out = String::from("kernel,launches_per_step,ms_per_step,share_of_kernel_time\n");
    for (name, launches, ms) in &summary.kernels {
        out += &format!(
            "\"{}\",{launches:.1},{ms:.3},{:.4}\n",
            name.replace('"', "\"\""),
            ms / summary.kernel_ms_per_step
        );
    }
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, out).with_context(|| format!("writing {}", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, start: u64, end: u64) -> Run {
        Run {
            name: name.into(),
            start,
            end,
        }
    }

    #[test]
    fn kernel_time_is_summed_by_name_and_busy_time_counts_overlaps_once() {
        // Two steps: "a" twice, "b" once overlapping the second "a", then a gap.
        let runs = [
            run("a", 0, 2_000_000),
            run("a", 3_000_000, 5_000_000),
            run("b", 4_000_000, 9_000_000),
        ];
        let summary = summarise(&runs, 2);
        assert_eq!(
            summary.kernels,
            vec![("b".to_string(), 0.5, 2.5), ("a".to_string(), 1.0, 2.0)]
        );
        assert_eq!(summary.kernel_ms_per_step, 4.5);
        // Busy: [0, 2] and [3, 9] ms = 8 ms over 2 steps.
        assert_eq!(summary.busy_ms_per_step, 4.0);
        assert_eq!(summary.launches_per_step, 1.5);
    }
}
