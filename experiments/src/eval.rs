//! `strata eval RUN_DIR|CHECKPOINT|HF_DIR [--data FILE [--instruction TEMPLATE] [--split S]]`

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::prelude::Backend;
use strata::data::{ChatTemplate, DataConfig, DataFormat, Dataset, Split, sequential_batches};
use strata::eval::evaluate;
use strata::io::{atomic_write, load_model};

use crate::backend::BackendArgs;
use crate::dispatch;

#[derive(clap::Args)]
pub struct Args {
    /// A run directory, a checkpoint folder, or a Hugging Face checkpoint folder.
    model: PathBuf,
    /// Evaluate on this text file, folder or JSONL file instead of the run's validation split.
    #[arg(long)]
    data: Option<PathBuf>,
    /// With --data: the file is instruction JSONL in this chat template (chatml or alpaca);
    /// only response tokens are scored.
    #[arg(long, value_name = "TEMPLATE")]
    instruction: Option<String>,
    /// With --data: which part to score (all, train or validation, split as training does).
    #[arg(long, default_value = "all")]
    split: String,
    /// Tokens to score at most.
    #[arg(long, default_value_t = 1_000_000)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Window length; default: the run's training seq_len (or 512 for HF models).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Output prefix for <out>.json and <out>.csv; default: eval in the model folder.
    #[arg(short, long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: Args) -> Result<()> {
    dispatch!(plain, args.backend, |B, device| run_with::<B>(
        &args, &device
    ))
}

fn run_with<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let loaded = load_model::<B>(&args.model, device)?;
    let (data, split) = match (&args.data, &loaded.experiment) {
        (Some(path), _) => {
            let mut data = DataConfig {
                path: path.clone(),
                ..DataConfig::default()
            };
            if let Some(template) = &args.instruction {
                data.format = DataFormat::Instruction;
                data.chat_template = match template.as_str() {
                    "chatml" => ChatTemplate::Chatml,
                    "alpaca" => ChatTemplate::Alpaca,
                    other => bail!("--instruction {other}: expected chatml or alpaca"),
                };
            }
            let split = match args.split.as_str() {
                "all" => Split::All,
                "train" => Split::Train,
                "validation" => Split::Validation,
                other => bail!("--split {other}: expected all, train or validation"),
            };
            (data, split)
        }
        (None, Some(exp)) => (exp.data.clone(), Split::Validation),
        (None, None) => bail!(
            "{} has no training config (a Hugging Face checkpoint or a GGUF file): give --data FILE",
            args.model.display()
        ),
    };
    let seq_len = args
        .seq_len
        .or(loaded.experiment.as_ref().map(|e| e.train.seq_len))
        .unwrap_or(512)
        .min(loaded.model.max_seq_len());
    let dataset = Dataset::load(&data, loaded.tokenizer.as_ref(), split, seq_len)?;
    let batches = match &dataset {
        Dataset::Stream(tokens) => {
            sequential_batches(tokens, args.max_tokens, args.batch_size, seq_len)
        }
        Dataset::Rows(rows) => rows.validation_batches(usize::MAX, args.batch_size),
    };
    if batches.is_empty() {
        bail!(
            "{}: fewer than {} tokens to evaluate",
            data.path.display(),
            seq_len + 1
        );
    }
    let report = evaluate(&loaded.model, &batches, dataset.bytes_per_token());
    println!(
        "{}: loss {:.4} nats/token | perplexity {:.3} | bits/byte {:.4} | {} tokens",
        args.model.display(),
        report.loss,
        report.perplexity,
        report.bits_per_byte,
        report.tokens
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| model_dir(&args.model).join("eval"));
    let json = serde_json::to_string_pretty(&report)?;
    atomic_write(&out.with_extension("json"), |f| {
        f.write_all(json.as_bytes())
    })?;
    atomic_write(&out.with_extension("csv"), |f| {
        writeln!(f, "model,data,loss,perplexity,bits_per_byte,tokens")?;
        writeln!(
            f,
            "{},{},{:.6},{:.6},{:.6},{}",
            args.model.display(),
            data.path.display(),
            report.loss,
            report.perplexity,
            report.bits_per_byte,
            report.tokens
        )
    })?;
    println!("wrote {} and .csv", out.with_extension("json").display());
    Ok(())
}

fn model_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_owned()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_owned()
    }
}
