//! LoRA fine-tuning end to end on the CPU default: a tiny base trained on text, then adapters
//! trained on instruction data (loss on responses only) → the held-out response loss falls →
//! checkpoints hold only the adapters and resume exactly → the PEFT-layout adapter the run saves,
//! loaded onto the base, gives the run's logits → merged into the base, the same logits again.

use crate::common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use strata::backend::Cpu;
use strata::config::ExperimentConfig;
use strata::data::{Dataset, Split};
use strata::eval::evaluate;
use strata::io::params::{load_safetensors, named_params};
use strata::io::peft::load_adapter;
use strata::io::{checkpoint, load_model};
use strata::model::Llama;
use strata::tokenizer::ByteTokenizer;
use strata::train::{Event, ids_tensor, train};

type B = Autodiff<Cpu>;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-finetune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(
    config: &ExperimentConfig,
    dir: &Path,
    resume: bool,
    on_event: &mut dyn FnMut(Event),
) -> strata::Result<(Llama<Cpu>, strata::train::TrainSummary)> {
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

/// A base model: a few dozen steps on real English text.
fn train_base(root: &Path) -> PathBuf {
    let toml = format!(
        r#"
name = "base"
[model]
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_hidden = 64
max_seq_len = 64
tie_embeddings = false
[data]
path = "{}"
validation = ["doc3.txt"]
[train]
batch_size = 8
seq_len = 64
max_steps = 30
warmup_steps = 3
lr = 3e-3
eval_interval = 30
eval_batches = 2
checkpoint_interval = 30
"#,
        common::text_corpus("finetune-base").display()
    );
    let config = ExperimentConfig::from_toml(&toml, &[]).unwrap();
    let dir = root.join("base");
    run(&config, &dir, false, &mut |_| {}).unwrap();
    dir
}

/// Instruction data the base has never seen: "upper: word" → "WORD".
fn instructions(root: &Path) -> PathBuf {
    let words = "now is the winter of our discontent made glorious summer by this sun york \
                 and all clouds that lour upon house in deep bosom ocean buried friends romans \
                 countrymen lend me your ears come to bury caesar not praise him if music be food";
    let mut lines = String::new();
    for (i, word) in words.split_whitespace().enumerate() {
        for prefix in ["upper", "shout"] {
            let line = serde_json::json!({
                "prompt": format!("{prefix}: {word}"),
                "response": word.to_uppercase(),
            });
            lines.push_str(&format!("{line}\n"));
        }
        if i % 7 == 0 {
            lines.push_str(
                &serde_json::json!({"messages": [
                    {"role": "system", "content": "Answer in capitals."},
                    {"role": "user", "content": word},
                    {"role": "assistant", "content": word.to_uppercase()},
                ]})
                .to_string(),
            );
            lines.push('\n');
        }
    }
    let path = root.join("upper.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

fn finetune_config(base: &Path, data: &Path, extra: &[&str]) -> ExperimentConfig {
    let toml = format!(
        r#"
name = "lora"
[finetune]
base = "{}"
[lora]
rank = 4
alpha = 8
targets = ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]
[data]
path = "{}"
format = "instruction"
chat_template = "alpaca"
val_fraction = 0.2
[train]
batch_size = 4
seq_len = 64
max_steps = 40
warmup_steps = 4
lr = 1e-2
min_lr = 1e-3
weight_decay = 0.0
eval_interval = 20
eval_batches = 4
checkpoint_interval = 10
"#,
        base.display(),
        data.display()
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    ExperimentConfig::from_toml(&toml, &overrides).unwrap()
}

fn logits(model: &Llama<Cpu>, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    model
        .forward(ids_tensor(ids, [1, ids.len()], &device))
        .into_data()
        .to_vec()
        .unwrap()
}

fn max_relative_gap(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn lora_finetune_learns_saves_peft_adapters_and_merges() {
    let root = scratch("e2e");
    let base_dir = train_base(&root);
    let data = instructions(&root);
    let config = finetune_config(&base_dir, &data, &[]);
    // The fine-tuning run takes its architecture from the base.
    assert_eq!(config.model.max_seq_len, 64);
    assert!(!config.model.tie_embeddings);

    let device = Default::default();
    let base = load_model::<Cpu>(&base_dir, &device).unwrap().model;
    let val = Dataset::load(&config.data, &ByteTokenizer, Split::Validation, 64).unwrap();
    let batches = val.validation_batches(4, 4, 64).unwrap();
    let before = evaluate(&base, &batches, val.bytes_per_token());

    let dir = root.join("lora");
    let mut trainable = 0;
    let (model, summary) = run(&config, &dir, false, &mut |event| {
        if let Event::Started {
            trainable_params, ..
        } = event
        {
            trainable = trainable_params;
        }
    })
    .unwrap();
    // r · (d_in + d_out) per projection: 2 layers × (q 32+32, k 32+16, v 32+16, o 32+32,
    // gate 32+64, up 32+64, down 64+32) + lm_head (32 + 259), all × r = 4.
    let per_layer = 64 + 48 + 48 + 64 + 96 + 96 + 96;
    assert_eq!(trainable, 4 * (2 * per_layer + 32 + 259));
    // The memory split in summary.json: f32 adapters, two f32 AdamW moments each, and the
    // weights (base + adapters) of the model as stored.
    let mib = |values: usize| (values * 4) as f64 / (1 << 20) as f64;
    assert_eq!(summary.trainable_params, trainable);
    assert_eq!(summary.trainable_mib, mib(trainable));
    assert_eq!(summary.optimizer_mib, 2.0 * mib(trainable));
    assert_eq!(
        summary.weights_mib,
        mib(config.model.num_params() + trainable)
    );
    assert!(
        summary
            .peak_host_mib
            .is_some_and(|m| m > summary.weights_mib)
    );
    assert!(
        summary.val_loss < 0.5 * before.loss,
        "held-out response loss {} did not fall well below the base's {}",
        summary.val_loss,
        before.loss
    );

    // Checkpoints hold the adapters only; the base is read from finetune.base.
    let latest = checkpoint::latest(&dir).unwrap().unwrap();
    let (saved, _) = load_safetensors(&latest.join("model.safetensors")).unwrap();
    assert!(!saved.is_empty() && saved.keys().all(|k| k.contains(".lora.")));

    // The run reloads (base + adapters) with the logits it ended with.
    let ids: Vec<u32> = "### Instruction:\nupper: sun\n\n### Response:\n"
        .bytes()
        .map(u32::from)
        .collect();
    let want = logits(&model, &ids);
    let reloaded = load_model::<Cpu>(&dir, &device).unwrap().model;
    assert_eq!(logits(&reloaded, &ids), want);

    // The PEFT-layout adapter on a freshly loaded base gives the same logits.
    let base = load_model::<Cpu>(&base_dir, &device).unwrap().model;
    let (lora, with_adapter) = load_adapter(base, &dir.join("adapter")).unwrap();
    assert_eq!((lora.rank, lora.alpha), (4, 8.0));
    assert!(max_relative_gap(&logits(&with_adapter, &ids), &want) < 1e-6);

    // Merged into the base weights: same logits up to rounding, no adapter tensors left.
    let merged = with_adapter.merged_plain();
    assert!(named_params(&merged).keys().all(|k| !k.contains(".lora.")));
    let gap = max_relative_gap(&logits(&merged, &ids), &want);
    assert!(gap < 1e-5, "merged logits differ by {gap} relative");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn killed_and_resumed_lora_run_matches_uninterrupted_run() {
    let root = scratch("resume");
    let base_dir = train_base(&root);
    let data = instructions(&root);
    let config = finetune_config(&base_dir, &data, &["train.max_steps=20"]);
    let (straight, _) = run(&config, &root.join("straight"), false, &mut |_| {}).unwrap();
    let killed = root.join("killed");
    let died = catch_unwind(AssertUnwindSafe(|| {
        let _ = run(&config, &killed, false, &mut |event| {
            if let Event::Checkpointed { step: 10, .. } = event {
                panic!("simulated kill");
            }
        });
    }));
    assert!(died.is_err());
    let (resumed, _) = run(&config, &killed, true, &mut |_| {}).unwrap();
    assert_eq!(named_params(&straight), named_params(&resumed));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_model_section_that_disagrees_with_the_base_is_an_error() {
    let root = scratch("conflict");
    let base_dir = train_base(&root);
    let data = instructions(&root);
    let toml = format!(
        "name = \"x\"\n[finetune]\nbase = \"{}\"\n[lora]\nrank = 2\n[model]\nd_model = 48\n[data]\npath = \"{}\"\nformat = \"instruction\"\n",
        base_dir.display(),
        data.display()
    );
    let err = ExperimentConfig::from_toml(&toml, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model") && err.contains("finetune.base"),
        "{err}"
    );
    let err = ExperimentConfig::from_toml("name = \"x\"\n[lora]\nrank = 2\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("lora") && err.contains("[finetune]"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
