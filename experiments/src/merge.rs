//! `strata merge MODEL [--adapter DIR] -o OUT_DIR`: folds LoRA adapters into their base and
//! writes the result as a Strata run directory that `eval`, `generate`, `export` and a further
//! `finetune` read like any other. MODEL is a LoRA fine-tuning run (its adapters are used), or
//! any model `load_model` reads together with `--adapter` (a PEFT adapter folder).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::io::checkpoint::write_run;
use strata::io::load_model;
use strata::io::peft::load_adapter;

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
    let base = loaded.experiment.unwrap_or_default();
    let config = ExperimentConfig {
        name: format!("{}-merged", base.name),
        model: loaded.model_config,
        tokenizer: loaded.tokenizer_config,
        finetune: None,
        lora: None,
        ..base
    };
    let dir = write_run(
        &args.out,
        &model.merged_plain(),
        config,
        loaded.tokenizer.fingerprint(),
    )?;
    println!("wrote {}", dir.display());
    Ok(())
}
