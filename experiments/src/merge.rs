//! `strata merge MODEL [--adapter DIR] -o OUT_DIR`: folds LoRA adapters into their base and
//! writes the result as a Strata run directory that `eval`, `generate`, `export` and a further
//! `finetune` read like any other. MODEL is a LoRA fine-tuning run (its adapters are used), or
//! any model `load_model` reads together with `--adapter` (a PEFT adapter folder).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::io::checkpoint::{self, TrainState};
use strata::io::load_model;
use strata::io::params::named_params;
use strata::io::peft::load_adapter;
use strata::tokenizer::TokenizerConfig;

#[derive(clap::Args)]
pub struct Args {
    /// A LoRA run directory, or a base model (run, checkpoint, HF folder, .gguf) with --adapter.
    model: PathBuf,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply first.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The run directory to write.
    #[arg(short, long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    // Merging is a sum per weight: the CPU backend is enough.
    let device = Default::default();
    let loaded = load_model::<Cpu>(&args.model, &device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut model = loaded.model;
    if let Some(dir) = &args.adapter {
        model = load_adapter(model, dir)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?
            .1;
    } else if loaded.experiment.as_ref().is_none_or(|e| e.lora.is_none()) {
        bail!(
            "{} has no adapters: give a LoRA run directory, or --adapter DIR",
            args.model.display()
        );
    }
    let model = model.merged_plain();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    // The merged run keeps its tokenizer with it instead of pointing into the base's folder.
    let tokenizer = match &loaded.tokenizer_config {
        TokenizerConfig::Hf { path } => {
            let copy = args.out.join("tokenizer.json");
            std::fs::copy(path, &copy).with_context(|| format!("copying {}", path.display()))?;
            TokenizerConfig::Hf { path: copy }
        }
        other => other.clone(),
    };
    let base = loaded.experiment.unwrap_or_default();
    let config = ExperimentConfig {
        name: format!("{}-merged", base.name),
        model: loaded.model_config,
        tokenizer,
        finetune: None,
        lora: None,
        ..base
    };
    let state = TrainState {
        step: 0,
        tokens_seen: 0,
        seed: config.train.seed,
        elapsed_secs: 0.0,
        tokenizer: loaded.tokenizer.fingerprint(),
    };
    let dir = checkpoint::save(
        &args.out,
        &named_params(&model),
        &Default::default(),
        &state,
        &config,
        1,
    )?;
    strata::io::atomic_write(&args.out.join("config.toml"), |f| {
        std::io::Write::write_all(f, config.to_toml().as_bytes())
    })?;
    println!("wrote {}", dir.display());
    Ok(())
}
