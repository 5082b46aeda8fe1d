//! `strata finetune CONFIG [--set key=value ...] [--resume RUN_DIR]`: `train` for configs with a
//! `[finetune]` base (and, for LoRA, a `[lora]` section). At the end the run directory also
//! holds `adapter/`, the adapters in Hugging Face PEFT's layout.

use anyhow::{Result, bail};
use strata::config::ExperimentConfig;

use crate::train::Args;

pub fn run(args: Args) -> Result<()> {
    let config: ExperimentConfig = args.load_config()?;
    if config.finetune.is_none() {
        bail!(
            "the config has no [finetune] section naming the base model; use `strata train` to train from scratch"
        );
    }
    crate::train::run_config(args, config)
}
