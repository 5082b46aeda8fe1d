//! `strata bench-decode CONFIG...`: per-token KV-cache decoding latency of each config's model
//! (random weights, same seed), with the ratio to the first config measured in the same run.
//! Rounds alternate between the configs so that drift in the machine's speed hits all alike.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::prelude::*;
use strata::config::ExperimentConfig;
use strata::io::atomic_write;
use strata::model::Llama;
use strata::train::ids_tensor;

use crate::backend::BackendArgs;
use crate::bench::median;
use crate::dispatch;

#[derive(clap::Args)]
pub struct Args {
    /// Configs to compare; ratios are against the first.
    #[arg(required = true)]
    configs: Vec<PathBuf>,
    /// Prompt length prefilled before timing.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Tokens decoded one at a time per round.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// CSV to write (atomically); printed to stdout either way.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: Args) -> Result<()> {
    let configs = args
        .configs
        .iter()
        .map(|path| {
            ExperimentConfig::load(path, &[]).with_context(|| format!("loading {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    for (path, config) in args.configs.iter().zip(&configs) {
        let needed = args.prompt + args.tokens;
        anyhow::ensure!(
            needed <= config.model.max_seq_len,
            "{}: --prompt + --tokens = {needed} exceeds model.max_seq_len = {}",
            path.display(),
            config.model.max_seq_len
        );
    }
    dispatch!(plain, args.backend, |B, device| run_with::<B>(
        &configs, &args, &device
    ))
}

fn run_with<B: Backend>(
    configs: &[ExperimentConfig],
    args: &Args,
    device: &B::Device,
) -> Result<()> {
    let models: Vec<Llama<B>> = configs
        .iter()
        .map(|c| {
            B::seed(device, c.train.seed);
            c.model.init::<B>(device)
        })
        .collect();
    let vocab = configs[0].model.vocab_size.min(256) as u32;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 37 + 11) % vocab)
        .collect();
    let mut per_token = vec![Vec::new(); models.len()];
    // Round 0 warms caches and allocators and is not counted.
    for round in 0..=args.rounds {
        for (model, times) in models.iter().zip(&mut per_token) {
            let mut cache = model.new_cache();
            let logits =
                model.forward_cached(ids_tensor(&prompt, [1, prompt.len()], device), &mut cache);
            let _ = logits.into_data();
            let start = Instant::now();
            let mut token = prompt[prompt.len() - 1];
            for _ in 0..args.tokens {
                let logits = model.forward_cached(ids_tensor(&[token], [1, 1], device), &mut cache);
                // Greedy choice: reading it back also waits for the step on asynchronous backends.
                let next = logits
                    .argmax(2)
                    .into_data()
                    .convert::<i64>()
                    .to_vec::<i64>()
                    .unwrap_or_default();
                token = next.first().copied().unwrap_or(0) as u32 % vocab;
            }
            if round > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3 / args.tokens as f64);
            }
        }
    }
    let medians: Vec<f64> = per_token.iter_mut().map(|t| median(t)).collect();
    let machine = machine_name();
    let mut csv = String::from(
        "config,residual,attention,params,prompt_tokens,decode_tokens,rounds,ms_per_token,ratio_to_first,backend,machine\n",
    );
    for ((path, config), ms) in args.configs.iter().zip(configs).zip(&medians) {
        csv += &format!(
            "{},{:?},{:?},{},{},{},{},{:.4},{:.3},{},\"{}\"\n",
            path.display(),
            config.model.residual,
            config.model.attention,
            config.model.num_params(),
            args.prompt,
            args.tokens,
            args.rounds,
            ms,
            ms / medians[0],
            args.backend.label(),
            machine
        );
    }
    print!("{csv}");
    if let Some(out) = &args.out {
        atomic_write(out, |f| f.write_all(csv.as_bytes()))?;
    }
    Ok(())
}

/// CPU model and logical core count, for the results file.
pub fn machine_name() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} threads")
}
