//! Attention Residuals: the checks that would catch a wrong reading of the paper (arXiv
//! 2603.15031). Zero queries reproduce the standard residual; Block with N = L is Full; the
//! two-phase stream equals a plain per-sub-layer reading of Eq. 6; cached decoding equals the
//! full forward; nothing reads the future; and both modes match a PyTorch reference.

use crate::common;

use std::collections::HashMap;

use burn::prelude::*;
use strata::backend::Cpu;
use strata::io::params::{HostTensor, assign_params, load_safetensors, named_params};
use strata::model::{Llama, ModelConfig, ResidualMode};
use strata::nn::attention::KvSource;
use strata::nn::attnres::DepthAttention;
use strata::train::ids_tensor;

type B = Cpu;

const TOKENS: [u32; 12] = [3, 200, 17, 17, 45, 99, 1, 250, 8, 64, 128, 7];

fn config(residual: ResidualMode, blocks: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        d_model: 32,
        n_layers: 4,
        n_heads: 4,
        n_kv_heads: Some(2),
        ffn_hidden: 48,
        max_seq_len: 32,
        // The zero-query equivalence is exact only while eps is negligible next to the
        // squared RMS of the averaged stream (about 1e-4 here); 1e-10 keeps it at rounding.
        norm_eps: 1e-10,
        tie_embeddings: false,
        residual,
        attnres_blocks: blocks,
        ..ModelConfig::default()
    }
}

/// A model of `config` holding `donor`'s weights where the names match; the others (the
/// AttnRes queries and key gains) are drawn at random when `random_queries`, else left at init.
fn with_weights(config: &ModelConfig, donor: &Llama<B>, random_queries: bool) -> Llama<B> {
    let device = Default::default();
    let model = config.init::<B>(&device);
    let donor = named_params(donor);
    let mut uniform = common::uniform(0x9e3779b97f4a7c15);
    let params: HashMap<String, HostTensor> = named_params(&model)
        .into_iter()
        .map(|(name, mut tensor)| {
            if let Some(weights) = donor.get(&name) {
                tensor = weights.clone();
            } else if random_queries && name.ends_with(".query") {
                tensor.values.iter_mut().for_each(|v| *v = 2.0 * uniform());
            } else if random_queries && name.contains("key_norm") {
                tensor
                    .values
                    .iter_mut()
                    .for_each(|v| *v = 1.0 + 0.5 * uniform());
            }
            (name, tensor)
        })
        .collect();
    assign_params(model, &params, "test".as_ref()).unwrap()
}

fn logits(model: &Llama<B>, tokens: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let out = model.forward(ids_tensor(tokens, [1, tokens.len()], &device));
    out.into_data().convert::<f32>().to_vec().unwrap()
}

/// Largest |a − b| over the largest |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    worst / scale
}

fn standard_model() -> Llama<B> {
    let device = Default::default();
    <B as Backend>::seed(&device, 7);
    config(ResidualMode::Standard, 8).init(&device)
}

#[test]
fn zero_queries_reproduce_the_standard_residual() {
    let standard = standard_model();
    let want = logits(&standard, &TOKENS);
    for (residual, blocks) in [
        (ResidualMode::AttnresFull, 8),
        (ResidualMode::AttnresBlock, 4),
        (ResidualMode::AttnresBlock, 2),
        (ResidualMode::AttnresBlock, 1),
        (ResidualMode::Rescaled, 8),
    ] {
        let model = with_weights(&config(residual, blocks), &standard, false);
        let err = relative_error(&logits(&model, &TOKENS), &want);
        // f32 rounding through 8 sub-layers; a wrong reading (values normalised, a missing
        // source, the output read skipped) gives errors of order 1.
        assert!(err < 1e-4, "{residual:?} N={blocks}: relative error {err}");
    }
}

#[test]
fn block_with_one_sublayer_per_block_is_full() {
    let standard = standard_model();
    let full = with_weights(&config(ResidualMode::AttnresFull, 8), &standard, true);
    let block = with_weights(&config(ResidualMode::AttnresBlock, 8), &full, false);
    let a = logits(&full, &TOKENS);
    let b = logits(&block, &TOKENS);
    assert_eq!(a, b);
    // And the random queries matter: the model is far from the standard one.
    let err = relative_error(&a, &logits(&standard, &TOKENS));
    assert!(err > 1e-2, "random queries changed nothing ({err})");
}

