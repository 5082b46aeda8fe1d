//! `strata bench-train CONFIG [--lora-rank R]`: forward + backward + AdamW step on random tokens
//! (with the config's activation checkpointing and offload),
//! timed after warm-up steps, printed as one JSON line for `strata bench --suite train` (and, with
//! LoRA adapters on a frozen random base, `benches/lora_gpu.sh`) to compare with PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use rand::{Rng, SeedableRng, rngs::StdRng};
use strata::config::ExperimentConfig;
use strata::data::Batch;
use strata::nn::lora::{BaseDType, LoraConfig};
use strata::train::optim::AdamW;
use strata::train::{batch_tensors, recompute};

use crate::backend::BackendArgs;
use crate::dispatch;

#[derive(clap::Args)]
pub struct Args {
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Freeze the model and train LoRA adapters of this rank (α = 2r) on all seven projections.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Storage of the frozen base weights under --lora-rank: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    lora_base_dtype: String,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: Args) -> Result<()> {
    let config = ExperimentConfig::load(&args.config, &args.overrides)?;
    dispatch!(autodiff, args.backend, |B, device| run_with::<B>(
        &config, &args, &device
    ))
}

fn run_with<B: AutodiffBackend>(
    config: &ExperimentConfig,
    args: &Args,
    device: &B::Device,
) -> Result<()> {
    let tc = &config.train;
    B::seed(device, tc.seed);
    let mut model = config.model.init::<B>(device);
    if let Some(rank) = args.lora_rank {
        let base_dtype = match args.lora_base_dtype.as_str() {
            "f32" => BaseDType::F32,
            "bf16" => BaseDType::Bf16,
            "f16" => BaseDType::F16,
            other => anyhow::bail!("--lora-base-dtype {other}: expected f32, bf16 or f16"),
        };
        model = model.with_lora(&LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
            base_dtype,
            ..Default::default()
        })?;
    }
    let mut model = model.with_compute_dtype(tc.mixed_precision.compute_dtype());
    let mut optim = AdamW::<B::InnerBackend>::new(tc.adamw());
    let mut rng = StdRng::seed_from_u64(tc.seed);
    let n = tc.batch_size * tc.seq_len;
    let mut step_secs = Vec::new();
    let mut first_step_secs = 0.0;
    for step in 0..args.warmup + args.steps {
        let ids: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..config.model.vocab_size as u32))
            .collect();
        let batch = Batch {
            inputs: ids.clone(),
            targets: ids,
            loss_mask: Vec::new(),
            batch: tc.batch_size,
            seq: tc.seq_len,
            coords: None,
        };
        let start = Instant::now();
        let grads = match tc.recompute_plan() {
            Some(plan) => {
                let mut accumulator = GradientsAccumulator::new();
                recompute::loss_and_grads(&model, &batch, 1.0, plan, &mut accumulator, device);
                accumulator.grads()
            }
            None => {
                let (inputs, targets) = batch_tensors::<B>(&batch, device);
                let loss = model.loss(inputs, targets);
                GradientsParams::from_grads(loss.backward(), &model)
            }
        };
        model = optim.step(1e-4, model, grads, 1.0);
        // Reading one parameter back waits for the step to finish on asynchronous backends.
        let _ = model.norm.gamma.val().into_data();
        let secs = start.elapsed().as_secs_f64();
        if step == 0 {
            // Includes kernel compilation and autotuning on GPU backends: the cold start.
            first_step_secs = secs;
            eprintln!("first step: {secs:.1}s");
        }
        if step >= args.warmup {
            step_secs.push(secs);
        }
    }
    let total: f64 = step_secs.iter().sum();
    let tokens_per_sec = (n * args.steps) as f64 / total;
    // 6N FLOPs per token holds for full training only (LoRA skips the base weights' gradients).
    let flops = (args.lora_rank.is_none())
        .then(|| config.model.train_flops_per_token(tc.seq_len) * tokens_per_sec);
    println!(
        "{}",
        serde_json::json!({
            "framework": "strata",
            "backend": args.backend.label(),
            "params": config.model.num_params(),
            "batch_size": tc.batch_size,
            "seq_len": tc.seq_len,
            "steps": args.steps,
            "lora_rank": args.lora_rank,
            "lora_base_dtype": args.lora_rank.map(|_| args.lora_base_dtype.clone()),
            "activation_checkpointing": tc.activation_checkpointing.name(),
            "checkpoint_every": tc.checkpoint_every,
            "offload_activations": tc.offload_activations,
            "head_chunk": tc.head_chunk,
            "mixed_precision": tc.mixed_precision.name(),
            "peak_host_mib": strata::train::peak_host_mib(),
            "tokens_per_sec": tokens_per_sec,
            "model_flops_per_sec": flops,
            "median_step_secs": median(&mut step_secs),
            "first_step_secs": first_step_secs,
        })
    );
    Ok(())
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
