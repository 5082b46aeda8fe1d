//! `strata bench-attention`: forward and forward + backward time and peak memory of one
//! attention layer's sequence mixing (queries, keys and values given) at several sequence
//! lengths: dense causal attention, sequence-block attention and coord3d's block multi-scale
//! pruning, with ratios to dense at each length. Peak memory is the host heap's (CPU backends
//! only). A variant that fails at a length (e.g. out of device memory) is recorded as NaN.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::backend::AutodiffBackend;
use strata::io::atomic_write;
use strata::nn::attention::dense_causal;
use strata::nn::coord3d::{Bms, MAX_SCORES_PER_PASS, bms_attention, bms_attention_masked};
use strata::nn::seq_block::seq_block_attention;

use crate::backend::BackendArgs;
use crate::bench::median;
use crate::{dispatch, memory};

#[derive(clap::Args)]
pub struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048,4096")]
    seq: Vec<usize>,
    /// Tokens per block of the sequence-block variants.
    #[arg(long, default_value_t = 64)]
    block_len: usize,
    /// Summaries each query sees in the sequence-block variants (0: every earlier block); none
    /// leaves sequence-block attention out.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0,4")]
    summaries: Vec<usize>,
    /// Attention kinds besides the sequence-block ones: dense, coord3d.
    #[arg(long, value_delimiter = ',', default_value = "dense,coord3d")]
    kinds: Vec<String>,
    /// Tokens per block of coord3d's pruning.
    #[arg(long, default_value_t = 128)]
    coord3d_block_len: usize,
    /// Local window of coord3d's pruning, in blocks.
    #[arg(long, default_value_t = 4)]
    coord3d_window: usize,
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
        "variant,seq_len,block_len,summaries,window,batch,heads,head_dim,ms_fwd,ms_fwd_bwd,peak_mib,\
         time_vs_dense,memory_vs_dense,backend,machine,max_rel_err_vs_masked\n",
    );
    print!("{csv}");
    let machine = strata::train::machine_name();
    let bms = Bms::new(args.coord3d_block_len, args.coord3d_window);
    let mut variants = Vec::new();
    for kind in &args.kinds {
        match kind.as_str() {
            "dense" => variants.push(Variant::Dense),
            "coord3d" => variants.push(Variant::Coord3d(bms)),
            other => anyhow::bail!("--kinds: unknown attention kind {other:?} (dense, coord3d)"),
        }
    }
    variants.extend(args.summaries.iter().map(|&s| Variant::SeqBlock(s)));
    for &seq in &args.seq {
        let shape = [args.batch, args.heads, seq, args.head_dim];
        let mut dense = (f64::NAN, f64::NAN);
        for variant in &variants {
            // CubeCL indexes with 32-bit integers: a larger score tensor is computed wrongly
            // without an error (seen: dense attention at 64k tokens "ran" in 84 ms), so on GPU
            // backends such a point is not run.
            let scores = score_elements(args, seq, variant);
            let too_large = !host_memory && scores > u32::MAX as usize;
            if too_large {
                eprintln!("skipped {variant:?} at {seq} tokens: {scores} score elements");
            }
            let run = |backward: bool| {
                if too_large {
                    return (f64::NAN, f64::NAN);
                }
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    time::<B>(args, shape, variant, backward, host_memory, device)
                }))
                .unwrap_or((f64::NAN, f64::NAN))
            };
            let (ms_fwd, _) = run(false);
            let (ms, peak_mib) = run(true);
            let check = match variant {
                Variant::Coord3d(bms) if !too_large => {
                    check_against_masked::<B>(args, seq, *bms, device)
                }
                _ => f64::NAN,
            };
            if *variant == Variant::Dense {
                dense = (ms, peak_mib);
            }
            let (name, block_len, summaries, window) = match variant {
                Variant::Dense => ("dense", 0, 0, 0),
                Variant::SeqBlock(s) => ("seq_block", args.block_len, *s, 0),
                Variant::Coord3d(bms) => ("coord3d", bms.block_len, 0, bms.window),
            };
            let line = format!(
                "{name},{seq},{block_len},{summaries},{window},{},{},{},{ms_fwd:.3},{ms:.3},{peak_mib:.1},{:.3},{:.3},{},\"{machine}\",{check:.2e}\n",
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

/// Elements of the largest intermediate, the attention scores of one pass.
fn score_elements(args: &Args, seq: usize, variant: &Variant) -> usize {
    let rows_and_heads = args.batch * args.heads;
    match variant {
        // Query rows go in passes of at most MAX_SCORES_PER_PASS scores (one row at least).
        Variant::Dense => (rows_and_heads * seq * seq)
            .min(MAX_SCORES_PER_PASS)
            .max(rows_and_heads * seq),
        Variant::SeqBlock(_) => {
            let blocks = seq.div_ceil(args.block_len);
            rows_and_heads * blocks * args.block_len * (args.block_len + blocks)
        }
        // Query blocks go in passes of at most MAX_SCORES_PER_PASS scores (one block at least).
        Variant::Coord3d(bms) => {
            let blocks = seq.div_ceil(bms.block_len);
            let width = (0..blocks)
                .map(|i| bms.kept_blocks(i).len())
                .max()
                .unwrap_or(1);
            let per_block = rows_and_heads * bms.block_len * width * bms.block_len;
            (per_block * blocks).min(MAX_SCORES_PER_PASS).max(per_block)
        }
    }
}

/// Largest |Δ| between the gathered BMS path and the dense masked one, relative to the largest
/// output, on the first 2,048 tokens (random inputs, this backend and dtype).
fn check_against_masked<B: AutodiffBackend>(
    args: &Args,
    seq: usize,
    bms: Bms,
    device: &B::Device,
) -> f64 {
    let n = seq.min(2048);
    let shape = [args.batch, args.heads, n, args.head_dim];
    let [q, k, v] =
        [0; 3].map(|_| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), device));
    let positions: Vec<usize> = (0..n).collect();
    let want = bms_attention_masked(q.clone(), k.clone(), v.clone(), &positions, &positions, bms);
    let got = bms_attention(q, k, v, bms);
    let scale = want.clone().abs().max().into_scalar().elem::<f64>();
    let err = (got - want).abs().max().into_scalar().elem::<f64>();
    err / scale
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Dense,
    SeqBlock(usize),
    Coord3d(Bms),
}

