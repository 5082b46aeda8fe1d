//! The training loop: seeded random windows → forward/backward with gradient accumulation →
//! global-norm clipping → AdamW with warm-up and cosine decay; periodic validation, metrics.csv
//! and atomic checkpoints. A resumed run replays exactly the steps the uninterrupted run takes.

pub mod optim;
pub mod recompute;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::data::{Batch, Dataset, Split};
use crate::error::{Error, Result};
use crate::eval::{self, EvalReport};
use crate::io::params::{count_params_where, param_bytes_where};
use crate::io::{atomic_write, checkpoint};
use crate::model::{Llama, cross_entropy, cross_entropy_masked};
use crate::tokenizer::Tokenizer;
use optim::{AdamW, AdamWConfig, global_grad_norm, grad_squares_by_path, learning_rate};
pub use recompute::ActivationCheckpointing;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub grad_accum: usize,
    pub max_steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    pub grad_clip: f64,
    pub decay_embeddings: bool,
    pub decay_norms_and_biases: bool,
    pub log_interval: usize,
    pub eval_interval: usize,
    /// Validation batches per evaluation (evenly spaced windows, the same every time).
    pub eval_batches: usize,
    pub checkpoint_interval: usize,
    pub keep_checkpoints: usize,
    /// Prompt and length of the samples printed when training ends.
    pub sample_prompt: String,
    pub sample_tokens: usize,
    /// Recompute activations in the backward pass instead of keeping them (see
    /// [`recompute`]): `none`, `block` or `every_k`.
    pub activation_checkpointing: ActivationCheckpointing,
    /// Blocks per recomputed segment under `every_k`.
    pub checkpoint_every: usize,
    /// Keep the saved segment inputs in host memory rather than on the device.
    pub offload_activations: bool,
    /// Under activation checkpointing: sequence positions per pass through the LM head and
    /// loss (0: the whole sequence at once).
    pub head_chunk: usize,
    /// `bf16`: the sub-layers and the LM head compute in bf16 while the parameters, their
    /// gradients, the AdamW state, the residual stream, the norms and the loss stay in the
    /// parameters' type (f32), as PyTorch's autocast does; `f16`: the same in f16 with dynamic
    /// loss scaling ([`LossScale`]); `none`: everything in the parameters' type.
    pub mixed_precision: MixedPrecision,
    /// `f16` mixed precision: the initial loss scale.
    pub loss_scale: f64,
}

/// Dynamic loss scaling for f16 compute (`train.mixed_precision = "f16"`), as PyTorch's
/// GradScaler does it: the loss is multiplied by `scale` before the backward pass so that small
/// gradients survive f16's narrow range; a step whose gradients overflow is skipped and halves
/// the scale, and every [`LossScale::GROWTH_INTERVAL`] overflow-free steps double it. Saved in
/// checkpoints, so a resumed run continues with the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Overflow-free steps since the scale last changed.
    pub good_steps: usize,
    /// Steps skipped for overflowing gradients, over the whole run.
    pub skipped_steps: usize,
}

impl LossScale {
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            good_steps: 0,
            skipped_steps: 0,
        }
    }

    /// Records whether this step's gradients are finite; returns whether to apply them.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped_steps += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// `train.mixed_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    #[default]
    None,
    Bf16,
    F16,
}

