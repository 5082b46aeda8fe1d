//! `strata train CONFIG [--set key=value ...] [--resume RUN_DIR]`

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use strata::config::ExperimentConfig;
use strata::data::{CoordsKind, line_breaks};
use strata::infer::{Decoding, Sampler, SamplerConfig, generate};
use strata::train::{Event, train};

use crate::backend::BackendArgs;
use crate::dispatch;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment config (TOML). With --resume it may be left out: the run's saved config is used.
    config: Option<PathBuf>,
    /// Override a config key: --set train.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Parent folder of new run directories.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
    /// Use exactly this run directory instead of runs/<name>-<timestamp>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
}

impl Args {
    pub fn load_config(&self) -> Result<ExperimentConfig> {
        Ok(match (&self.config, &self.resume) {
            (Some(path), _) => ExperimentConfig::load(path, &self.overrides)?,
            (None, Some(run_dir)) => {
                ExperimentConfig::load(&run_dir.join("config.toml"), &self.overrides)?
            }
            (None, None) => bail!("give a config file, or --resume RUN_DIR"),
        })
    }
}

pub fn run(args: Args) -> Result<()> {
    let config = args.load_config()?;
    run_config(args, config)
}

pub fn run_config(args: Args, config: ExperimentConfig) -> Result<()> {
    let run_dir = match (&args.resume, &args.run_dir) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => args.runs.join(format!("{}-{}", config.name, timestamp())),
    };
    train_in(&config, &run_dir, args.resume.is_some(), &args.backend)
}

/// Trains `config` in `run_dir` (continuing from its latest checkpoint when `resume` is set) and
/// prints samples from the result.
pub fn train_in(
    config: &ExperimentConfig,
    run_dir: &Path,
    resume: bool,
    backend: &BackendArgs,
) -> Result<()> {
    dispatch!(autodiff, backend, |B, device| run_with::<B>(
        config,
        run_dir,
        resume,
        &backend.label(),
        &device
    ))
}

fn run_with<B: AutodiffBackend>(
    config: &ExperimentConfig,
    run_dir: &Path,
    resume: bool,
    backend: &str,
    device: &B::Device,
) -> Result<()> {
    let tokenizer = config.tokenizer.load()?;
    let interactive = std::io::stdout().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut on_event = |event: Event| match event {
        Event::Started {
            start_step,
            max_steps,
            params,
            trainable_params,
            train_tokens,
            val_tokens,
        } => {
            let trained = if trainable_params < params {
                format!(" ({trainable_params} trained)")
            } else {
                String::new()
            };
            println!(
                "run {} | {params} parameters{trained} | {train_tokens} train / {val_tokens} validation tokens | backend {backend}",
                run_dir.display()
            );
            if start_step > 0 {
                println!("resuming at step {start_step}");
            }
            if interactive {
                let b = ProgressBar::new(max_steps as u64).with_position(start_step as u64);
                b.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar = Some(b);
            }
        }
        Event::Packed {
            examples,
            truncated,
            skipped,
        } => {
            let mut line = format!("instruction data: {examples} training examples");
            if truncated > 0 {
                line.push_str(&format!(", {truncated} cut to fit train.seq_len"));
            }
            if skipped > 0 {
                let s = if skipped == 1 { "" } else { "s" };
                line.push_str(&format!(", {skipped} malformed line{s} skipped"));
            }
            println!("{line}");
        }
        Event::Step(m) => match &bar {
            Some(b) => {
                b.set_position(m.step as u64);
                b.set_message(format!(
                    "loss {:.4} | {:.0} tok/s",
                    m.train_loss, m.tokens_per_sec
                ));
            }
            None => println!(
                "step {} loss {:.4} lr {:.2e} grad_norm {:.3} tok/s {:.0} elapsed {:.1}s",
                m.step, m.train_loss, m.lr, m.grad_norm, m.tokens_per_sec, m.elapsed_sec
            ),
        },
        Event::Validated { step, report } => {
            let line = format!(
                "step {step} validation loss {:.4} | perplexity {:.2} | bits/byte {:.4}",
                report.loss, report.perplexity, report.bits_per_byte
            );
            match &bar {
                Some(b) => b.println(line),
                None => println!("{line}"),
            }
        }
        Event::Checkpointed { .. } => {}
    };
    let (model, summary) = train::<B>(
        config,
        tokenizer.as_ref(),
        run_dir,
        resume,
        backend,
        device,
        &mut on_event,
    )
    .with_context(|| format!("training in {}", run_dir.display()))?;
    if let Some(b) = bar {
        b.finish();
    }
    println!(
        "done: {} steps, {} tokens, {:.0} tok/s, {:.1}s | validation loss {:.4}, perplexity {:.2}, bits/byte {:.4}",
        summary.steps,
        summary.tokens,
        summary.tokens_per_sec,
        summary.wall_secs,
        summary.val_loss,
        summary.val_perplexity,
        summary.val_bits_per_byte
    );

    let tc = &config.train;
    let mut prompt = tokenizer.bos_id().into_iter().collect::<Vec<_>>();
    prompt.extend(tokenizer.encode(&tc.sample_prompt)?);
    // Samples are placed as the training data placed tokens.
    let breaks =
        (config.data.coords == CoordsKind::LineCol).then(|| line_breaks(tokenizer.as_ref()));
    for seed in 0..3 {
        let mut sampler = Sampler::new(SamplerConfig {
            seed,
            ..SamplerConfig::default()
        });
        let ids = generate(
            &model,
            &prompt,
            tc.sample_tokens,
            &mut sampler,
            Decoding {
                line_breaks: breaks.as_deref(),
                ..Decoding::cached(tokenizer.eos_id())
            },
            |_| {},
        )?;
        println!(
            "--- sample {} ---\n{}{}",
            seed + 1,
            tc.sample_prompt,
            tokenizer.decode(&ids)?
        );
    }
    Ok(())
}

/// Today's UTC date as YYYY-MM-DD.
pub fn today() -> String {
    let t = timestamp();
    format!("{}-{}-{}", &t[..4], &t[4..6], &t[6..8])
}

/// UTC time as YYYYMMDD-HHMMSS (civil-from-days, H. Hinnant's algorithm).
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
