//! Export to GGUF: the file has what llama.cpp's `llama` loader requires, and loading it back
//! (dequantized, permutation undone) gives the logits of the exported model. The exported
//! files and our logits are left in `target/gguf-check/` for `scripts/check/gguf_reference.py`
//! (an independent numpy forward pass over the GGUF in llama.cpp's conventions) and
//! `scripts/check/gguf_llama_cpp.py` (a real llama.cpp), which `.ci/run` runs after the tests.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;

use strata::backend::Cpu;
use strata::gguf::export::{architecture, export_llama};
use strata::gguf::import::load_llama_gguf;
use strata::gguf::layout::{permute_rotary, unpermute_rotary};
use strata::gguf::{GgmlType, Metadata, Quantization, Value, ValueType, read_header};
use strata::io::params::{HostTensor, assign_params, named_params};
use strata::model::{Llama, ModelConfig};
use strata::tokenizer::TokenizerConfig;
use strata::train::ids_tensor;

type B = Cpu;

fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_hidden: 128,
        max_seq_len: 64,
        tie_embeddings: false,
        ..ModelConfig::default()
    }
}

/// BOS, then the bytes of a sentence: what llama.cpp's tokenizer gives for it with our vocabulary.
fn prompt() -> Vec<u32> {
    std::iter::once(256)
        .chain("Hello, world! The quick brown fox.".bytes().map(u32::from))
        .collect()
}

fn logits(model: &Llama<B>, ids: &[u32]) -> Vec<f32> {
    let out = model.forward(ids_tensor(ids, [1, ids.len()], &Default::default()));
    out.into_data().convert::<f32>().to_vec().unwrap()
}

/// A model with fixed pseudo-random weights (uniform, std 0.15: logits with a spread of a few
/// units, as in a trained model; gains near 1), the same in every run, so the quantization
/// errors below are fixed numbers rather than draws.
fn deterministic_model(config: &ModelConfig) -> Llama<B> {
    deterministic_model_with_std(config, 0.15)
}

/// [`deterministic_model`] with weights of standard deviation `std`.
fn deterministic_model_with_std(config: &ModelConfig, std: f32) -> Llama<B> {
    deterministic_like(config.init::<B>(&Default::default()), std)
}