impl MixedPrecision {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::None => "none",
            MixedPrecision::Bf16 => "bf16",
            MixedPrecision::F16 => "f16",
        }
    }

    /// Refuses a compute type the backend `backend_name` (as `--backend` names it) lacks:
    /// wgpu's WGSL has no bf16.
    pub fn check_backend(self, backend_name: &str) -> Result<()> {
        if self == MixedPrecision::Bf16 && backend_name.starts_with("wgpu") {
            return Err(Error::config(
                "train.mixed_precision",
                "\"bf16\"",
                "\"none\" or \"f16\" on the wgpu backend (WGSL has no bf16); bf16 compute runs on cuda and the CPU backends",
            ));
        }
        Ok(())
    }

    /// What [`Llama::with_compute_dtype`] takes.
    pub fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            MixedPrecision::None => None,
            MixedPrecision::Bf16 => Some(FloatDType::BF16),
            MixedPrecision::F16 => Some(FloatDType::F16),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 1337,
            batch_size: 16,
            seq_len: 128,
            grad_accum: 1,
            max_steps: 1000,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            decay_embeddings: false,
            decay_norms_and_biases: false,
            log_interval: 10,
            eval_interval: 200,
            eval_batches: 20,
            checkpoint_interval: 200,
            keep_checkpoints: 2,
            sample_prompt: "\n".into(),
            sample_tokens: 200,
            activation_checkpointing: ActivationCheckpointing::None,
            checkpoint_every: 2,
            offload_activations: false,
            head_chunk: 0,
            mixed_precision: MixedPrecision::None,
            loss_scale: 65536.0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let key = |k: &str| format!("{prefix}{k}");
        if !(self.loss_scale.is_finite() && self.loss_scale >= 1.0) {
            return Err(Error::config(
                key("loss_scale"),
                self.loss_scale,
                "a finite number of at least 1",
            ));
        }
        for (name, value) in [
            ("batch_size", self.batch_size),
            ("seq_len", self.seq_len),
            ("grad_accum", self.grad_accum),
            ("max_steps", self.max_steps),
            ("log_interval", self.log_interval),
            ("eval_interval", self.eval_interval),
            ("eval_batches", self.eval_batches),
            ("checkpoint_interval", self.checkpoint_interval),
            ("keep_checkpoints", self.keep_checkpoints),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if value == 0 {
                return Err(Error::config(key(name), 0, "must be at least 1"));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config(
                key("lr"),
                self.lr,
                "must be a positive number",
            ));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(Error::config(
                key("min_lr"),
                self.min_lr,
                format!("must be in [0, lr = {}]", self.lr),
            ));
        }
        for (name, value) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&value) {
                return Err(Error::config(key(name), value, "must be in [0, 1)"));
            }
        }
        for (name, value) in [
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
            ("grad_clip", self.grad_clip),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(Error::config(
                    key(name),
                    value,
                    "must be a non-negative number",
                ));
            }
        }
        if self.head_chunk > 0 && self.activation_checkpointing == ActivationCheckpointing::None {
            return Err(Error::config(
                key("head_chunk"),
                self.head_chunk,
                format!(
                    "0 unless {} is \"block\" or \"every_k\" (chunks are separate backward passes)",
                    key("activation_checkpointing")
                ),
            ));
        }
        if self.offload_activations
            && self.activation_checkpointing == ActivationCheckpointing::None
        {
            return Err(Error::config(
                key("offload_activations"),
                true,
                format!(
                    "needs {} = \"block\" or \"every_k\" (it offloads the saved block inputs)",
                    key("activation_checkpointing")
                ),
            ));
        }
        Ok(())
    }

    /// Blocks per recomputed segment, or `None` when activations are kept.
    pub fn blocks_per_segment(&self) -> Option<usize> {
        match self.activation_checkpointing {
            ActivationCheckpointing::None => None,
            ActivationCheckpointing::Block => Some(1),
            ActivationCheckpointing::EveryK => Some(self.checkpoint_every),
        }
    }

    /// How a step recomputes, or `None` when activations are kept.
    pub fn recompute_plan(&self) -> Option<recompute::Plan> {
        Some(recompute::Plan {
            blocks_per_segment: self.blocks_per_segment()?,
            offload: self.offload_activations,
            head_chunk: self.head_chunk,
        })
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            decay_embeddings: self.decay_embeddings,
            decay_vectors: self.decay_norms_and_biases,
        }
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.seq_len * self.grad_accum
    }
}

