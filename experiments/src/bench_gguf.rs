//! `strata bench-gguf FILE.gguf... [--prompt N] [--tokens N] [--rounds R]`: prefill and decode
//! speed of the block engine (`strata::gguf::engine`) on `llama` GGUF files, one CSV row each.
//! The prompt is the ids (37 i + 11) mod 256, evaluated at once with the logits of every position
//! (prefill, as llama.cpp computes it with `logits_all`); then `--tokens` greedy
//! tokens one at a time through the KV cache (decode). Medians over `--rounds` after a warm-up
//! round; `benches/infer_llama_cpp.py` measures llama.cpp the same way.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use strata::gguf::engine::GgufEngine;
use strata::infer::argmax;

use crate::bench::median;

#[derive(clap::Args)]
pub struct Args {
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

pub fn run(args: Args) -> Result<()> {
    println!("file,file_mib,prompt_tokens,decode_tokens,prefill_tok_s,decode_tok_s,threads");
    for path in &args.files {
        let engine =
            GgufEngine::open(path).with_context(|| format!("opening {}", path.display()))?;
        let prompt: Vec<u32> = (0..args.prompt)
            .map(|i| ((i * 37 + 11) % 256) as u32)
            .collect();
        let (mut prefill, mut decode) = (Vec::new(), Vec::new());
        for round in 0..=args.rounds {
            let mut cache = engine.new_cache();
            let start = Instant::now();
            let all = engine.forward(&prompt, &mut cache, true);
            let mut logits = all[all.len() - engine.config.vocab_size..].to_vec();
            let prefilled = start.elapsed().as_secs_f64();
            let start = Instant::now();
            for _ in 0..args.tokens {
                let next = argmax(&logits) % 256;
                logits = engine.forward(&[next], &mut cache, false);
            }
            if round > 0 {
                prefill.push(args.prompt as f64 / prefilled);
                decode.push(args.tokens as f64 / start.elapsed().as_secs_f64());
            }
        }
        let mib = std::fs::metadata(path)?.len() as f64 / (1 << 20) as f64;
        println!(
            "{},{mib:.1},{},{},{:.1},{:.2},{}",
            path.display(),
            args.prompt,
            args.tokens,
            median(&mut prefill),
            median(&mut decode),
            rayon::current_num_threads()
        );
    }
    Ok(())
}