fn rms(v: &[f32]) -> f32 {
    (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/gguf-check");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn exports_load_back_to_the_same_model_in_every_type() {
    let config = config();
    let model = deterministic_model(&config);
    let ids = prompt();
    let want = logits(&model, &ids);
    let spread = rms(&want);
    assert!(spread > 0.5, "logits too flat to test anything ({spread})");
    let dir = out_dir();
    let mut expected = serde_json::Map::new();
    expected.insert("ids".into(), serde_json::json!(ids));
    expected.insert("logits".into(), serde_json::json!(want));
    expected.insert("vocab".into(), serde_json::json!(config.vocab_size));
    let (continuation, margins) = greedy(&model, &ids, 16);
    expected.insert("greedy".into(), serde_json::json!(continuation));
    expected.insert("greedy_margins".into(), serde_json::json!(margins));
    for (ty, tolerance) in [
        // RMS of the logit error over the RMS of the logits. f32 is exact up to summation order;
        // the others carry their weights' rounding through two layers of a random model, whose
        // logits have no margin to absorb it. The weights are fixed, so these are fixed numbers
        // (measured: 1.0e-3 f16, 7.3e-3 bf16, 2.0e-2 q8_0, 0.30 q4, 0.15 q5); the bounds leave
        // 1.5-2x, and scrambled blocks (a wrong nibble order, say) would give about 1.4.
        (GgmlType::F32, 1e-6),
        (GgmlType::F16, 2e-3),
        (GgmlType::BF16, 1.5e-2),
        (GgmlType::Q8_0, 4e-2),
        (GgmlType::Q4_0, 0.45),
        (GgmlType::Q4_1, 0.45),
        (GgmlType::Q5_0, 0.25),
        (GgmlType::Q5_1, 0.25),
    ] {
        let path = dir.join(format!("tiny-{}.gguf", ty.name()));
        let summary =
            export_llama(&model, &config, &TokenizerConfig::Byte, "tiny", ty, &path).unwrap();
        assert_eq!(summary.tensors.len(), 1 + 2 * 9 + 2);
        let bytes = std::fs::read(&path).unwrap();
        let header = read_header(&bytes, &path).unwrap();
        // The keys and types llama.cpp's loader checks strictly.
        assert_eq!(
            header.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        for key in [
            "llama.context_length",
            "llama.embedding_length",
            "llama.block_count",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.dimension_count",
        ] {
            assert!(
                header.get(key).and_then(Value::as_u32).is_some(),
                "{key} must be a u32"
            );
        }
        assert!(matches!(
            header.get("llama.attention.layer_norm_rms_epsilon"),
            Some(Value::F32(_))
        ));
        match header.get("tokenizer.ggml.tokens") {
            Some(Value::Array(_, tokens)) => assert_eq!(tokens.len(), config.vocab_size),
            other => panic!("tokens: {other:?}"),
        }
        let (loaded_config, back, _) = load_llama_gguf::<B>(&path, &Default::default()).unwrap();
        assert_eq!(
            (
                loaded_config.d_model,
                loaded_config.kv_heads(),
                loaded_config.tie_embeddings
            ),
            (config.d_model, config.kv_heads(), config.tie_embeddings)
        );
        let got = logits(&back, &ids);
        let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let relative = rms(&err) / rms(&want);
        eprintln!("{}: relative RMS logit error {relative:.2e}", ty.name());
        assert!(
            relative <= tolerance,
            "{}: relative RMS logit error {relative}",
            ty.name()
        );
    }
    let json = serde_json::to_string(&serde_json::Value::Object(expected)).unwrap();
    std::fs::write(dir.join("tiny-logits.json"), json).unwrap();
}

/// `n` greedy tokens after `ids` (recomputing the whole sequence each step), with the gap
/// between the chosen token's logit and the runner-up's at each step.
fn greedy(model: &Llama<B>, ids: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut seq = ids.to_vec();
    let mut margins = Vec::new();
    let vocab = model.embed.weight.dims()[0];
    for _ in 0..n {
        let all = logits(model, &seq);
        let mut last: Vec<(usize, f32)> = all[all.len() - vocab..]
            .iter()
            .copied()
            .enumerate()
            .collect();
        last.sort_by(|a, b| b.1.total_cmp(&a.1));
        margins.push(last[0].1 - last[1].1);
        seq.push(last[0].0 as u32);
    }
    (seq[ids.len()..].to_vec(), margins)
}

#[test]
fn the_rotary_permutation_moves_rotate_half_pairs_next_to_each_other() {
    // One head of dim 4, one input column: HF rows [x0, x1, y0, y1] pair (x_i, y_i).
    let w = HostTensor {
        shape: vec![4, 1],
        values: vec![0.0, 1.0, 2.0, 3.0],
    };
    assert_eq!(permute_rotary(&w, 1, 4).values, vec![0.0, 2.0, 1.0, 3.0]);
    // And back, for two heads of dim 8 over three columns.
    let w = HostTensor {
        shape: vec![16, 3],
        values: (0..48).map(|v| v as f32).collect(),
    };
    assert_eq!(unpermute_rotary(&permute_rotary(&w, 2, 8), 2, 8), w);
}

/// Every model that is not a plain Llama is written as Strata's own architecture, `strata`: its
/// config as `strata.*` metadata, every parameter as a tensor. Read back, each is the same model:
/// the same config, and the same logits (f32: exactly up to summation order; q8_0: its
/// rounding, the bound of the plain model above). The coord3d + KV-sharing file is left for
/// `scripts/check/gguf_llama_cpp.py`, which checks that llama.cpp refuses it by architecture.
#[test]
fn custom_architectures_export_as_strata_and_load_back() {
    use strata::model::{AttentionKind, ResidualMode};
    let variants = [
        (
            "attnres-block",
            ResidualMode::AttnresBlock,
            AttentionKind::Dense,
            1,
        ),
        (
            "attnres-full",
            ResidualMode::AttnresFull,
            AttentionKind::Dense,
            1,
        ),
        (
            "seq-block",
            ResidualMode::Standard,
            AttentionKind::SeqBlock,
            1,
        ),
        (
            "coord3d-kv2",
            ResidualMode::Standard,
            AttentionKind::Coord3d,
            2,
        ),
    ];
    let ids = prompt();
    for (name, residual, attention, kv_share) in variants {
        let config = ModelConfig {
            residual,
            attnres_blocks: 2,
            attention,
            seq_block_len: 8,
            coord3d_block_len: 8,
            coord3d_window: 2,
            kv_share,
            ..config()
        };
        assert_eq!(architecture(&config), "strata");
        let model = deterministic_model(&config);
        let want = logits(&model, &ids);
        let params = named_params(&model);
        for (ty, tolerance) in [(GgmlType::F32, 1e-6), (GgmlType::Q8_0, 4e-2)] {
            let path = out_dir().join(format!("tiny-strata-{name}-{}.gguf", ty.name()));
            let summary =
                export_llama(&model, &config, &TokenizerConfig::Byte, name, ty, &path).unwrap();
            assert_eq!(
                summary.tensors.len(),
                params.len(),
                "{name}: one tensor per parameter"
            );
            let bytes = std::fs::read(&path).unwrap();
            let header = read_header(&bytes, &path).unwrap();
            assert_eq!(
                header.get("general.architecture").and_then(Value::as_str),
                Some("strata")
            );
            assert!(
                header.get("strata.residual").is_some() && header.get("strata.kv_share").is_some()
            );
            let (loaded_config, back, _) =
                load_llama_gguf::<B>(&path, &Default::default()).unwrap();
            assert_eq!(loaded_config, config, "{name}: the config read back");
            let got = logits(&back, &ids);
            let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let relative = rms(&err) / rms(&want);
            eprintln!(
                "{name} {}: relative RMS logit error {relative:.2e}",
                ty.name()
            );
            assert!(relative <= tolerance, "{name} {}: {relative}", ty.name());
        }
    }
    // A key this version's config does not have is named, with the file.
    let path = out_dir().join("tiny-strata-coord3d-kv2-f32.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let header = read_header(&bytes, &path).unwrap();
    let mut metadata = header.metadata.clone();
    metadata.push(("strata.coord3d_depth".into(), Value::U32(3)));
    let infos: Vec<_> = header.tensors.iter().map(|(t, _)| t.clone()).collect();
    let edited = out_dir().join("strata-unknown-key.gguf");
    strata::gguf::write_gguf(&edited, &metadata, &infos, |i| {
        Ok(header.tensor_bytes(&bytes, i).unwrap().to_vec())
    })
    .unwrap();
    let err = load_llama_gguf::<B>(&edited, &Default::default())
        .err()
        .expect("an unknown key loaded")
        .to_string();
    assert!(
        err.contains("coord3d_depth") && err.contains("strata-unknown-key.gguf"),
        "{err}"
    );
}

#[test]
fn loading_a_file_with_missing_or_foreign_metadata_names_the_key() {
    let config = config();
    let model = deterministic_model(&config);
    let path = out_dir().join("edit-source.gguf");
    export_llama(
        &model,
        &config,
        &TokenizerConfig::Byte,
        "x",
        GgmlType::F32,
        &path,
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header = read_header(&bytes, &path).unwrap();
    // Rewrite the file with one metadata entry changed or dropped, the tensors unchanged.
    let rewrite = |edit: &dyn Fn(&mut Metadata), name: &str| {
        let mut metadata = header.metadata.clone();
        edit(&mut metadata);
        let infos: Vec<_> = header.tensors.iter().map(|(t, _)| t.clone()).collect();
        let out = out_dir().join(name);
        strata::gguf::write_gguf(&out, &metadata, &infos, |i| {
            Ok(header.tensor_bytes(&bytes, i).unwrap().to_vec())
        })
        .unwrap();
        match load_llama_gguf::<B>(&out, &Default::default()) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e.to_string(),
        }
    };
    let err = rewrite(
        &|m| m.retain(|(k, _)| k != "llama.block_count"),
        "no-blocks.gguf",
    );
    assert!(
        err.contains("llama.block_count") && err.contains("no-blocks.gguf"),
        "{err}"
    );
    let err = rewrite(&|m| m[0].1 = Value::String("mamba".into()), "mamba.gguf");
    assert!(
        err.contains("general.architecture") && err.contains("mamba"),
        "{err}"
    );
    let err = rewrite(
        &|m| {
            for (k, v) in m.iter_mut() {
                if k == "tokenizer.ggml.tokens" {
                    *v = Value::Array(ValueType::String, vec![Value::String("a".into()); 259]);
                }
            }
        },
        "other-vocab.gguf",
    );
    assert!(err.contains("tokenizer"), "{err}");
}

/// A model with a Hugging Face byte-level BPE tokenizer (the fixture's tokenizer.json, 400 ids)
/// exports its tokenizer as llama.cpp's `gpt2` model with merges: read back, the file's
/// tokenizer gives the ids the tokenizer.json gives. The file is left for
/// `scripts/check/gguf_llama_cpp.py`, which has llama.cpp tokenize the same texts.
#[test]
fn hugging_face_bpe_tokenizers_export_with_their_merges() {
    let tokenizer_json = common::fixture("tokenizer/tokenizer.json");
    let tokenizer = TokenizerConfig::Hf {
        path: tokenizer_json.clone(),
    };
    let bpe_config = ModelConfig {
        vocab_size: 400,
        ..config()
    };
    let model = deterministic_model(&bpe_config);
    let path = out_dir().join("tiny-hf-bpe.gguf");
    export_llama(
        &model,
        &bpe_config,
        &tokenizer,
        "tiny-bpe",
        GgmlType::F32,
        &path,
    )
    .unwrap();

    use strata::tokenizer::Tokenizer;
    let hf = strata::tokenizer::HfTokenizer::from_file(&tokenizer_json).unwrap();
    let (_, loaded, from_gguf) = load_llama_gguf::<B>(&path, &Default::default()).unwrap();
    let texts = [
        "To be, or not to be",
        "outrageous fortune — naïve café!",
        "  spaces\tand\nlines 12345",
        "<s>Whether 'tis nobler</s>",
    ];
    let mut expected = Vec::new();
    for text in texts {
        let want = hf.encode(text).unwrap();
        assert_eq!(from_gguf.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(from_gguf.decode(&want).unwrap(), hf.decode(&want).unwrap());
        expected.push(serde_json::json!({"text": text, "ids": want}));
    }
    let ids = from_gguf.encode(texts[0]).unwrap();
    assert_eq!(logits(&loaded, &ids), logits(&model, &ids));
    std::fs::write(
        out_dir().join("tiny-hf-bpe.json"),
        serde_json::json!({"texts": expected}).to_string(),
    )
    .unwrap();

    // A tokenizer larger than the model's vocabulary is refused by name.
    let small = ModelConfig {
        vocab_size: 300,
        ..config()
    };
    let err = export_llama(
        &small.init::<B>(&Default::default()),
        &small,
        &tokenizer,
        "x",
        GgmlType::F32,
        &out_dir().join("refused.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("beyond the model's vocabulary"),
        "{err}"
    );
}

/// llama.cpp's k-quant presets on a model whose rows fill 256-value super-blocks, with 8 layers
/// so that the per-layer rules pick different types (`more_bits`: layers 0, 3, 6 and 7): each
/// tensor gets the type the preset names, and the file loads back to the model's logits within
/// the preset's rounding. Leaves `kq-f32.gguf` and `kq-PRESET.gguf` in target/gguf-check for
/// `scripts/check/gguf_kquants.py`, which has llama-quantize make the same presets from the f32
/// file and compares every tensor's type and bytes.
#[test]
fn k_quant_presets_pick_llama_cpp_types_and_load_back() {
    let config = ModelConfig {
        d_model: 256,
        n_layers: 8,
        ffn_hidden: 512,
        ..config()
    };
    // Four times the width of the tiny model: half its weight scale keeps each layer's gain.
    let model = deterministic_model_with_std(&config, 0.075);
    let ids = prompt();
    let want = logits(&model, &ids);
    assert!(rms(&want) > 0.5, "logits too flat to test anything");
    let dir = out_dir();
    let byte = TokenizerConfig::Byte;
    export_llama(
        &model,
        &config,
        &byte,
        "kq",
        GgmlType::F32,
        &dir.join("kq-f32.gguf"),
    )
    .unwrap();
    let mut report = serde_json::Map::new();
    report.insert("ids".into(), serde_json::json!(ids));
    report.insert("original".into(), serde_json::json!(want));
    let (q4, q5, q6) = (GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K);
    for (name, tolerance, file_type) in [
        // Relative RMS logit error. Eight random layers amplify weight rounding about sevenfold
        // (f16 gives 1.8e-3, q8_0 3.4e-2 here); measured 0.119 q6_k, 0.214 q5_k_m, 0.232
        // q5_k_s, 0.428 q4_k_m, 0.445 q4_k_s (fixed weights, so fixed numbers). The bounds leave
        // 1.5x; scrambled blocks give about 1.4.
        ("q6_k", 0.18, 18),
        ("q5_k_m", 0.33, 17),
        ("q5_k_s", 0.35, 16),
        ("q4_k_m", 0.65, 15),
        ("q4_k_s", 0.67, 14),
    ] {
        let path = dir.join(format!("kq-{name}.gguf"));
        let summary = export_llama(
            &model,
            &config,
            &byte,
            "kq",
            Quantization::parse(name).unwrap(),
            &path,
        )
        .unwrap();
        let types: HashMap<String, GgmlType> = summary.tensors.iter().cloned().collect();
        let layers = |tensor: &str, ty: GgmlType| -> Vec<usize> {
            (0..8)
                .filter(|i| types[&format!("blk.{i}.{tensor}.weight")] == ty)
                .collect()
        };
        assert_eq!(types["output.weight"], q6, "{name}");
        assert_eq!(types["blk.0.attn_norm.weight"], GgmlType::F32, "{name}");
        match name {
            "q6_k" => assert_eq!(layers("attn_q", q6).len(), 8),
            "q5_k_m" | "q4_k_m" => {
                assert_eq!(layers("attn_v", q6), [0, 3, 6, 7], "{name}");
                assert_eq!(layers("ffn_down", q6), [0, 3, 6, 7], "{name}");
                let base = if name == "q5_k_m" { q5 } else { q4 };
                assert_eq!(layers("attn_q", base).len(), 8, "{name}");
                assert_eq!(types["token_embd.weight"], base, "{name}");
            }
            "q5_k_s" => assert_eq!(layers("attn_v", q5).len(), 8),
            "q4_k_s" => {
                assert_eq!(layers("attn_v", q5), [0, 1, 2, 3]);
                assert_eq!(layers("ffn_down", q5), [0]);
                assert_eq!(layers("ffn_up", q4).len(), 8);
            }
            _ => unreachable!(),
        }
        let bytes = std::fs::read(&path).unwrap();
        let header = read_header(&bytes, &path).unwrap();
        assert_eq!(
            header.get("general.file_type").and_then(Value::as_u32),
            Some(file_type)
        );
        let (_, back, _) = load_llama_gguf::<B>(&path, &Default::default()).unwrap();
        let got = logits(&back, &ids);
        let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let relative = rms(&err) / rms(&want);
        eprintln!("{name}: relative RMS logit error {relative:.2e}");
        assert!(
            relative <= tolerance,
            "{name}: relative RMS logit error {relative}"
        );
        report.insert(name.into(), serde_json::json!(got));
    }
    let json = serde_json::to_string(&serde_json::Value::Object(report)).unwrap();
    std::fs::write(dir.join("kq-logits.json"), json).unwrap();
}

/// LoRA adapters written as a GGUF adapter file beside the base (adapters left out): rebuilding
/// each adapted matrix from the two files, base + (alpha/r)·B·A as llama.cpp computes it, gives
/// the merged model's exported tensor (1e-5 of its largest entry: f32 products summed in another
/// order), for plain LoRA on every target and rsLoRA. The files and the merged model's logits are
/// left for `scripts/check/gguf_llama_cpp.py`, which runs the base with `lora_path` in llama.cpp.
#[test]
fn lora_adapters_export_as_a_gguf_adapter_that_rebuilds_the_merged_model() {
    use strata::gguf::adapter::export_lora_adapter;
    use strata::gguf::dequantize;
    use strata::nn::lora::LoraConfig;

    let config = config();
    let dir = out_dir();
    for (name, lora) in [
        (
            "lora",
            LoraConfig {
                rank: 4,
                alpha: 8.0,
                targets: ["q", "k", "v", "o", "gate", "up", "down", "lm_head"]
                    .map(String::from)
                    .to_vec(),
                ..LoraConfig::default()
            },
        ),
        (
            "rslora",
            LoraConfig {
                rank: 8,
                alpha: 4.0,
                rslora: true,
                targets: vec!["q".into(), "v".into()],
                ..LoraConfig::default()
            },
        ),
    ] {
        // Random non-zero A and B (a fresh adapter's B is zero and would test nothing).
        let plain = config.init::<B>(&Default::default());
        let adapted = deterministic_like(plain.with_lora(&lora).unwrap(), 0.15);
        let base_path = dir.join(format!("{name}-base-f32.gguf"));
        let adapter_path = dir.join(format!("{name}-adapter.gguf"));
        let merged_path = dir.join(format!("{name}-merged-f32.gguf"));
        let tok = TokenizerConfig::Byte;
        export_llama(&adapted, &config, &tok, name, GgmlType::F32, &base_path).unwrap();
        let summary = export_lora_adapter(&adapted, &config, &lora, name, &adapter_path).unwrap();
        let merged = adapted.clone().merged_plain();
        export_llama(&merged, &config, &tok, name, GgmlType::F32, &merged_path).unwrap();

        let read = |path: &std::path::Path| {
            let bytes = std::fs::read(path).unwrap();
            let header = read_header(&bytes, path).unwrap();
            let tensors: HashMap<String, (Vec<u64>, Vec<f32>)> = header
                .tensors
                .iter()
                .enumerate()
                .map(|(i, (info, _))| {
                    let values = dequantize(info.ty, header.tensor_bytes(&bytes, i).unwrap());
                    (info.name.clone(), (info.dims.clone(), values.unwrap()))
                })
                .collect();
            (header, tensors)
        };
        let (adapter_header, adapter) = read(&adapter_path);
        let (_, base) = read(&base_path);
        let (_, want) = read(&merged_path);
        let names = |t: &HashMap<String, (Vec<u64>, Vec<f32>)>| {
            let mut n: Vec<String> = t.keys().cloned().collect();
            n.sort();
            n
        };
        assert_eq!(
            names(&base),
            names(&want),
            "{name}: the base file has the model's tensors"
        );
        assert_eq!(
            adapter_header.get("general.type").and_then(Value::as_str),
            Some("adapter")
        );
        let alpha = match adapter_header.get("adapter.lora.alpha") {
            Some(Value::F32(a)) => *a,
            other => panic!("adapter.lora.alpha: {other:?}"),
        };
        let mut adapted_tensors = 0;
        for (gguf, (dims, merged_rows)) in &want {
            let (Some((a_dims, a)), Some((b_dims, b))) = (
                adapter.get(&format!("{gguf}.lora_a")),
                adapter.get(&format!("{gguf}.lora_b")),
            ) else {
                assert_eq!(&base[gguf].1, merged_rows, "{name}: {gguf} has no adapter");
                continue;
            };
            adapted_tensors += 1;
            // ggml dims: W [d_in, d_out], A [d_in, r], B [r, d_out]; rows are the second.
            let (d_in, d_out, r) = (dims[0] as usize, dims[1] as usize, a_dims[1] as usize);
            assert_eq!(
                (a_dims[0], b_dims[0], b_dims[1]),
                (dims[0], a_dims[1], dims[1])
            );
            let scale = alpha / r as f32;
            let mut rebuilt = base[gguf].1.clone();
            for o in 0..d_out {
                for i in 0..d_in {
                    let ba: f32 = (0..r).map(|k| b[o * r + k] * a[k * d_in + i]).sum();
                    rebuilt[o * d_in + i] += scale * ba;
                }
            }
            let largest = merged_rows.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = rebuilt
                .iter()
                .zip(merged_rows)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst <= 1e-5 * largest, "{name}: {gguf}: {worst}");
        }
        assert_eq!(adapted_tensors * 2, summary.tensors.len());
        let ids = prompt();
        let expected = serde_json::json!({ "ids": ids, "logits": logits(&merged, &ids) });
        std::fs::write(
            dir.join(format!("{name}-logits.json")),
            expected.to_string(),
        )
        .unwrap();
    }
}

/// `model` with every parameter replaced by fixed pseudo-random values of standard deviation
/// `std` (norm gains near 1).
fn deterministic_like(model: Llama<B>, std: f32) -> Llama<B> {
    let mut uniform = common::uniform(0x853c49e6748fea9b);
    let params: HashMap<String, HostTensor> = named_params(&model)
        .into_iter()
        .map(|(name, mut t)| {
            let gain = name.ends_with("gamma");
            for v in &mut t.values {
                *v = if gain {
                    1.0 + 0.1 * uniform()
                } else {
                    std * 3f32.sqrt() * uniform()
                };
            }
            (name, t)
        })
        .collect();
    assign_params(model, &params, "deterministic".as_ref()).unwrap()
}

/// The block engine (weights left in the file's blocks, decoded a stretch at a time) computes
/// the model the dequantized Burn path computes from the same file: every type of the writer,
/// k-quant presets on 256-wide rows, tied and untied heads; all positions of the prompt at once,
/// then the same tokens through the KV cache a few at a time. Tolerance 1e-4 of the largest
/// logit: the same weights and f32 arithmetic, summed in another order.
#[test]
fn the_block_engine_runs_each_file_as_the_dequantized_model_does() {
    use strata::gguf::engine::GgufEngine;

    let wide = ModelConfig {
        d_model: 256,
        n_layers: 2,
        ffn_hidden: 512,
        tie_embeddings: true,
        ..config()
    };
    let cases: Vec<(ModelConfig, Quantization)> = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ]
    .into_iter()
    .map(|ty| (config(), Quantization::from(ty)))
    .chain(["q4_k_m", "q5_k_s", "q6_k"].map(|p| (wide.clone(), Quantization::parse(p).unwrap())))
    .collect();
    let ids = prompt();
    for (config, quantization) in cases {
        // The tiny model's weight scale, halved for four times the width (as above).
        let std = 0.15 * (64.0 / config.d_model as f32).sqrt();
        let model = deterministic_model_with_std(&config, std);
        let path = out_dir().join(format!("engine-{}.gguf", quantization.name()));
        export_llama(
            &model,
            &config,
            &TokenizerConfig::Byte,
            "e",
            quantization,
            &path,
        )
        .unwrap();
        let (_, burn, _) = load_llama_gguf::<B>(&path, &Default::default()).unwrap();
        let want = logits(&burn, &ids);
        let engine = GgufEngine::open(&path).unwrap();
        let mut cache = engine.new_cache();
        let prompt_at_once = engine.forward(&ids, &mut cache, true);
        let mut cache = engine.new_cache();
        let mut stepped = Vec::new();
        for chunk in ids.chunks(7) {
            stepped.extend(engine.forward(chunk, &mut cache, true));
        }
        let name = quantization.name();
        common::assert_close(
            &[&format!("{name} prompt"), &format!("{name} cached")],
            &[prompt_at_once, stepped],
            &[want.clone(), want],
            1e-4,
        );
    }
}