/// What the loop reports as it goes; the CLI turns these into a progress bar or log lines.
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        start_step: usize,
        max_steps: usize,
        params: usize,
        /// Parameters the optimizer updates (the adapters of a LoRA run).
        trainable_params: usize,
        /// Tokens the loss counts (response tokens of instruction data).
        train_tokens: usize,
        val_tokens: usize,
    },
    /// Instruction data was packed (training split): examples, how many were cut to fit a row,
    /// and how many malformed lines were skipped.
    Packed {
        examples: usize,
        truncated: usize,
        skipped: usize,
    },
    Step(StepMetrics),
    Validated {
        step: usize,
        report: EvalReport,
    },
    Checkpointed {
        step: usize,
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub tokens: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub elapsed_sec: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub name: String,
    pub steps: usize,
    pub tokens: u64,
    pub params: usize,
    pub final_train_loss: f64,
    pub val_loss: f64,
    pub val_perplexity: f64,
    pub val_bits_per_byte: f64,
    pub tokens_per_sec: f64,
    pub wall_secs: f64,
    pub backend: String,
    /// Parameters the optimizer updated (the adapters of a LoRA run).
    #[serde(default)]
    pub trainable_params: usize,
    /// Peak resident host memory of the process (MiB), where the OS reports it.
    #[serde(default)]
    pub peak_host_mib: Option<f64>,
    /// The model's parameters as stored (MiB).
    #[serde(default)]
    pub weights_mib: f64,
    /// The trained parameters among them (the adapters of a LoRA run; MiB).
    #[serde(default)]
    pub trainable_mib: f64,
    /// AdamW's two moments for the trained parameters (MiB).
    #[serde(default)]
    pub optimizer_mib: f64,
    /// Where the run trained: CPU model and threads, and the GPUs where nvidia-smi lists any.
    #[serde(default)]
    pub machine: String,
    /// On CUDA backends: the peak of the GPU's memory in use during the run above what was in use
    /// when it started (nvidia-smi's memory.used, sampled every 100 ms; MiB).
    #[serde(default)]
    pub peak_device_mib: Option<f64>,
    /// f16 mixed precision: the loss scale at the end and the steps skipped for overflow.
    #[serde(default)]
    pub loss_scale: Option<LossScale>,
}

const METRICS_HEADER: &str =
    "step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_sec,elapsed_sec";

/// The process's peak resident host memory in MiB (Linux's VmHWM); `None` elsewhere.
pub fn peak_host_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Starts a new peak for [`peak_host_mib`] (Linux: the current resident size), so that runs one
/// after another in one process (a sweep) each report their own peak.
pub fn reset_peak_host() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Samples the memory in use on GPU 0 (nvidia-smi's memory.used every 100 ms) from `start` to
/// `finish`, which returns the peak above the first sample: the device memory of the work done
/// in between, where nothing else uses the GPU. Process-level CUDA figures are not reachable
/// through Burn, and nvidia-smi's per-process list is empty inside many containers.
pub struct DeviceMemorySampler {
    child: std::process::Child,
    reader: std::thread::JoinHandle<Option<f64>>,
}

impl DeviceMemorySampler {
    /// None where nvidia-smi does not run.
    pub fn start() -> Option<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                "0",
            ])
            .arg("-lms")
            .arg("100")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let stdout = child.stdout.take()?;
        let reader = std::thread::spawn(move || {
            let mut samples = std::io::BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
                .filter_map(|l| l.trim().parse::<f64>().ok());
            let first = samples.next()?;
            Some(samples.fold(first, f64::max) - first)
        });
        Some(Self { child, reader })
    }

    pub fn finish(mut self) -> Option<f64> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reader.join().ok().flatten()
    }
}

/// CPU model and logical core count, then the GPUs (name, driver) where nvidia-smi lists any:
/// the machine a result came from, for results files and run summaries.
pub fn machine_name() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.replace(", ", " driver "))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|g| !g.is_empty());
    match gpus {
        Some(gpus) => format!("{cpu}, {cores} threads; {gpus}"),
        None => format!("{cpu}, {cores} threads"),
    }
}