/// Median milliseconds of `args.rounds` timed runs (after one untimed) of the forward pass, or
/// of forward + backward, and the peak host heap above the inputs (MiB; NaN off the CPU).
fn time<B: AutodiffBackend>(
    args: &Args,
    shape: [usize; 4],
    variant: &Variant,
    backward: bool,
    host_memory: bool,
    device: &B::Device,
) -> (f64, f64) {
    let mut times = Vec::new();
    let mut peak_mib = f64::NAN;
    for round in 0..=args.rounds {
        let inputs: Vec<Tensor<B, 4>> = (0..3)
            .map(|_| {
                let x = Tensor::random(shape, Distribution::Normal(0.0, 1.0), device);
                if backward { x.require_grad() } else { x }
            })
            .collect();
        let _ = inputs[2].to_data();
        let before = memory::reset_peak();
        let start = Instant::now();
        let [q, k, v] = [inputs[0].clone(), inputs[1].clone(), inputs[2].clone()];
        let out = match *variant {
            Variant::Dense => dense_causal(q, k, v),
            Variant::SeqBlock(summaries) => seq_block_attention(q, k, v, args.block_len, summaries),
            Variant::Coord3d(bms) => bms_attention(q, k, v, bms),
        };
        if backward {
            let grads = out.sum().backward();
            // Reading a gradient back waits for the work on asynchronous backends.
            let _ = inputs[0].grad(&grads).map(|g| g.into_data());
        } else {
            let _ = out.sum().into_data();
        }
        let secs = start.elapsed().as_secs_f64();
        if round > 0 {
            times.push(secs * 1e3);
            if host_memory {
                peak_mib = (memory::peak() - before) as f64 / (1 << 20) as f64;
            }
        }
    }
    (median(&mut times), peak_mib)
}
