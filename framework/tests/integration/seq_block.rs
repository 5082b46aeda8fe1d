//! Sequence-block attention against a scalar reference written from its definition, and the
//! decoder built with it: causal, cache-consistent, and composable with every residual mode.

use crate::common;

use burn::prelude::*;
use strata::backend::Cpu;
use strata::io::params::{assign_params, named_params};
use strata::model::{AttentionKind, ModelConfig, ResidualMode};
use strata::nn::seq_block::{seq_block_attention, seq_block_attention_at};
use strata::train::ids_tensor;

type B = Cpu;

fn random(shape: [usize; 4], seed: u64) -> (Vec<f32>, Tensor<B, 4>) {
    let mut uniform = common::uniform(seed.wrapping_mul(0x9e3779b97f4a7c15) | 1);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| 2.0 * uniform())
        .collect();
    let tensor = Tensor::from_data(TensorData::new(values.clone(), shape), &Default::default());
    (values, tensor)
}

/// For each query t: its own block's keys up to t, and the mean key/value of each of the
/// `summaries` blocks before its own (all when 0), in one softmax. Scalar loops, f64.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [batch, heads, seq, dim]: [usize; 4],
    block_len: usize,
    summaries: usize,
) -> Vec<f32> {
    let at = |x: &[f32], b: usize, h: usize, t: usize, d: usize| {
        f64::from(x[((b * heads + h) * seq + t) * dim + d])
    };
    let mut out = vec![0f32; batch * heads * seq * dim];
    for b in 0..batch {
        for h in 0..heads {
            for t in 0..seq {
                let own = t / block_len;
                let mut entries: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
                let first = if summaries == 0 {
                    0
                } else {
                    own.saturating_sub(summaries)
                };
                for blk in first..own {
                    let mean = |x: &[f32]| {
                        (0..dim)
                            .map(|d| {
                                (blk * block_len..(blk + 1) * block_len)
                                    .map(|j| at(x, b, h, j, d))
                                    .sum::<f64>()
                                    / block_len as f64
                            })
                            .collect::<Vec<_>>()
                    };
                    entries.push((mean(k), mean(v)));
                }
                for j in own * block_len..=t {
                    let row = |x: &[f32]| (0..dim).map(|d| at(x, b, h, j, d)).collect::<Vec<_>>();
                    entries.push((row(k), row(v)));
                }
                let scores: Vec<f64> = entries
                    .iter()
                    .map(|(key, _)| {
                        (0..dim).map(|d| at(q, b, h, t, d) * key[d]).sum::<f64>()
                            / (dim as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..dim {
                    let value: f64 = weights
                        .iter()
                        .zip(&entries)
                        .map(|(w, (_, val))| w * val[d])
                        .sum();
                    out[((b * heads + h) * seq + t) * dim + d] = (value / total) as f32;
                }
            }
        }
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn blocked_and_direct_forms_match_the_scalar_reference() {
    let shape = [2, 3, 21, 8];
    let (qv, q) = random(shape, 1);
    let (kv, k) = random(shape, 2);
    let (vv, v) = random(shape, 3);
    for (block_len, summaries) in [(4, 0), (4, 2), (5, 1), (7, 0), (1, 3), (32, 0)] {
        let want = reference(&qv, &kv, &vv, shape, block_len, summaries);
        let blocked = seq_block_attention(q.clone(), k.clone(), v.clone(), block_len, summaries);
        let direct = seq_block_attention_at(q.clone(), k.clone(), v.clone(), block_len, summaries);
        for (name, got) in [("blocked", blocked), ("direct", direct)] {
            let got: Vec<f32> = got.into_data().to_vec().unwrap();
            // Values are O(1); f32 accumulation over ≤ 21 terms stays far below 1e-5.
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{name} B={block_len} S={summaries}: {diff}");
        }
    }
}

fn config(residual: ResidualMode, summaries: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 259,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        ffn_hidden: 48,
        max_seq_len: 64,
        residual,
        attnres_blocks: 2,
        attention: AttentionKind::SeqBlock,
        seq_block_len: 4,
        seq_block_summaries: summaries,
        ..ModelConfig::default()
    }
}

const TOKENS: [u32; 19] = [
    72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 3, 9, 27, 81, 243, 5,
];

fn logits(model: &strata::model::Llama<B>, tokens: &[u32]) -> Vec<f32> {
    let out = model.forward(ids_tensor(tokens, [1, tokens.len()], &Default::default()));
    out.into_data().convert::<f32>().to_vec().unwrap()
}

#[test]
fn later_tokens_never_change_earlier_logits_in_any_residual_mode() {
    let vocab = 259;
    for residual in [
        ResidualMode::Standard,
        ResidualMode::Rescaled,
        ResidualMode::AttnresFull,
        ResidualMode::AttnresBlock,
    ] {
        for summaries in [0, 1] {
            let model = config(residual, summaries).init::<B>(&Default::default());
            // Change the last token of a block and everything after it; the block's summary
            // changes, so any leak reaches the earlier positions.
            for keep in [7, 8, 12] {
                let mut changed = TOKENS;
                for t in &mut changed[keep..] {
                    *t = (*t + 57) % 256;
                }
                let (a, b) = (logits(&model, &TOKENS), logits(&model, &changed));
                assert_eq!(
                    a[..keep * vocab],
                    b[..keep * vocab],
                    "{residual:?} S={summaries} keep={keep}"
                );
                assert_ne!(
                    a[keep * vocab..],
                    b[keep * vocab..],
                    "{residual:?} S={summaries}"
                );
            }
        }
    }
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    let device = Default::default();
    for (residual, summaries) in [(ResidualMode::Standard, 0), (ResidualMode::AttnresBlock, 2)] {
        let model = config(residual, summaries).init::<B>(&device);
        let want = logits(&model, &TOKENS);
        let mut cache = model.new_cache();
        let mut got: Vec<f32> = model
            .forward_cached(ids_tensor(&TOKENS[..6], [1, 6], &device), &mut cache)
            .into_data()
            .to_vec()
            .unwrap();
        for &t in &TOKENS[6..] {
            let step = model.forward_cached(ids_tensor(&[t], [1, 1], &device), &mut cache);
            got.extend(step.into_data().to_vec::<f32>().unwrap());
        }
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{residual:?}: {diff}");
    }
}

#[test]
fn one_block_covering_the_sequence_is_dense_attention() {
    let device = Default::default();
    let mut seq_block = config(ResidualMode::Standard, 0);
    seq_block.seq_block_len = TOKENS.len();
    let a = seq_block.init::<B>(&device);
    let dense = ModelConfig {
        attention: AttentionKind::Dense,
        ..seq_block.clone()
    };
    let weights = named_params(&a).into_iter().collect();
    let b = assign_params(dense.init::<B>(&device), &weights, "test".as_ref()).unwrap();
    let diff = max_abs_diff(&logits(&a, &TOKENS), &logits(&b, &TOKENS));
    assert!(diff < 1e-5, "{diff}");
}