/// The paper's Eq. 6 read naively: each sub-layer mixes an explicit list of sources with
/// [`DepthAttention::forward`]; no batching, no online softmax.
fn plain_forward(model: &Llama<B>, block_len: usize, tokens: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let x = model
        .embed
        .forward(ids_tensor(tokens, [1, tokens.len()], &device));
    let mut blocks = vec![x];
    let mut partial: Option<Tensor<B, 3>> = None;
    let read = |attn: &Option<DepthAttention<B>>,
                blocks: &Vec<Tensor<B, 3>>,
                partial: &Option<Tensor<B, 3>>| {
        let mut sources = blocks.clone();
        sources.extend(partial.clone());
        attn.as_ref().unwrap().forward(&sources)
    };
    let add = |layer: usize,
               out: Tensor<B, 3>,
               blocks: &mut Vec<Tensor<B, 3>>,
               partial: &mut Option<Tensor<B, 3>>| {
        let sum = match partial.take() {
            Some(p) => p + out,
            None => out,
        };
        if (layer + 1).is_multiple_of(block_len) {
            blocks.push(sum);
        } else {
            *partial = Some(sum);
        }
    };
    for (i, block) in model.blocks.iter().enumerate() {
        let h = read(&block.attn_res, &blocks, &partial);
        let phases = model.rope.phases(0, h.dims()[1]);
        let (out, _) = block
            .attn
            .forward(block.attn_norm.forward(h), &phases, KvSource::Own(None));
        add(2 * i, out, &mut blocks, &mut partial);
        let h = read(&block.mlp_res, &blocks, &partial);
        let out = block.mlp.forward(block.mlp_norm.forward(h));
        add(2 * i + 1, out, &mut blocks, &mut partial);
    }
    let h = read(&model.output_res, &blocks, &None);
    let h = model.norm.forward(h);
    let out = model.lm_head.as_ref().unwrap().forward(h);
    out.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn two_phase_stream_equals_the_plain_reading() {
    let standard = standard_model();
    for (residual, blocks, block_len) in [
        (ResidualMode::AttnresFull, 8, 1),
        (ResidualMode::AttnresBlock, 4, 2),
        (ResidualMode::AttnresBlock, 2, 4),
        (ResidualMode::AttnresBlock, 1, 8),
    ] {
        let model = with_weights(&config(residual, blocks), &standard, true);
        let err = relative_error(
            &logits(&model, &TOKENS),
            &plain_forward(&model, block_len, &TOKENS),
        );
        assert!(err < 1e-5, "{residual:?} N={blocks}: relative error {err}");
    }
}

fn every_mode() -> Vec<(ResidualMode, usize)> {
    vec![
        (ResidualMode::Standard, 8),
        (ResidualMode::Rescaled, 8),
        (ResidualMode::AttnresFull, 8),
        (ResidualMode::AttnresBlock, 2),
    ]
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let device = Default::default();
    let standard = standard_model();
    for (residual, blocks) in every_mode() {
        let model = with_weights(&config(residual, blocks), &standard, true);
        let want = logits(&model, &TOKENS);
        let mut cache = model.new_cache();
        // A prompt of 5, then one token at a time.
        let mut got = model
            .forward_cached(ids_tensor(&TOKENS[..5], [1, 5], &device), &mut cache)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap();
        for &t in &TOKENS[5..] {
            let step = model.forward_cached(ids_tensor(&[t], [1, 1], &device), &mut cache);
            got.extend(step.into_data().convert::<f32>().to_vec::<f32>().unwrap());
        }
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "{residual:?}: relative error {err}");
    }
}

#[test]
fn later_tokens_never_change_earlier_logits() {
    let standard = standard_model();
    let vocab = 259;
    let keep = 6;
    let mut changed = TOKENS;
    for t in &mut changed[keep..] {
        *t = (*t + 101) % 256;
    }
    for (residual, blocks) in every_mode() {
        let model = with_weights(&config(residual, blocks), &standard, true);
        let a = logits(&model, &TOKENS);
        let b = logits(&model, &changed);
        assert_eq!(a[..keep * vocab], b[..keep * vocab], "{residual:?}");
        assert_ne!(a[keep * vocab..], b[keep * vocab..], "{residual:?}");
    }
}

#[test]
fn both_modes_match_the_pytorch_reference() {
    let dir = common::fixture("attnres");
    let shape: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| shape[k].as_u64().unwrap() as usize;
    let (weights, _) = load_safetensors(&dir.join("model.safetensors")).unwrap();
    let (expected, _) = load_safetensors(&dir.join("expected.safetensors")).unwrap();
    let tokens: Vec<u32> = expected["input_ids"]
        .values
        .iter()
        .map(|&v| v as u32)
        .collect();
    for (residual, key) in [
        (ResidualMode::AttnresFull, "logits_full"),
        (ResidualMode::AttnresBlock, "logits_block"),
    ] {
        let config = ModelConfig {
            vocab_size: get("vocab_size"),
            d_model: get("d_model"),
            n_layers: get("n_layers"),
            n_heads: get("n_heads"),
            n_kv_heads: Some(get("n_kv_heads")),
            ffn_hidden: get("ffn_hidden"),
            max_seq_len: 32,
            norm_eps: shape["norm_eps"].as_f64().unwrap(),
            rope_theta: shape["rope_theta"].as_f64().unwrap(),
            tie_embeddings: false,
            residual,
            attnres_blocks: get("attnres_blocks"),
            ..ModelConfig::default()
        };
        config.validate("model.").unwrap();
        let model = assign_params(config.init::<B>(&Default::default()), &weights, &dir).unwrap();
        let err = relative_error(&logits(&model, &tokens), &expected[key].values);
        // The reference runs in f64; 1e-4 of the largest logit covers f32 rounding.
        assert!(err < 1e-4, "{key}: relative error {err}");
    }
}

#[test]
fn impossible_block_counts_are_rejected() {
    for blocks in [0, 3, 16] {
        let err = config(ResidualMode::AttnresBlock, blocks)
            .validate("model.")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.attnres_blocks"), "{err}");
        assert!(err.contains("8 sub-layers"), "{err}");
    }
}

#[test]
fn traces_report_depth_weights_that_sum_to_one() {
    let device = Default::default();
    let standard = standard_model();
    let model = with_weights(&config(ResidualMode::AttnresBlock, 4), &standard, true);
    let (_, trace) = model.forward_traced(ids_tensor(&TOKENS, [1, TOKENS.len()], &device));
    assert_eq!(trace.len(), 9);
    // Blocks of 2: sub-layer l reads 1 + l/2 completed blocks, plus the partial sum when odd.
    let counts: Vec<usize> = trace.iter().map(|t| t.depth_weights.len()).collect();
    assert_eq!(counts, [1, 2, 2, 3, 3, 4, 4, 5, 5]);
    for t in &trace {
        let total: f32 = t.depth_weights.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "{t:?}");
        assert!(t.input_rms > 0.0);
    }
}
