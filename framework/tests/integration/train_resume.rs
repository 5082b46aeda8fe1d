//! End-to-end training on a small real-text corpus: a run killed after a checkpoint and resumed
//! ends with exactly the loss curve and weights of an uninterrupted run; NaN stops a run and
//! keeps the last good checkpoint; two runs of one config agree.

use crate::common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::error::Error;
use strata::io::{checkpoint, params::named_params};
use strata::tokenizer::ByteTokenizer;
use strata::train::{Event, train};

type B = Autodiff<Cpu>;

fn config(test: &str, extra: &[&str]) -> ExperimentConfig {
    let base = format!(
        r#"
name = "tiny"
[model]
vocab_size = 259
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 64
max_seq_len = 32
[data]
path = "{}"
validation = ["doc3.txt"]
[train]
batch_size = 4
seq_len = 32
grad_accum = 2
max_steps = 12
warmup_steps = 3
lr = 3e-3
log_interval = 1
eval_interval = 4
eval_batches = 2
checkpoint_interval = 4
keep_checkpoints = 2
"#,
        common::text_corpus(test).display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    ExperimentConfig::from_toml(&base, &overrides).unwrap()
}

fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Trains `config` in `dir` on the CPU backend with the byte tokenizer.
fn run(
    config: &ExperimentConfig,
    dir: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(Event),
) -> strata::Result<(strata::model::Llama<Cpu>, strata::train::TrainSummary)> {
    train::<B>(
        config,
        &ByteTokenizer,
        dir,
        resume,
        "flex",
        &Default::default(),
        on_event,
    )
}

/// metrics.csv without the timing columns, which differ between runs.
fn curve(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(6).collect::<Vec<_>>().join(","))
        .collect()
}

#[test]
fn killed_and_resumed_run_matches_uninterrupted_run() {
    check_resume("resume", &[]);
}

#[test]
fn resume_is_exact_with_attnres_seq_block_coord3d_and_kv_share() {
    check_resume(
        "resume-block",
        &["model.residual=\"attnres_block\"", "model.attnres_blocks=2"],
    );
    check_resume("resume-full", &["model.residual=\"attnres_full\""]);
    // f16 compute with a loss scale that overflows the first steps: the scale and the skipped
    // steps travel in the checkpoint.
    check_resume(
        "resume-f16",
        &["train.mixed_precision=\"f16\"", "train.loss_scale=1048576"],
    );
    check_resume(
        "resume-seq-block",
        &[
            "model.attention=\"seq_block\"",
            "model.seq_block_len=8",
            "model.seq_block_summaries=2",
        ],
    );
    check_resume(
        "resume-coord3d",
        &[
            "model.attention=\"coord3d\"",
            "model.coord3d_block_len=4",
            "model.coord3d_window=2",
            "model.kv_share=2",
        ],
    );
    check_resume(
        "resume-line-col",
        &[
            "model.attention=\"coord3d\"",
            "model.coord3d_block_len=4",
            "data.coords=\"line_col\"",
            "train.sample_tokens=0",
        ],
    );
}

/// Kills a run right after a checkpoint, resumes it, and checks that it ends exactly as an
/// uninterrupted run of the same config does.
fn check_resume(tag: &str, overrides: &[&str]) {
    let config = config(tag, overrides);
    let straight = run_dir(&format!("{tag}-straight"));
    let (model_a, summary_a) = run(&config, &straight, false, &mut |_| {}).unwrap();

    // Die abruptly right after the step-8 checkpoint is written (no cleanup runs).
    let killed = run_dir(&format!("{tag}-killed"));
    let died = catch_unwind(AssertUnwindSafe(|| {
        let _ = run(&config, &killed, false, &mut |event| {
            if let Event::Checkpointed { step: 8, .. } = event {
                panic!("simulated kill");
            }
        });
    }));
    assert!(died.is_err());
    let mut resumed_from = None;
    let (model_b, summary_b) = run(&config, &killed, true, &mut |event| {
        if let Event::Started { start_step, .. } = event {
            resumed_from = Some(start_step);
        }
    })
    .unwrap();
    assert_eq!(resumed_from, Some(8));
    assert_eq!(curve(&straight), curve(&killed));
    assert_eq!(curve(&straight).len(), 1 + 12);
    assert_eq!(summary_a.val_loss, summary_b.val_loss);
    assert_eq!(summary_a.loss_scale, summary_b.loss_scale);
    if let Some(scaler) = summary_a.loss_scale {
        eprintln!("{tag}: {scaler:?}");
    }
    assert_eq!(
        named_params::<Cpu, _>(&model_a),
        named_params::<Cpu, _>(&model_b)
    );
    // keep_checkpoints = 2
    let kept: Vec<_> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert_eq!(kept.len(), 2);
}

#[test]
fn training_lowers_validation_loss_and_is_reproducible() {
    let config = config(
        "learn",
        &[
            "train.max_steps=40",
            "train.eval_interval=40",
            "train.checkpoint_interval=40",
        ],
    );
    let mut first_val = None;
    let dir = run_dir("learn");
    let (_, summary) = run(&config, &dir, false, &mut |event| {
        if let Event::Step(m) = &event
            && m.step == 1
        {
            first_val = Some(m.train_loss);
        }
    })
    .unwrap();
    let initial = first_val.unwrap();
    assert!(
        (initial - 259f64.ln()).abs() < 0.3,
        "initial loss {initial} should be near ln(259)"
    );
    assert!(
        summary.val_loss < initial - 1.5,
        "validation loss {} did not fall from {initial}",
        summary.val_loss
    );
    let again = run_dir("learn-again");
    let (_, summary2) = run(&config, &again, false, &mut |_| {}).unwrap();
    assert_eq!(curve(&dir), curve(&again));
    assert_eq!(summary.val_loss, summary2.val_loss);
}

#[test]
fn non_finite_loss_stops_and_keeps_last_good_checkpoint() {
    // An absurd learning rate without clipping blows the weights up within a few steps.
    let config = config(
        "nan",
        &[
            "train.lr=1e12",
            "train.min_lr=0",
            "train.warmup_steps=1",
            "train.grad_clip=0",
            "train.checkpoint_interval=1",
        ],
    );
    let dir = run_dir("nan");
    let err = run(&config, &dir, false, &mut |_| {}).err().unwrap();
    let Error::NonFinite { step, .. } = err else {
        panic!("expected NonFinite, got {err}")
    };
    assert!(err.to_string().contains("last good checkpoint"));
    let last = checkpoint::latest(&dir)
        .unwrap()
        .expect("a checkpoint before the failure");
    let ckpt = checkpoint::read(&last).unwrap();
    assert!(ckpt.state.step < step);
    ckpt.load_model::<Cpu>(&Default::default()).unwrap();
}
