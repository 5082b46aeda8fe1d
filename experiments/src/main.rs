//! `strata`: the experiment runner. Each verb is a thin file over the library.

mod backend;
mod bench;
mod eval;
mod generate;
mod train;

use clap::{Parser, Subcommand};

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
    /// Validation loss, perplexity and bits per byte of a checkpoint.
    Eval(eval::Args),
    /// Sample text from a checkpoint.
    Generate(generate::Args),
    /// Training throughput (tokens/s) of a config's model on random tokens, as JSON.
    BenchTrain(bench::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::BenchTrain(args) => bench::run(args),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
