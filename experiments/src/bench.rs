//! `strata bench-train CONFIG [--lora-rank R]`: forward + backward + AdamW step on random tokens
//! (with the config's activation checkpointing and offload),
//! timed after warm-up steps, printed as one JSON line for `strata bench --suite train` (and, with
//! LoRA adapters on a frozen random base, `benches/lora_gpu.sh`) to compare with PyTorch.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use rand::{Rng, SeedableRng, rngs::StdRng};
use strata::config::ExperimentConfig;
use strata::data::Batch;
use strata::nn::lora::{BaseDType, LoraConfig};
use strata::train::optim::AdamW;
use strata::train::{batch_tensors, recompute};

use crate::backend::BackendArgs;
use crate::{dispatch, kernel_trace};

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
    /// Also time each step's forward, backward and optimizer apart (waiting for the device
    /// after each), and the step's projection products alone, as the GPU training issue's
    /// profile asks.
    #[arg(long)]
    profile: bool,
    /// CUDA backend: record the GPU's kernels over the timed steps (CUPTI) and write their time
    /// per step by kernel name to this CSV; the JSON line gets the GPU's busy time per step.
    #[arg(long, value_name = "CSV")]
    kernel_trace: Option<PathBuf>,
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
    tc.mixed_precision.check_backend(&args.backend.label())?;
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
    model = model.with_compute_dtype(tc.mixed_precision.compute_dtype());
    let mut optim = AdamW::<B::InnerBackend>::new(tc.adamw());
    let mut rng = StdRng::seed_from_u64(tc.seed);
    let n = tc.batch_size * tc.seq_len;
    let mut step_secs = Vec::new();
    let mut first_step_secs = 0.0;
    let mut phases: Vec<[f64; 3]> = Vec::new();
    let device_memory = args
        .backend
        .label()
        .starts_with("cuda")
        .then(strata::train::DeviceMemorySampler::start)
        .flatten();
    // Under --profile, as many steps again after the timed ones, with the phases timed apart.
    let profiled = if args.profile { args.steps } else { 0 };
    let mut kernels = None;
    for step in 0..args.warmup + args.steps + profiled {
        let profiling = step >= args.warmup + args.steps;
        if step == args.warmup && args.kernel_trace.is_some() {
            kernel_trace::start(&args.backend.label())?;
        }
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
        // Profiled steps finish the device's work at each mark, so each phase is timed alone
        // (the marks cost the overlap of host and device work between phases).
        let mut marks = Vec::new();
        let mark = |marks: &mut Vec<f64>| {
            if profiling {
                B::sync(device).expect("device sync");
                marks.push(start.elapsed().as_secs_f64());
            }
        };
        let grads = match tc.recompute_plan() {
            Some(plan) => {
                let mut accumulator = GradientsAccumulator::new();
                recompute::loss_and_grads(&model, &batch, 1.0, plan, &mut accumulator, device);
                accumulator.grads()
            }
            None => {
                let (inputs, targets) = batch_tensors::<B>(&batch, device);
                let loss = model.loss(inputs, targets);
                mark(&mut marks);
                GradientsParams::from_grads(loss.backward(), &model)
            }
        };
        mark(&mut marks);
        model = optim.step(1e-4, model, grads, 1.0);
        // Reading one parameter back waits for the step to finish on asynchronous backends.
        let _ = model.norm.gamma.val().into_data();
        let secs = start.elapsed().as_secs_f64();
        if profiling {
            if let [forward, backward] = marks[..] {
                phases.push([forward, backward - forward, secs - backward]);
            }
            continue;
        }
        if step == 0 {
            // Includes kernel compilation and autotuning on GPU backends: the cold start.
            first_step_secs = secs;
            eprintln!("first step: {secs:.1}s");
        }
        if step >= args.warmup {
            step_secs.push(secs);
        }
        if step + 1 == args.warmup + args.steps
            && let Some(path) = &args.kernel_trace
        {
            kernels = Some(kernel_trace::finish(path, args.steps)?);
        }
    }
    let peak_device_mib = device_memory.and_then(|sampler| sampler.finish());
    // The type the step's products run in.
    let dtype = match tc.mixed_precision.compute_dtype() {
        Some(dtype) => dtype.into(),
        None => model.norm.gamma.val().dtype(),
    };
    let profile = args.profile.then(|| {
        let phase = |i: usize| median(&mut phases.iter().map(|p| p[i]).collect::<Vec<_>>());
        let gemms = projection_gemms::<B::InnerBackend>(config, dtype, device);
        let attention = attention_secs::<B>(config, dtype, device);
        serde_json::json!({
            "forward_secs": phase(0),
            "backward_secs": phase(1),
            "optimizer_secs": phase(2),
            "gemm_dtype": format!("{dtype:?}"),
            "gemm_secs": gemms.iter().map(|g| g.step_secs()).sum::<f64>(),
            "gemm_flops": gemms.iter().map(|g| g.step_flops()).sum::<f64>(),
            "gemms": gemms.iter().map(|g| serde_json::json!(g)).collect::<Vec<_>>(),
            "attention_secs": attention,
        })
    });
    // On GPU backends: the matmul kernel of the linear layers (`STRATA_MATMUL`),
    // whether AdamW ran as one kernel per parameter (`STRATA_FUSED_ADAMW`), attention's softmax
    // as one kernel each way (`STRATA_SOFTMAX_KERNEL`), and RMSNorm and SwiGLU likewise
    // (`STRATA_ELEMENTWISE_KERNELS`).
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let (matmul_kernel, [fused_adamw, softmax_kernel, elementwise_kernels]) = {
        use strata::nn::fused::kernel;
        let on_gpu = !strata::nn::fused::on_host::<B::InnerBackend>();
        (
            on_gpu.then(kernel::matmul_kernel_for::<B::InnerBackend>),
            [
                kernel::fused_adamw_enabled(),
                kernel::softmax_chosen::<B::InnerBackend>(),
                kernel::elementwise_chosen::<B::InnerBackend>(),
            ]
            .map(|on| on_gpu.then_some(on)),
        )
    };
    // Query passes of attention in matrix form (`STRATA_ATTENTION_PASSES`), where the score
    // kernels run.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let attention_passes =
        (softmax_kernel == Some(true)).then(strata::nn::fused::kernel::causal_passes);
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let attention_passes: Option<usize> = None;
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    let (matmul_kernel, [fused_adamw, softmax_kernel, elementwise_kernels]) =
        (None::<&str>, [None::<bool>; 3]);
    // Training's causal attention through the tensor-core flash kernels where they apply
    // (`STRATA_MMA_ATTENTION=1`, CUDA only).
    #[cfg(feature = "cuda")]
    let mma_attention = Some(strata::nn::fused::kernel::mma_enabled());
    #[cfg(not(feature = "cuda"))]
    let mma_attention: Option<bool> = None;
    #[cfg(feature = "cuda")]
    let cublas_wait = (matmul_kernel == Some(strata::nn::fused::kernel::CUBLAS))
        .then(strata::nn::fused::kernel::cublas_wait);
    #[cfg(not(feature = "cuda"))]
    let cublas_wait: Option<&str> = None;
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
            // Burn's matmul autotuning (the `autotune` and `fusion` features).
            "autotune": cfg!(feature = "autotune"),
            // The linear layers' matmul kernel on GPU backends (`STRATA_MATMUL`).
            "matmul_kernel": matmul_kernel,
            "fused_adamw": fused_adamw,
            "softmax_kernel": softmax_kernel,
            "elementwise_kernels": elementwise_kernels,
            "attention_passes": attention_passes,
            "mma_attention": mma_attention,
            // How cuBLAS products are ordered against CubeCL's stream (`STRATA_CUBLAS_WAIT`).
            "cublas_wait": cublas_wait,
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
            "peak_device_mib": peak_device_mib,
            "profile": profile,
            // --kernel-trace: the GPU's time per step in kernels and busy (kernels overlapping
            // on two streams counted once), and kernel launches per step.
            "kernel_ms_per_step": kernels.as_ref().map(|k| k.kernel_ms_per_step),
            "gpu_busy_ms_per_step": kernels.as_ref().map(|k| k.busy_ms_per_step),
            "launches_per_step": kernels.as_ref().map(|k| k.launches_per_step),
        })
    );
    Ok(())
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One projection shape of a training step, `[rows, d_in] × [d_in, d_out]`, `count` times, with
/// the time of each of its three products measured alone: the forward `x·W`, and backward's
/// `dY·Wᵀ` and `Xᵀ·dY` (transposed operands, as autodiff hands them to the matmul).
#[derive(serde::Serialize)]
struct Gemm {
    rows: usize,
    d_in: usize,
    d_out: usize,
    count: usize,
    forward_secs: f64,
    grad_input_secs: f64,
    grad_weight_secs: f64,
}

