//! `strata export RUN_DIR|CHECKPOINT [--adapter DIR] --type q8_0|q4_k_m|… -o model.gguf
//! [--lora-out adapter.gguf]`: a GGUF file llama.cpp serves, with LoRA adapters merged into it or
//! written beside it as a GGUF adapter.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use strata::backend::Cpu;
use strata::gguf::Quantization;
use strata::gguf::adapter::export_lora_adapter;
use strata::gguf::export::export_llama;
use strata::io::load_model;
use strata::io::peft::load_adapter;

#[derive(clap::Args)]
pub struct Args {
    /// A run directory or a checkpoint folder.
    model: PathBuf,
    /// Storage of the weight matrices: a type (f32, f16, bf16, q8_0, q5_0, q5_1, q4_0, q4_1) or
    /// a llama.cpp k-quant preset (q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s).
    #[arg(long = "type", default_value = "q8_0")]
    ty: String,
    /// A PEFT adapter folder to merge into the model before export.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(short, long)]
    out: PathBuf,
    /// Write the LoRA adapters (of a fine-tuning run, or from --adapter) to this file as a GGUF
    /// LoRA adapter (llama.cpp's --lora), and the base to --out without them, instead of merging.
    #[arg(long, value_name = "FILE")]
    lora_out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let Some(quantization) = Quantization::parse(&args.ty) else {
        bail!(
            "--type {}: expected one of {}",
            args.ty,
            Quantization::NAMES
        );
    };
    // Export only reads weights: the CPU backend is enough.
    let mut loaded = load_model::<Cpu>(&args.model, &Default::default())?;
    let mut lora = None;
    if let Some(dir) = &args.adapter {
        let (config, model) = load_adapter(loaded.model, dir)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        (loaded.model, lora) = (model, Some(config));
    }
    let Some(experiment) = &loaded.experiment else {
        bail!(
            "{}: exporting Hugging Face checkpoints is not implemented yet; export a Strata run",
            args.model.display()
        );
    };
    let lora = lora.or_else(|| experiment.lora.clone());
    match (&args.lora_out, lora) {
        (Some(path), Some(lora)) => {
            let summary = export_lora_adapter(
                &loaded.model,
                &loaded.model_config,
                &lora,
                &experiment.name,
                path,
            )
            .with_context(|| format!("exporting the adapters of {}", args.model.display()))?;
            println!(
                "wrote {} ({} LoRA tensors, f32, for the base in {})",
                path.display(),
                summary.tensors.len(),
                args.out.display()
            );
        }
        (Some(_), None) => bail!(
            "--lora-out: {} has no LoRA adapters (a fine-tuning run, or --adapter DIR)",
            args.model.display()
        ),
        // Adapters are folded into the weights llama.cpp reads.
        (None, _) => loaded.model = loaded.model.merged_plain(),
    }
    let summary = export_llama(
        &loaded.model,
        &loaded.model_config,
        &experiment.tokenizer,
        &experiment.name,
        quantization,
        &args.out,
    )
    .with_context(|| format!("exporting {}", args.model.display()))?;
    // How many tensors went to each type (presets mix types; short rows fall back).
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (_, ty) in &summary.tensors {
        *counts.entry(ty.name()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({:.1} MiB, {}: {})",
        args.out.display(),
        summary.bytes as f64 / (1 << 20) as f64,
        quantization.name(),
        counts.join(", ")
    );
    Ok(())
}
