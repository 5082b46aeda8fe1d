//! Our decoder, loaded through the HF importer, against logits computed by transformers'
//! `LlamaForCausalLM` (fixtures from scripts/fixtures/make_hf_fixtures.py).
//!
//! Tolerance: 1e-4 relative to the largest logit magnitude. Both sides run in f32; the
//! difference is summation order in matmuls and softmax, about 1e-6 here.

use burn::prelude::*;
use strata::backend::Cpu;
use strata::infer::{Decoding, Sampler, SamplerConfig, generate};
use strata::io::hf::load_llama;

use crate::common::{check_logits, fixture};

#[test]
fn untied_gqa_checkpoint_matches_transformers() {
    check_logits::<Cpu>("tiny_llama", 1e-4);
}

#[test]
fn sharded_tied_checkpoint_matches_transformers() {
    check_logits::<Cpu>("tiny_llama_sharded", 1e-4);
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let device = Default::default();
    let (_, model) = load_llama::<Cpu>(&fixture("tiny_llama"), &device).unwrap();
    let prompt = [1u32, 72, 101, 108, 108, 111];
    let mut a = Sampler::new(SamplerConfig::greedy());
    let mut b = Sampler::new(SamplerConfig::greedy());
    let cached = generate(&model, &prompt, 40, &mut a, cache(true), |_| {}).unwrap();
    let full = generate(&model, &prompt, 40, &mut b, cache(false), |_| {}).unwrap();
    assert_eq!(cached.len(), 40);
    assert_eq!(cached, full);

    // Also sampled decoding (same seed) and the logits themselves, position by position.
    let config = SamplerConfig {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.9,
        repetition_penalty: 1.2,
        seed: 5,
    };
    let cached = generate(
        &model,
        &prompt,
        30,
        &mut Sampler::new(config.clone()),
        cache(true),
        |_| {},
    )
    .unwrap();
    let full = generate(
        &model,
        &prompt,
        30,
        &mut Sampler::new(config),
        cache(false),
        |_| {},
    )
    .unwrap();
    assert_eq!(cached, full);

    let all: Vec<i64> = prompt.iter().chain(&cached).map(|&i| i as i64).collect();
    let n = all.len();
    let reference: Vec<f32> = model
        .forward(Tensor::from_data(
            TensorData::new(all.clone(), [1, n]),
            &device,
        ))
        .into_data()
        .to_vec()
        .unwrap();
    let mut cache = model.new_cache();
    let mut step_logits = Vec::new();
    let first: Tensor<Cpu, 3> = model.forward_cached(
        Tensor::from_data(
            TensorData::new(all[..prompt.len()].to_vec(), [1, prompt.len()]),
            &device,
        ),
        &mut cache,
    );
    step_logits.extend(first.into_data().to_vec::<f32>().unwrap());
    // The rest in uneven chunks, exercising the offset causal mask.
    let mut at = prompt.len();
    for chunk in [1usize, 3, 1, 7, 2] {
        let ids = all[at..at + chunk].to_vec();
        let out: Tensor<Cpu, 3> = model.forward_cached(
            Tensor::from_data(TensorData::new(ids, [1, chunk]), &device),
            &mut cache,
        );
        step_logits.extend(out.into_data().to_vec::<f32>().unwrap());
        at += chunk;
    }
    let worst = step_logits
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "cached vs full logits differ by {worst}");
}

#[test]
fn importer_names_what_is_wrong() {
    let device = Default::default();
    let dir = std::env::temp_dir().join(format!("strata-hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny_llama/config.json"), dir.join("config.json")).unwrap();
    let err = load_llama::<Cpu>(&dir, &device).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // A checkpoint of another shape: the error names the tensor and both shapes.
    let text = std::fs::read_to_string(fixture("tiny_llama/config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        text.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    std::fs::copy(
        fixture("tiny_llama/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = load_llama::<Cpu>(&dir, &device).err().unwrap().to_string();
    assert!(
        err.contains("mlp.w_gate.weight") && err.contains("[64, 128]") && err.contains("[64, 96]"),
        "{err}"
    );
}

/// Decoding with or without the KV cache, no stop token, tokens at their index.
fn cache(use_cache: bool) -> Decoding<'static> {
    Decoding {
        use_cache,
        ..Decoding::cached(None)
    }
}