impl Gemm {
    fn step_secs(&self) -> f64 {
        self.count as f64 * (self.forward_secs + self.grad_input_secs + self.grad_weight_secs)
    }

    fn step_flops(&self) -> f64 {
        (self.count * 3 * 2 * self.rows * self.d_in * self.d_out) as f64
    }
}

/// Times the products of every projection of the model (attention's q, k, v, o, the MLP's
/// gate, up, down, and the LM head) at one step's rows, in `dtype`, each alone: the floor the
/// step's matmuls set with this backend's matmul.
fn projection_gemms<B: burn::tensor::backend::Backend>(
    config: &ExperimentConfig,
    dtype: burn::tensor::DType,
    device: &B::Device,
) -> Vec<Gemm> {
    use strata::nn::fused::linear::matmul_rows;
    let rows = config.train.batch_size * config.train.seq_len;
    let time = |f: &dyn Fn()| time_alone::<B>(device, 10, f);
    projection_shapes(config)
        .into_iter()
        .map(|(d_in, d_out, count)| {
            // Through the function the layers call, so a chosen GPU matmul kernel is timed too.
            let [forward_secs, grad_input_secs, grad_weight_secs] =
                step_products::<B>([rows, d_in, d_out], dtype, device)
                    .map(|(_, a, b)| time(&|| drop(matmul_rows(a.clone(), b.clone()))));
            Gemm {
                rows,
                d_in,
                d_out,
                count,
                forward_secs,
                grad_input_secs,
                grad_weight_secs,
            }
        })
        .collect()
}

