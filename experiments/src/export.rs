//! `strata export RUN_DIR|CHECKPOINT [--adapter DIR] --type q8_0 -o model.gguf`: a GGUF file llama.cpp serves.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use strata::backend::Cpu;
use strata::gguf::GgmlType;
use strata::gguf::export::export_llama;
use strata::io::load_model;
use strata::io::peft::load_adapter;

#[derive(clap::Args)]
pub struct Args {
    /// A run directory or a checkpoint folder.
    model: PathBuf,
    /// Storage type of the weight matrices: f32, f16, bf16, q8_0, q5_0, q5_1, q4_0 or q4_1.
    #[arg(long = "type", default_value = "q8_0")]
    ty: String,
    /// A PEFT adapter folder to merge into the model before export.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(short, long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let Some(ty) = GgmlType::parse(&args.ty) else {
        bail!(
            "--type {}: expected one of f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1",
            args.ty
        );
    };
    // Export only reads weights: the CPU backend is enough.
    let mut loaded = load_model::<Cpu>(&args.model, &Default::default())?;
    if let Some(dir) = &args.adapter {
        loaded.model = load_adapter(loaded.model, dir)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?
            .1;
    }
    // Adapters (of a LoRA run, or from --adapter) are folded into the weights llama.cpp reads.
    loaded.model = loaded.model.merged_plain();
    let Some(experiment) = &loaded.experiment else {
        bail!(
            "{}: exporting Hugging Face checkpoints is not implemented yet; export a Strata run",
            args.model.display()
        );
    };
    let summary = export_llama(
        &loaded.model,
        &loaded.model_config,
        &experiment.tokenizer,
        &experiment.name,
        ty,
        &args.out,
    )
    .with_context(|| format!("exporting {}", args.model.display()))?;
    let fallback = summary
        .tensors
        .iter()
        .filter(|(_, t)| *t != ty && *t != GgmlType::F32)
        .count();
    println!(
        "wrote {} ({:.1} MiB, {} tensors, matrices as {}{})",
        args.out.display(),
        summary.bytes as f64 / (1 << 20) as f64,
        summary.tensors.len(),
        ty.name(),
        if fallback > 0 {
            format!("; {fallback} as f16: their rows do not fill whole blocks")
        } else {
            String::new()
        }
    );
    Ok(())
}
