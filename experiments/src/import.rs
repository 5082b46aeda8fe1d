//! `strata import MODEL -o OUT_DIR`: a Hugging Face Llama folder or a GGUF file (dequantized to
//! f32) as a Strata run directory, to train further, fine-tune, evaluate or export. A GGUF
//! file's tokenizer stays in that file: the run's config points at it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::io::checkpoint::write_run;
use strata::io::load_model;
use strata::tokenizer::TokenizerConfig;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face checkpoint folder or a .gguf file.
    model: PathBuf,
    /// The run directory to write.
    #[arg(short, long)]
    out: PathBuf,
    /// The run's name (default: the file or folder name).
    #[arg(long)]
    name: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let loaded = load_model::<Cpu>(&args.model, &Default::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.model
            .file_stem()
            .map(|s| s.to_string_lossy().replace(['/', '\\'], "_"))
            .unwrap_or_else(|| "imported".into())
    });
    let mut config = ExperimentConfig {
        name,
        model: loaded.model_config,
        tokenizer: absolute(loaded.tokenizer_config)?,
        ..ExperimentConfig::default()
    };
    // The default training window may exceed a small model's context.
    config.train.seq_len = config.train.seq_len.min(config.model.max_seq_len);
    let dir = write_run(
        &args.out,
        &loaded.model,
        config,
        loaded.tokenizer.fingerprint(),
    )?;
    println!("wrote {}", dir.display());
    Ok(())
}

/// A tokenizer that stays in the source file is named by its absolute path, so that the run
/// directory works from any working directory.
fn absolute(tokenizer: TokenizerConfig) -> Result<TokenizerConfig> {
    Ok(match tokenizer {
        TokenizerConfig::Gguf { path } => TokenizerConfig::Gguf {
            path: std::fs::canonicalize(&path)
                .with_context(|| format!("resolving {}", path.display()))?,
        },
        other => other,
    })
}