/// The three products of one projection `[rows, d_in] × [d_in, d_out]` in a training step, as
/// `(name, lhs, rhs)` on random values in `dtype`: the forward `x·W`, and backward's `dY·Wᵀ`
/// and `Xᵀ·dY` with the transposes as views, as autodiff hands them to the matmul.
pub(crate) fn step_products<B: burn::tensor::backend::Backend>(
    [rows, d_in, d_out]: [usize; 3],
    dtype: burn::tensor::DType,
    device: &B::Device,
) -> [(&'static str, Tensor<B, 2>, Tensor<B, 2>); 3] {
    use burn::tensor::Distribution;
    let random = |shape: [usize; 2]| {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let (x, w, dy) = (
        random([rows, d_in]),
        random([d_in, d_out]),
        random([rows, d_out]),
    );
    [
        ("forward", x.clone(), w.clone()),
        ("grad_input", dy.clone(), w.transpose()),
        ("grad_weight", x.transpose(), dy),
    ]
}

/// The projection shapes `(d_in, d_out, count)` of a model's training step: attention's q, k,
/// v, o, the MLP's gate, up, down and the LM head, equal shapes merged.
pub(crate) fn projection_shapes(config: &ExperimentConfig) -> Vec<(usize, usize, usize)> {
    let m = &config.model;
    let (d, q, kv, f, layers) = (
        m.d_model,
        m.n_heads * m.head_dim(),
        m.kv_heads() * m.head_dim(),
        m.ffn_hidden,
        m.n_layers,
    );
    // Layers sharing keys and values (`kv_share`) skip their k and v projections.
    let kv_layers = (0..layers).filter(|&l| m.owns_kv(l)).count();
    let shapes = [
        (d, q, 2 * layers),
        (d, kv, 2 * kv_layers),
        (d, f, 2 * layers),
        (f, d, layers),
        (d, m.vocab_size, 1),
    ];
    let mut merged: Vec<(usize, usize, usize)> = Vec::new();
    for (d_in, d_out, count) in shapes {
        match merged.iter_mut().find(|s| (s.0, s.1) == (d_in, d_out)) {
            Some(s) => s.2 += count,
            None => merged.push((d_in, d_out, count)),
        }
    }
    merged.retain(|s| s.2 > 0);
    merged
}

/// Dense causal attention's forward and backward (the op the model trains with) at one step's
/// shape, timed alone, times the layers: `None` for other attention kinds.
fn attention_secs<B: AutodiffBackend>(
    config: &ExperimentConfig,
    dtype: burn::tensor::DType,
    device: &B::Device,
) -> Option<f64> {
    use burn::tensor::{Distribution, Tensor};
    use strata::model::AttentionKind;
    let m = &config.model;
    if m.attention != AttentionKind::Dense {
        return None;
    }
    let shape = [
        config.train.batch_size,
        m.n_heads,
        config.train.seq_len,
        m.head_dim(),
    ];
    let random = || {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device)
            .cast(dtype)
            .require_grad()
    };
    let (q, k, v, g) = (random(), random(), random(), random());
    let pass = || {
        let out = strata::nn::attention::dense_causal(q.clone(), k.clone(), v.clone());
        drop((out * g.clone()).sum().backward());
    };
    Some(time_alone::<B>(device, 5, &pass) * m.n_layers as f64)
}

/// The median time of `repeats` runs of `f` after two warm-up runs, each waiting for the
/// device to finish.
pub(crate) fn time_alone<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    repeats: usize,
    f: &dyn Fn(),
) -> f64 {
    for _ in 0..2 {
        f();
    }
    B::sync(device).expect("device sync");
    let mut secs: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            B::sync(device).expect("device sync");
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut secs)
}
