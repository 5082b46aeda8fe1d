//! The `strata` binary end to end on a tiny config: train, resume past the end, eval, generate,
//! and the errors a user sees for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn strata(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn workspace(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("corpus")).unwrap();
    for (i, line) in [
        "To be, or not to be, that is the question. ",
        "All the world's a stage. ",
        "What's in a name? ",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(dir.join("corpus").join(format!("{i}.txt")), line.repeat(30)).unwrap();
    }
    std::fs::write(
        dir.join("tiny.toml"),
        r#"
name = "tiny"
[model]
d_model = 32
n_layers = 1
n_heads = 2
n_kv_heads = 1
ffn_hidden = 64
max_seq_len = 32
[data]
path = "corpus"
validation = ["2.txt"]
[train]
batch_size = 4
seq_len = 32
max_steps = 6
warmup_steps = 2
log_interval = 2
eval_interval = 3
eval_batches = 2
checkpoint_interval = 3
sample_tokens = 20
sample_prompt = "To be"
"#,
    )
    .unwrap();
    dir
}

#[test]
fn train_eval_generate() {
    let dir = workspace("flow");
    let out = strata(&["train", "tiny.toml", "--run-dir", "run"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("step 6 validation loss") && log.contains("--- sample 1 ---"),
        "{log}"
    );
    for file in [
        "config.toml",
        "metrics.csv",
        "summary.json",
        "checkpoints/latest",
        "checkpoints/step-0000006/model.safetensors",
    ] {
        assert!(dir.join("run").join(file).is_file(), "missing {file}");
    }
    let metrics = std::fs::read_to_string(dir.join("run/metrics.csv")).unwrap();
    assert!(
        metrics
            .starts_with("step,tokens,lr,train_loss,val_loss,grad_norm,tokens_per_sec,elapsed_sec")
    );

    // Raising max_steps on resume continues from step 6.
    let out = strata(
        &["train", "--resume", "run", "--set", "train.max_steps=9"],
        &dir,
    );
    assert!(
        out.status.success() && text(&out).contains("resuming at step 6"),
        "{}",
        text(&out)
    );

    let out = strata(&["eval", "run"], &dir);
    assert!(
        out.status.success() && text(&out).contains("bits/byte"),
        "{}",
        text(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/eval.json")).unwrap()).unwrap();
    assert!(report["loss"].as_f64().unwrap() > 0.0);

    let out = strata(
        &[
            "generate",
            "run",
            "--prompt",
            "What",
            "--max-tokens",
            "10",
            "--temperature",
            "0",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("What"));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = workspace("errors");
    let cases: [(&[&str], &str); 5] = [
        (&["train", "missing.toml"], "missing.toml"),
        (
            &["train", "tiny.toml", "--set", "model.n_kv_heads=3"],
            "model.n_kv_heads = 3: must divide model.n_heads",
        ),
        (
            &["train", "tiny.toml", "--set", "model.residual=mystery"],
            "unknown variant `mystery`",
        ),
        (
            &["train", "tiny.toml", "--backend", "tpu"],
            "compiled backends",
        ),
        (
            &["eval", "corpus"],
            "neither a checkpoint folder nor a run directory",
        ),
    ];
    for (args, expected) in cases {
        let out = strata(args, &dir);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(text(&out).contains(expected), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains("panicked"), "{args:?} panicked");
    }
}

#[test]
fn report_export_and_their_errors() {
    let dir = workspace("report");
    for seed in ["1", "2"] {
        let out = strata(
            &[
                "train",
                "tiny.toml",
                "--set",
                &format!("train.seed={seed}"),
                "--run-dir",
                &format!("runs/s{seed}"),
            ],
            &dir,
        );
        assert!(out.status.success(), "{}", text(&out));
    }

    // Two seeds of one config form one group.
    let out = strata(
        &["report", "runs", "-o", "rep/report.md", "--title", "Tiny"],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let report = std::fs::read_to_string(dir.join("rep/report.md")).unwrap();
    assert!(
        report.starts_with("# Tiny") && report.contains("| tiny | 2 |"),
        "{report}"
    );
    for figure in ["val_loss_tokens", "val_loss_time", "depth_input_rms"] {
        let svg = std::fs::read_to_string(dir.join(format!("rep/report/{figure}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{figure}");
        let png = std::fs::read(dir.join(format!("rep/report/{figure}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{figure}.png is not a PNG"
        );
        assert!(
            report.contains(&format!("(report/{figure}.png)")),
            "{figure} not linked"
        );
    }
    // The HTML report carries its figures inside.
    let html = std::fs::read_to_string(dir.join("rep/report.html")).unwrap();
    assert!(
        html.contains("<table>") && html.contains("src=\"data:image/svg+xml;base64,"),
        "report.html"
    );
    assert!(!html.contains("src=\"report/"), "report.html links a file");

    let out = strata(
        &["export", "runs/s1", "--type", "q8_0", "-o", "tiny.gguf"],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = strata(
        &[
            "generate",
            "tiny.gguf",
            "--prompt",
            "What",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("What"));

    let out = strata(
        &["export", "runs/s1", "--type", "q3_k", "-o", "x.gguf"],
        &dir,
    );
    assert!(
        !out.status.success() && text(&out).contains("--type q3_k"),
        "{}",
        text(&out)
    );
    assert!(!dir.join("x.gguf").exists());

    std::fs::write(dir.join("runs/s2/metrics.csv"), "step,tokens\n1,2\n").unwrap();
    let out = strata(&["report", "runs", "-o", "rep2/report.md"], &dir);
    assert!(
        !out.status.success() && text(&out).contains("metrics.csv: no column elapsed_sec"),
        "{}",
        text(&out)
    );
    let out = strata(&["report", "runs", "-o", "rep3/report.html"], &dir);
    assert!(
        !out.status.success() && text(&out).contains(".md"),
        "{}",
        text(&out)
    );
}

#[test]
fn finetune_merge_export() {
    let dir = workspace("finetune");
    let out = strata(
        &[
            "train",
            "tiny.toml",
            "--set",
            "model.max_seq_len=64",
            "--run-dir",
            "base",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut lines = String::new();
    for word in [
        "be", "not", "stage", "name", "world", "question", "all", "what",
    ] {
        lines.push_str(&format!(
            "{}\n",
            serde_json::json!({"prompt": format!("upper: {word}"), "response": word.to_uppercase()})
        ));
    }
    std::fs::write(dir.join("clean.jsonl"), &lines).unwrap();
    lines.push_str("{\"prompt\": \"missing response\"}\n");
    std::fs::write(dir.join("upper.jsonl"), lines).unwrap();
    std::fs::write(
        dir.join("lora.toml"),
        r#"
name = "lora"
[finetune]
base = "base"
[lora]
rank = 2
targets = ["q", "v", "down"]
[data]
path = "upper.jsonl"
format = "instruction"
chat_template = "alpaca"
val_fraction = 0.25
[train]
batch_size = 2
seq_len = 64
max_steps = 4
warmup_steps = 1
eval_interval = 2
eval_batches = 1
checkpoint_interval = 2
sample_tokens = 5
"#,
    )
    .unwrap();

    // The malformed last line is named, then skipped when asked.
    let out = strata(&["finetune", "lora.toml", "--run-dir", "lora"], &dir);
    assert!(
        !out.status.success()
            && text(&out).contains("upper.jsonl")
            && text(&out).contains("line 9"),
        "{}",
        text(&out)
    );
    let out = strata(
        &[
            "finetune",
            "lora.toml",
            "--set",
            "data.skip_malformed=true",
            "--run-dir",
            "lora",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("trained)") && text(&out).contains("1 malformed line skipped"),
        "{}",
        text(&out)
    );
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(dir.join("lora").join(file).is_file(), "missing {file}");
    }

    let out = strata(&["merge", "lora", "-o", "merged"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let out = strata(&["eval", "merged"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    // Held-out response loss of a model on the instruction data (it must run).
    let score = |model: &str| {
        let out = strata(
            &[
                "eval",
                model,
                "--data",
                "clean.jsonl",
                "--instruction",
                "alpaca",
                "--seq-len",
                "64",
                "-o",
                model,
            ],
            &dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{model}.json"))).unwrap(),
        )
        .unwrap();
        report["loss"].as_f64().unwrap()
    };
    score("base");
    // The same adapter applied by export gives the merged model's file.
    for (model, adapter, file) in [
        ("merged", None, "merged.gguf"),
        ("base", Some("lora/adapter"), "adapted.gguf"),
    ] {
        let mut args = vec!["export", model, "--type", "f32", "-o", file];
        if let Some(adapter) = adapter {
            args.extend(["--adapter", adapter]);
        }
        let out = strata(&args, &dir);
        assert!(out.status.success(), "{}", text(&out));
    }
    // Tensor by tensor, the two files hold the same bytes; the base's differ.
    let tensors = |file: &str| -> Vec<(String, Vec<u8>)> {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let header = strata::gguf::read_header(&bytes, Path::new(file)).unwrap();
        (0..header.tensors.len())
            .map(|i| {
                (
                    header.tensors[i].0.name.clone(),
                    header.tensor_bytes(&bytes, i).unwrap().to_vec(),
                )
            })
            .collect()
    };
    let adapted = tensors("adapted.gguf");
    assert_eq!(tensors("merged.gguf"), adapted);
    let out = strata(
        &["export", "base", "--type", "f32", "-o", "base.gguf"],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let base = tensors("base.gguf");
    let changed: Vec<&String> = base
        .iter()
        .zip(&adapted)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| &a.0)
        .collect();
    // q, v and down of the one layer carry adapters; nothing else changes.
    assert_eq!(
        changed,
        [
            "blk.0.attn_q.weight",
            "blk.0.attn_v.weight",
            "blk.0.ffn_down.weight"
        ]
    );
    // With --lora-out the adapters go to a GGUF adapter file (q, v, down: A and B each) and the
    // base file is the base's, byte for byte.
    let out = strata(
        &[
            "export",
            "base",
            "--adapter",
            "lora/adapter",
            "--type",
            "f32",
            "-o",
            "unmerged.gguf",
            "--lora-out",
            "adapter.gguf",
        ],
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(tensors("unmerged.gguf"), base);
    let names: Vec<String> = tensors("adapter.gguf").into_iter().map(|t| t.0).collect();
    assert_eq!(
        names,
        [
            "blk.0.attn_q.weight.lora_a",
            "blk.0.attn_q.weight.lora_b",
            "blk.0.attn_v.weight.lora_a",
            "blk.0.attn_v.weight.lora_b",
            "blk.0.ffn_down.weight.lora_a",
            "blk.0.ffn_down.weight.lora_b"
        ]
    );
    let out = strata(
        &[
            "export",
            "base",
            "--type",
            "f32",
            "-o",
            "x.gguf",
            "--lora-out",
            "y.gguf",
        ],
        &dir,
    );
    assert!(
        !out.status.success() && text(&out).contains("no LoRA adapters"),
        "{}",
        text(&out)
    );

    // The block engine and the dequantized model generate the same greedy text from the file.
    let greedy = |engine: &str| {
        let out = strata(
            &[
                "generate",
                "merged.gguf",
                "--engine",
                engine,
                "--prompt",
                "ROMEO.",
                "--temperature",
                "0",
                "--max-tokens",
                "24",
            ],
            &dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from_blocks = greedy("blocks");
    assert!(from_blocks.len() > "ROMEO.\n".len(), "{from_blocks:?}");
    assert_eq!(from_blocks, greedy("burn"));

    // A GGUF file imports as a run directory that evaluates like the model it came from.
    let out = strata(&["import", "merged.gguf", "-o", "imported"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(score("imported"), score("merged"));

    let out = strata(&["finetune", "tiny.toml"], &dir);
    assert!(
        !out.status.success() && text(&out).contains("[finetune]"),
        "{}",
        text(&out)
    );
    let out = strata(&["merge", "base", "-o", "x"], &dir);
    assert!(
        !out.status.success() && text(&out).contains("no adapters"),
        "{}",
        text(&out)
    );
}

/// The sweep file of `sweep_resumes_and_reports`: two learning rates × two seeds.
const SWEEP: &str = r#"
name = "lrs"
base = "tiny.toml"
[set]
"train.sample_tokens" = 0
[grid]
"train.lr" = [1e-3, 3e-3]
"train.seed" = [1, 2]
"#;

#[test]
fn sweep_resumes_and_reports() {
    let dir = workspace("sweep");
    std::fs::write(dir.join("sweep.toml"), SWEEP).unwrap();
    let names = [
        "lr=1e-3,seed=1",
        "lr=1e-3,seed=2",
        "lr=3e-3,seed=1",
        "lr=3e-3,seed=2",
    ];

    let out = strata(&["sweep", "sweep.toml", "--dry-run"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    for name in names {
        assert!(
            text(&out).contains(&format!("{name} [new]")),
            "{}",
            text(&out)
        );
    }
    assert!(!dir.join("runs/lrs").exists(), "a dry run trains nothing");

    let out = strata(&["sweep", "sweep.toml"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let summary = |name: &str| -> serde_json::Value {
        let path = dir.join("runs/lrs").join(name).join("summary.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    for name in names {
        let config =
            std::fs::read_to_string(dir.join("runs/lrs").join(name).join("config.toml")).unwrap();
        let (lr, seed) = (&name[3..7], &name[13..]);
        assert!(
            config.contains(&format!("seed = {seed}")),
            "{name}: {config}"
        );
        assert!(
            config.contains(&format!("lr = {}", lr.parse::<f64>().unwrap())),
            "{name}"
        );
        // Seeds of one learning rate share a config name: the report's groups.
        assert_eq!(summary(name)["name"], format!("lrs-lr={lr}"));
        assert_eq!(summary(name)["steps"], 6);
    }

    // Interrupt one run after its step-3 checkpoint: drop what step 6 wrote.
    let cut = dir.join("runs/lrs").join(names[2]);
    let finished = summary(names[2]);
    std::fs::remove_file(cut.join("summary.json")).unwrap();
    std::fs::remove_dir_all(cut.join("checkpoints/step-0000006")).unwrap();
    std::fs::write(cut.join("checkpoints/latest"), "step-0000003").unwrap();
    let untouched =
        std::fs::read(dir.join("runs/lrs").join(names[0]).join("summary.json")).unwrap();
    let out = strata(&["sweep", "sweep.toml"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert_eq!(log.matches("finished earlier, skipped").count(), 3, "{log}");
    assert!(log.contains("resuming at step 3"), "{log}");
    // Resuming replays the uninterrupted run exactly.
    assert_eq!(summary(names[2])["val_loss"], finished["val_loss"]);
    assert_eq!(
        std::fs::read(dir.join("runs/lrs").join(names[0]).join("summary.json")).unwrap(),
        untouched,
        "a finished run was redone"
    );

    // A folder as -o: report.md, report.html and report/ inside it.
    let out = strata(&["report", "runs/lrs", "-o", "rep"], &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.join("rep/report.html").exists());
    let report = std::fs::read_to_string(dir.join("rep/report.md")).unwrap();
    assert!(
        report.contains("| lrs-lr=1e-3 | 2 |") && report.contains("| lrs-lr=3e-3 | 2 |"),
        "{report}"
    );
    assert!(dir.join("rep/report/val_loss_tokens.png").exists());
    assert!(
        report.contains("| run | `train.lr` | `train.seed` |"),
        "{report}"
    );

    // A changed sweep file does not silently continue a run started under the old one.
    std::fs::remove_file(cut.join("summary.json")).unwrap();
    std::fs::write(
        dir.join("sweep.toml"),
        SWEEP.replace(
            "sample_tokens\" = 0",
            "sample_tokens\" = 0\n\"train.max_steps\" = 9",
        ),
    )
    .unwrap();
    let out = strata(&["sweep", "sweep.toml"], &dir);
    assert!(
        !out.status.success() && text(&out).contains("different config"),
        "{}",
        text(&out)
    );

    // Bad sweep files name the key.
    for (body, expected) in [
        ("[grid]\n\"train.nope\" = [1]", "nope"),
        ("[grid]\n\"train.lr\" = []", "grid.\"train.lr\""),
        (
            "[random]\n\"train.lr\" = { log_uniform = [0, 1] }",
            "random.\"train.lr\"",
        ),
        ("[extra]\nx = 1", "`extra`: unknown key"),
    ] {
        std::fs::write(
            dir.join("bad.toml"),
            format!("base = \"tiny.toml\"\n{body}\n"),
        )
        .unwrap();
        let out = strata(&["sweep", "bad.toml", "--dry-run"], &dir);
        assert!(
            !out.status.success() && text(&out).contains(expected),
            "{body}: {}",
            text(&out)
        );
    }
}
