//! `strata`: the experiment runner. Each verb is a thin file over the library.

mod backend;
mod bench;
mod bench_attention;
mod bench_decode;
mod bench_gguf;
mod bench_matmul;
mod bench_suite;
mod eval;
mod export;
mod finetune;
mod generate;
mod import;
mod kernel_trace;
mod memory;
mod merge;
mod report;
mod sweep;
mod train;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

/// Training allocates and frees many activation-sized buffers every step. By default glibc's
/// malloc serves each buffer over 128 KiB with its own mmap and unmaps it on free, so every step
/// faults the same pages in again (about 10 % of a CPU training step here). Keep them instead.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Train, evaluate and sample language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config.
    Train(train::Args),
    /// Fine-tune a trained model (LoRA adapters or every weight) from a TOML config.
    Finetune(train::Args),
    /// A Hugging Face folder or GGUF file as a Strata run directory.
    Import(import::Args),
    /// Fold LoRA adapters into their base model and save it as a run directory.
    Merge(merge::Args),
    /// Validation loss, perplexity and bits per byte of a checkpoint.
    Eval(eval::Args),
    /// Write a trained model as a GGUF file for llama.cpp.
    Export(export::Args),
    /// Sample text from a checkpoint.
    Generate(generate::Args),
    /// The benchmark suites (train, attention, infer, lora) as CSV files, with peers where installed.
    Bench(bench_suite::Args),
    /// Training throughput (tokens/s) of a config's model on random tokens, as JSON.
    BenchTrain(bench::Args),
    /// Forward + backward time and memory of dense against sequence-block attention, as CSV.
    BenchAttention(bench_attention::Args),
    /// Run a grid (and random draws) of configs from one sweep file; resumes where it stopped.
    Sweep(sweep::Args),
    /// A Markdown report with tables and plots over finished runs.
    Report(report::Args),
    /// Per-token KV-cache decoding latency of several configs' models, with ratios, as CSV.
    BenchDecode(bench_decode::Args),
    /// Prefill and decode tokens/s of the block engine on llama GGUF files, as CSV.
    BenchGguf(bench_gguf::Args),
    /// Each GPU matmul kernel timed on a config's training-step products, as JSON lines.
    BenchMatmul(bench_matmul::Args),
}

fn main() {
    keep_freed_buffers();
    let cli = Cli::parse();
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if let Err(err) = strata::nn::fused::kernel::check_environment() {
        eprintln!("error: {err}");
        std::process::exit(2);
    }
    let result = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Import(args) => import::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench_suite::run(args),
        Command::BenchTrain(args) => bench::run(args),
        Command::BenchDecode(args) => bench_decode::run(args),
        Command::BenchGguf(args) => bench_gguf::run(args),
        Command::BenchMatmul(args) => bench_matmul::run(args),
        Command::Report(args) => report::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Export(args) => export::run(args),
        Command::BenchAttention(args) => bench_attention::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