/// Trains `config` in `run_dir`, continuing from its latest checkpoint when `resume` is set.
/// Returns the trained model (on the inner backend) and the summary written to `summary.json`.
pub fn train<B: AutodiffBackend>(
    config: &ExperimentConfig,
    tokenizer: &dyn Tokenizer,
    run_dir: &Path,
    resume: bool,
    backend_name: &str,
    device: &B::Device,
    on_event: &mut dyn FnMut(Event),
) -> Result<(Llama<B::InnerBackend>, TrainSummary)> {
    let tc = &config.train;
    if tokenizer.vocab_size() > config.model.vocab_size {
        return Err(Error::config(
            "model.vocab_size",
            config.model.vocab_size,
            format!(
                "must be at least the tokenizer's vocabulary size {}",
                tokenizer.vocab_size()
            ),
        ));
    }
    tc.mixed_precision.check_backend(backend_name)?;
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    reset_peak_host();
    let device_memory = backend_name
        .starts_with("cuda")
        .then(DeviceMemorySampler::start)
        .flatten();
    let train_split = Dataset::load(&config.data, tokenizer, Split::Train, tc.seq_len)?;
    let val_split = Dataset::load(&config.data, tokenizer, Split::Validation, tc.seq_len)?;
    let val_batches = val_split.validation_batches(tc.eval_batches, tc.batch_size, tc.seq_len)?;

    B::seed(device, tc.seed);
    let mut model: Llama<B> = match &config.finetune {
        None => config.model.init(device),
        Some(finetune) => {
            let base = crate::io::load_model::<B>(&finetune.base, device)?.model;
            match &config.lora {
                Some(lora) => base.with_lora(lora)?,
                None => base,
            }
        }
    };
    let mut optimizer = AdamW::<B::InnerBackend>::new(tc.adamw());
    let mut state = checkpoint::TrainState {
        step: 0,
        tokens_seen: 0,
        seed: tc.seed,
        elapsed_secs: 0.0,
        tokenizer: tokenizer.fingerprint(),
        loss_scale: None,
    };
    let metrics_path = run_dir.join("metrics.csv");
    if resume && let Some(dir) = checkpoint::latest(run_dir)? {
        let ckpt = checkpoint::read(&dir)?;
        if ckpt.state.tokenizer != state.tokenizer {
            return Err(Error::Checkpoint {
                path: dir,
                message: format!(
                    "was trained with tokenizer {}, this config uses {}",
                    ckpt.state.tokenizer, state.tokenizer
                ),
            });
        }
        model = ckpt.load_model::<B>(device)?;
        optimizer.load_state(&ckpt.optimizer_tensors()?, ckpt.state.step, device);
        state = ckpt.state;
        truncate_metrics(&metrics_path, state.step)?;
    } else {
        atomic_write(&metrics_path, |f| writeln!(f, "{METRICS_HEADER}"))?;
    }
    model = model.with_compute_dtype(tc.mixed_precision.compute_dtype());
    if tc.mixed_precision != MixedPrecision::F16 {
        state.loss_scale = None;
    } else if state.loss_scale.is_none() {
        state.loss_scale = Some(LossScale::new(tc.loss_scale));
    }
    let config_path = run_dir.join("config.toml");
    atomic_write(&config_path, |f| f.write_all(config.to_toml().as_bytes()))?;

    on_event(Event::Started {
        start_step: state.step,
        max_steps: tc.max_steps,
        params: config.model.num_params(),
        trainable_params: trainable_params(&model, config),
        train_tokens: train_split.tokens(),
        val_tokens: val_split.tokens(),
    });

    if let Dataset::Rows(rows) = &train_split {
        on_event(Event::Packed {
            examples: rows.examples,
            truncated: rows.truncated,
            skipped: rows.skipped,
        });
    }

    let session_start = Instant::now();
    let elapsed_before = state.elapsed_secs;
    let mut window_start = Instant::now();
    let mut window_tokens = 0u64;
    let mut last_train_loss = f64::NAN;
    let mut last_val: Option<EvalReport> = None;
    let tokens_per_step = tc.tokens_per_step() as u64;
    let mut last_grad_squares = BTreeMap::new();

    while state.step < tc.max_steps {
        let lr = learning_rate(state.step, tc.warmup_steps, tc.max_steps, tc.lr, tc.min_lr);
        let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
        let mut loss_sum = 0.0;
        // The gradients come out multiplied by the loss scale (1 unless f16).
        let loss_scale = state.loss_scale.map_or(1.0, |s| s.scale);
        for micro in 0..tc.grad_accum {
            let batch =
                train_split.train_batch(tc.seed, state.step, micro, tc.batch_size, tc.seq_len)?;
            let scale = 1.0 / tc.grad_accum as f64;
            if let Some(plan) = tc.recompute_plan() {
                loss_sum += recompute::loss_and_grads(
                    &model,
                    &batch,
                    scale * loss_scale,
                    plan,
                    &mut accumulator,
                    device,
                ) / loss_scale;
            } else {
                let (loss, _) = batch_loss(&model, &batch, device);
                let loss = loss.mul_scalar(scale);
                loss_sum += loss.clone().into_scalar().elem::<f64>();
                let loss = if loss_scale == 1.0 {
                    loss
                } else {
                    loss.mul_scalar(loss_scale)
                };
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                accumulator.accumulate(&model, grads);
            }
        }
        let grads = accumulator.grads();
        if !loss_sum.is_finite() {
            return Err(Error::NonFinite {
                step: state.step + 1,
                what: "the training loss",
                value: loss_sum,
            });
        }
        let grad_norm = global_grad_norm::<B, _>(&model, &grads) / loss_scale;
        // Under loss scaling an overflow skips the step (AdamW's step count still advances, so
        // that it stays the run's step count); elsewhere it ends the run.
        let apply = match state.loss_scale.as_mut() {
            // Overflowing at scale 1 is not the scale: the run diverged.
            Some(scaler) if !grad_norm.is_finite() && scaler.scale <= 1.0 => {
                return Err(Error::NonFinite {
                    step: state.step + 1,
                    what: "the gradient norm at loss scale 1",
                    value: grad_norm,
                });
            }
            Some(scaler) => scaler.update(grad_norm.is_finite()),
            None if !grad_norm.is_finite() => {
                return Err(Error::NonFinite {
                    step: state.step + 1,
                    what: "the gradient norm",
                    value: grad_norm,
                });
            }
            None => true,
        };
        let scale = if tc.grad_clip > 0.0 && grad_norm > tc.grad_clip {
            tc.grad_clip / grad_norm
        } else {
            1.0
        };
        if state.step + 1 == tc.max_steps {
            last_grad_squares = grad_squares_by_path::<B, _>(&model, &grads)
                .into_iter()
                .map(|(path, (sum, n))| (path, (sum / (loss_scale * loss_scale), n)))
                .collect();
        }
        if apply {
            model = optimizer.step(lr, model, grads, scale / loss_scale);
        } else {
            optimizer.skip();
        }

        state.step += 1;
        state.tokens_seen += tokens_per_step;
        state.elapsed_secs = elapsed_before + session_start.elapsed().as_secs_f64();
        window_tokens += tokens_per_step;
        last_train_loss = loss_sum;

        let validate_now =
            state.step.is_multiple_of(tc.eval_interval) || state.step == tc.max_steps;
        let val_report = if validate_now {
            // Through the autodiff model, not `model.valid()`: on the CPU backends the fused ops
            // run only under autodiff, and the inner backend's composed ops made each validation
            // about four times a training step's forward. Untracked (`no_grad`, which shares the
            // weights), so that no graph is recorded: a tracked forward's graph stays alive until
            // the next backward, and raised the default run's peak host memory tenfold.
            let report = eval::evaluate(
                &model.clone().no_grad(),
                &val_batches,
                val_split.bytes_per_token(),
            );
            on_event(Event::Validated {
                step: state.step,
                report: report.clone(),
            });
            last_val = Some(report.clone());
            Some(report)
        } else {
            None
        };
        if state.step.is_multiple_of(tc.log_interval) || validate_now || state.step == 1 {
            let secs = window_start.elapsed().as_secs_f64();
            let metrics = StepMetrics {
                step: state.step,
                tokens: state.tokens_seen,
                lr,
                train_loss: loss_sum,
                grad_norm,
                tokens_per_sec: window_tokens as f64 / secs.max(1e-9),
                elapsed_sec: state.elapsed_secs,
            };
            append_metrics(&metrics_path, &metrics, val_report.as_ref())?;
            on_event(Event::Step(metrics));
            window_start = Instant::now();
            window_tokens = 0;
        }
        if state.step.is_multiple_of(tc.checkpoint_interval) || state.step == tc.max_steps {
            let dir = checkpoint::save(
                run_dir,
                &checkpoint::model_tensors(&model, config),
                &optimizer.state_tensors(),
                &state,
                config,
                tc.keep_checkpoints,
            )?;
            on_event(Event::Checkpointed {
                step: state.step,
                dir,
            });
        }
    }

    let model = model.valid();
    let val = match last_val {
        Some(v) => v,
        None => eval::evaluate(&model, &val_batches, val_split.bytes_per_token()),
    };
    let trainable_mib = mib(param_bytes_where(&model, &|p| is_trainable(p, config)));
    let summary = TrainSummary {
        name: config.name.clone(),
        steps: state.step,
        tokens: state.tokens_seen,
        params: config.model.num_params(),
        final_train_loss: last_train_loss,
        val_loss: val.loss,
        val_perplexity: val.perplexity,
        val_bits_per_byte: val.bits_per_byte,
        tokens_per_sec: state.tokens_seen as f64 / state.elapsed_secs.max(1e-9),
        wall_secs: state.elapsed_secs,
        backend: backend_name.to_owned(),
        trainable_params: trainable_params(&model, config),
        peak_host_mib: peak_host_mib(),
        weights_mib: mib(param_bytes_where(&model, &|_| true)),
        trainable_mib,
        // AdamW keeps two moments per trained value, in the value's type.
        optimizer_mib: 2.0 * trainable_mib,
        machine: machine_name(),
        peak_device_mib: device_memory.and_then(DeviceMemorySampler::finish),
        loss_scale: state.loss_scale,
    };
    let mut depth = eval::depth_profile(&model, &val_batches);
    depth.set_gradients(&last_grad_squares);
    depth.write(run_dir)?;
    if let (Some(finetune), Some(lora)) = (&config.finetune, &config.lora) {
        let base = finetune.base.display().to_string();
        crate::io::peft::save_adapter(&model, lora, &base, &run_dir.join("adapter"))?;
    }
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::file(run_dir, e))?;
    atomic_write(&run_dir.join("summary.json"), |f| {
        f.write_all(json.as_bytes())
    })?;
    Ok((model, summary))
}

