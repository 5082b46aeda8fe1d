//! `strata bench-matmul CONFIG --backend cuda --dtype bf16`: each matmul kernel the linear
//! layers can use on a GPU backend (`STRATA_MATMUL`), timed on every product of the config's
//! training step (the forward `x·W` and backward's `dY·Wᵀ` and `Xᵀ·dY`, at the step's rows),
//! checked against Burn's own product, one JSON line per kernel and product. The numbers say
//! which kernel to choose and how far each product is from the device's matmul ceiling.

use std::path::PathBuf;

use anyhow::Result;
use burn::tensor::backend::Backend;
use strata::config::ExperimentConfig;

use crate::backend::BackendArgs;
use crate::dispatch;

#[derive(clap::Args)]
pub struct Args {
    config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Kernels to time (comma-separated); all of them by default.
    #[arg(long, value_delimiter = ',')]
    kernels: Vec<String>,
    /// Timed runs of each product (the median is reported), after two warm-up runs.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: Args) -> Result<()> {
    let config = ExperimentConfig::load(&args.config, &args.overrides)?;
    dispatch!(plain, args.backend, |B, device| run_with::<B>(
        &config, &args, &device
    ))
}

#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
fn run_with<B: Backend>(_: &ExperimentConfig, _: &Args, _: &B::Device) -> Result<()> {
    anyhow::bail!("bench-matmul times GPU kernels: build with --features cuda or wgpu")
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn run_with<B: Backend>(config: &ExperimentConfig, args: &Args, device: &B::Device) -> Result<()> {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use burn::tensor::{DType, ElementConversion, Tensor};
    use strata::nn::fused::kernel::{MATMUL_KERNELS as KERNELS, matmul_with};

    let kernels: Vec<String> = if args.kernels.is_empty() {
        KERNELS.iter().map(|k| k.to_string()).collect()
    } else {
        args.kernels.clone()
    };
    for kernel in &kernels {
        if !KERNELS.contains(&kernel.as_str()) {
            anyhow::bail!(
                "--kernels {kernel}: not a matmul kernel; expected some of {}",
                KERNELS.join(", ")
            );
        }
    }
    let rms = |t: Tensor<B, 2>| {
        let squares = t.cast(DType::F32).powi_scalar(2).mean();
        squares.into_scalar().elem::<f64>().sqrt()
    };
    let rows = config.train.batch_size * config.train.seq_len;
    // The backend's own float type (`--dtype`).
    let dtype = <B::FloatElem as burn::tensor::Element>::dtype();
    for (d_in, d_out, count) in crate::bench::projection_shapes(config) {
        let products = crate::bench::step_products::<B>([rows, d_in, d_out], dtype, device);
        for (product, a, b) in products {
            let [m, k] = a.dims();
            let n = b.dims()[1];
            // Burn's product in f32 is the reference every kernel is checked against.
            let reference = a
                .clone()
                .cast(DType::F32)
                .matmul(b.clone().cast(DType::F32));
            let scale = rms(reference.clone());
            for kernel in &kernels {
                let run = || matmul_with(a.clone(), b.clone(), kernel);
                // A kernel whose launch panics (an unsupported instruction, say) is reported
                // like one that refuses the product.
                let first = catch_unwind(AssertUnwindSafe(run))
                    .unwrap_or_else(|_| Err("panicked at launch".into()));
                let line = match first {
                    Err(reason) => serde_json::json!({ "error": reason }),
                    Ok(out) => {
                        let rms_error = rms(out.cast(DType::F32) - reference.clone());
                        let secs =
                            crate::bench::time_alone::<B>(device, args.repeats, &|| drop(run()));
                        serde_json::json!({
                            "secs": secs,
                            "tflops": 2.0 * (m * n * k) as f64 / secs / 1e12,
                            "relative_rms_error": rms_error / scale,
                        })
                    }
                };
                let mut record = serde_json::json!({
                    "kernel": kernel,
                    "backend": args.backend.label(),
                    "product": product,
                    "m": m,
                    "k": k,
                    "n": n,
                    "count": count,
                });
                record
                    .as_object_mut()
                    .expect("an object")
                    .extend(line.as_object().expect("an object").clone());
                println!("{record}");
            }
        }
    }
    Ok(())
}
