//! `strata generate RUN_DIR|CHECKPOINT|HF_DIR|FILE.gguf --prompt TEXT [--engine burn|blocks]`

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::Backend;
use strata::data::{CoordsKind, line_breaks};
use strata::gguf::engine::GgufEngine;
use strata::gguf::import::read_file_tokenizer;
use strata::infer::{Decoding, Sampler, SamplerConfig, generate};
use strata::io::load_model;
use strata::tokenizer::Tokenizer;

use crate::backend::BackendArgs;
use crate::dispatch;

#[derive(clap::Args)]
pub struct Args {
    /// A run directory, a checkpoint folder, or a Hugging Face checkpoint folder.
    model: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recompute the whole sequence at every step instead of using the KV cache.
    #[arg(long)]
    no_cache: bool,
    /// For a `.gguf` file: `blocks` runs it in the block engine (weights memory-mapped in their
    /// quantized blocks, CPU; `llama` files), `burn` dequantizes it into the model on --backend.
    #[arg(long, default_value = "burn", value_parser = ["burn", "blocks"])]
    engine: String,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: Args) -> Result<()> {
    if args.engine == "blocks" {
        return run_blocks(&args);
    }
    dispatch!(plain, args.backend, |B, device| run_with::<B>(
        &args, &device
    ))
}

fn run_with<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let loaded = load_model::<B>(&args.model, device)?;
    let tokenizer = loaded.tokenizer.as_ref();
    let prompt = prompt_ids(args, tokenizer)?;
    let mut sampler = Sampler::new(sampler_config(args));
    let mut out = std::io::stdout();
    write!(out, "{}", args.prompt)?;
    let mut stream = TextStream::default();
    // A model trained at line/column coordinates generates at them too.
    let line_col = loaded
        .experiment
        .as_ref()
        .is_some_and(|config| config.data.coords == CoordsKind::LineCol);
    let breaks = line_col.then(|| line_breaks(tokenizer));
    let decoding = Decoding {
        stop: tokenizer.eos_id(),
        use_cache: !args.no_cache,
        line_breaks: breaks.as_deref(),
    };
    generate(
        &loaded.model,
        &prompt,
        args.max_tokens,
        &mut sampler,
        decoding,
        |id| stream.push(id, tokenizer, &mut out),
    )?;
    writeln!(out)?;
    Ok(())
}

/// `--engine blocks`: the GGUF file run from its blocks.
fn run_blocks(args: &Args) -> Result<()> {
    let engine = GgufEngine::open(&args.model)?;
    let tokenizer = read_file_tokenizer(&args.model)?;
    let prompt = prompt_ids(args, tokenizer.as_ref())?;
    let mut sampler = Sampler::new(sampler_config(args));
    let mut out = std::io::stdout();
    write!(out, "{}", args.prompt)?;
    let mut stream = TextStream::default();
    engine.generate(
        &prompt,
        args.max_tokens,
        &mut sampler,
        tokenizer.eos_id(),
        |id| stream.push(id, tokenizer.as_ref(), &mut out),
    );
    writeln!(out)?;
    Ok(())
}

/// BOS (where the tokenizer has one), then the prompt's ids.
fn prompt_ids(args: &Args, tokenizer: &dyn Tokenizer) -> Result<Vec<u32>> {
    let mut prompt: Vec<u32> = tokenizer.bos_id().into_iter().collect();
    prompt.extend(tokenizer.encode(&args.prompt)?);
    Ok(prompt)
}

fn sampler_config(args: &Args) -> SamplerConfig {
    SamplerConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    }
}

/// Streams generated text as it becomes valid UTF-8: decodes everything so far and prints what
/// is new.
#[derive(Default)]
struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    fn push(&mut self, id: u32, tokenizer: &dyn Tokenizer, out: &mut impl Write) {
        self.ids.push(id);
        if let Ok(text) = tokenizer.decode(&self.ids)
            && !text.ends_with('\u{FFFD}')
            && text.len() > self.printed
            && text.is_char_boundary(self.printed)
        {
            let _ = write!(out, "{}", &text[self.printed..]);
            let _ = out.flush();
            self.printed = text.len();
        }
    }
}
