//! `strata bench-decode CONFIG...`: per-token KV-cache decoding latency of each config's model
//! (random weights, same seed), with the ratio to the first config measured in the same run, and
//! the key/value rows and bytes the cache holds at the end (fewer where a sparse attention drops
//! keys, or with cross-layer sharing). Rounds alternate between the configs so that drift in the
//! machine's speed hits all alike. The prompt is byte ids `(37 i + 11) mod 256` and each decoded
//! token is the greedy choice: benches/infer_llama_cpp.py does the same in llama.cpp.

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
    /// Prefill the prompt this many tokens at a time (0: at once), for long prompts whose
    /// attention scores would not fit at once.
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// CSV to write (atomically); printed to stdout either way.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Also write the first config's model (the same random weights) as an f32 GGUF file, for
    /// timing llama.cpp on it (benches/infer_llama_cpp.py).
    #[arg(long)]
    gguf_out: Option<PathBuf>,
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
    if let Some(path) = &args.gguf_out {
        strata::gguf::export::export_llama(
            &models[0],
            &configs[0].model,
            &configs[0].tokenizer,
            &configs[0].name,
            strata::gguf::GgmlType::F32,
            path,
        )
        .with_context(|| format!("--gguf-out {}", path.display()))?;
    }
    let vocab = configs[0].model.vocab_size.min(256) as u32;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 37 + 11) % vocab)
        .collect();
    let mut per_token = vec![Vec::new(); models.len()];
    let mut kv_rows = vec![0; models.len()];
    let chunk = if args.chunk == 0 {
        prompt.len()
    } else {
        args.chunk
    };
    // Round 0 warms caches and allocators and is not counted.
    for round in 0..=args.rounds {
        for ((model, times), rows) in models.iter().zip(&mut per_token).zip(&mut kv_rows) {
            let mut cache = model.new_cache();
            for part in prompt.chunks(chunk) {
                let logits =
                    model.forward_cached(ids_tensor(part, [1, part.len()], device), &mut cache);
                let _ = logits.slice_dim(1, part.len() - 1..part.len()).into_data();
            }
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
            *rows = cache.cached_len();
        }
    }
    let medians: Vec<f64> = per_token.iter_mut().map(|t| median(t)).collect();
    let machine = strata::train::machine_name();
    let mut csv = String::from(
        "config,residual,attention,params,prompt_tokens,decode_tokens,rounds,ms_per_token,ratio_to_first,kv_rows,kv_mib,backend,machine\n",
    );
    let bytes_per_value = match args.backend.dtype {
        crate::backend::Dtype::F32 => 4,
        crate::backend::Dtype::F16 | crate::backend::Dtype::Bf16 => 2,
    };
    for (((path, config), ms), rows) in args.configs.iter().zip(configs).zip(&medians).zip(&kv_rows)
    {
        let m = &config.model;
        let cached_layers = (0..m.n_layers).filter(|&i| m.owns_kv(i)).count();
        // Rows of the fullest layer, so an upper bound where layers evict alike (they do).
        let kv_bytes = rows * cached_layers * 2 * m.kv_heads() * m.head_dim() * bytes_per_value;
        csv += &format!(
            "{},{:?},{:?},{},{},{},{},{:.4},{:.3},{rows},{:.2},{},\"{}\"\n",
            path.display(),
            m.residual,
            m.attention,
            m.num_params(),
            args.prompt,
            args.tokens,
            args.rounds,
            ms,
            ms / medians[0],
            kv_bytes as f64 / (1 << 20) as f64,
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