/// Parameters that train: the adapters of a LoRA run, all of them otherwise.
fn trainable_params<B: Backend>(model: &Llama<B>, config: &ExperimentConfig) -> usize {
    count_params_where(model, &|path| is_trainable(path, config))
}

fn is_trainable(path: &str, config: &ExperimentConfig) -> bool {
    config.lora.is_none() || path.contains(".lora.")
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The batch's mean loss over the targets it counts, and how many it counts.
pub fn batch_loss<B: Backend>(
    model: &Llama<B>,
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 1>, usize) {
    let (inputs, targets) = batch_tensors::<B>(batch, device);
    let logits = match &batch.coords {
        // ExperimentConfig::validate allows coordinates only for coord3d models.
        Some(coords) => model
            .forward_at(inputs, coords)
            .unwrap_or_else(|e| panic!("batch coordinates on this model: {e}")),
        None => model.forward(inputs),
    };
    logits_loss(logits, targets, batch, device)
}

/// The mean loss of `logits` over the targets `batch` counts (all of them, or those its loss
/// mask marks), and how many it counts.
pub fn logits_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 1>, usize) {
    if batch.loss_mask.is_empty() {
        return (cross_entropy(logits, targets), batch.batch * batch.seq);
    }
    let counted = batch.loss_mask.iter().filter(|&&m| m).count();
    let mask: Vec<f32> = batch
        .loss_mask
        .iter()
        .map(|&m| f32::from(u8::from(m)))
        .collect();
    let mask = Tensor::from_data(TensorData::new(mask, [batch.batch, batch.seq]), device);
    (cross_entropy_masked(logits, targets, mask), counted)
}

