//! `strata bench-attention`: forward + backward time and peak memory of one attention layer's
//! sequence mixing (queries, keys and values given) at several sequence lengths, dense causal
//! attention against sequence-block attention, with ratios to dense at each length. Peak memory
//! is the host heap's (CPU backends only).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use strata::io::atomic_write;
use strata::nn::attention::dense_causal;
use strata::nn::seq_block::seq_block_attention;

use crate::backend::BackendArgs;
use crate::bench::median;
use crate::bench_decode::machine_name;
use crate::{dispatch, memory};

#[derive(clap::Args)]
pub struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048,4096")]
    seq: Vec<usize>,
    /// Tokens per block of the sequence-block variants.
    #[arg(long, default_value_t = 64)]
    block_len: usize,
    /// Summaries each query sees in the sequence-block variants (0: every earlier block).
    #[arg(long, value_delimiter = ',', default_value = "0,4")]
    summaries: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 6)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed repetitions per point (after one untimed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// CSV to write (atomically); printed to stdout either way.
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

pub fn run(args: Args) -> Result<()> {
    dispatch!(autodiff, args.backend, |B, device| run_with::<B>(
        &args, &device
    ))
}

fn run_with<B: AutodiffBackend>(args: &Args, device: &B::Device) -> Result<()> {
    let host_memory = args.backend.backend == "flex" || args.backend.backend == "ndarray";
    let mut csv = String::from(
        "variant,seq_len,block_len,summaries,batch,heads,head_dim,ms_fwd_bwd,peak_mib,time_vs_dense,memory_vs_dense,backend,machine\n",
    );
    let machine = machine_name();
    let mut variants = vec![("dense", 0)];
    variants.extend(args.summaries.iter().map(|&s| ("seq_block", s)));
    for &seq in &args.seq {
        let shape = [args.batch, args.heads, seq, args.head_dim];
        let mut dense = (f64::NAN, f64::NAN);
        for &(variant, summaries) in &variants {
            let mut times = Vec::new();
            let mut peak_mib = f64::NAN;
            for round in 0..=args.rounds {
                let inputs: Vec<Tensor<B, 4>> = (0..3)
                    .map(|_| {
                        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad()
                    })
                    .collect();
                let _ = inputs[2].to_data();
                let before = memory::reset_peak();
                let start = Instant::now();
                let [q, k, v] = [inputs[0].clone(), inputs[1].clone(), inputs[2].clone()];
                let out = match variant {
                    "dense" => dense_causal(q, k, v),
                    _ => seq_block_attention(q, k, v, args.block_len, summaries),
                };
                let grads = out.sum().backward();
                // Reading a gradient back waits for the work on asynchronous backends.
                let _ = inputs[0].grad(&grads).map(|g| g.into_data());
                let secs = start.elapsed().as_secs_f64();
                if round > 0 {
                    times.push(secs * 1e3);
                    if host_memory {
                        peak_mib = (memory::peak() - before) as f64 / (1 << 20) as f64;
                    }
                }
            }
            let ms = median(&mut times);
            if variant == "dense" {
                dense = (ms, peak_mib);
            }
            let line = format!(
                "{variant},{seq},{},{summaries},{},{},{},{ms:.3},{peak_mib:.1},{:.3},{:.3},{},\"{machine}\"\n",
                if variant == "dense" {
                    0
                } else {
                    args.block_len
                },
                args.batch,
                args.heads,
                args.head_dim,
                ms / dense.0,
                peak_mib / dense.1,
                args.backend.label(),
            );
            print!("{line}");
            csv += &line;
        }
    }
    if let Some(out) = &args.out {
        atomic_write(out, |f| f.write_all(csv.as_bytes()))?;
    }
    Ok(())
}