/// Turns a batch of ids into `[batch, seq]` input and target tensors.
pub fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let shape = [batch.batch, batch.seq];
    (
        ids_tensor(&batch.inputs, shape, device),
        ids_tensor(&batch.targets, shape, device),
    )
}

/// Token ids as a `[rows, cols]` integer tensor.
pub fn ids_tensor<B: Backend>(
    ids: &[u32],
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Tensor::from_data(TensorData::new(ids, shape), device)
}

fn append_metrics(path: &Path, m: &StepMetrics, val: Option<&EvalReport>) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let val = val.map(|v| format!("{:.6}", v.loss)).unwrap_or_default();
    writeln!(
        file,
        "{},{},{:.6e},{:.6},{},{:.6},{:.1},{:.3}",
        m.step, m.tokens, m.lr, m.train_loss, val, m.grad_norm, m.tokens_per_sec, m.elapsed_sec
    )
    .map_err(|e| Error::io(path, e))
}

/// Drops metric rows after `step`, so a resumed run's file reads like an uninterrupted one.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| format!("{METRICS_HEADER}\n"));
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, line)| {
            *i == 0
                || line
                    .split(',')
                    .next()
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|s| s <= step)
        })
        .map(|(_, l)| l)
        .collect();
    atomic_write(path, |f| writeln!(f, "{}", kept.join("\n")))
}
