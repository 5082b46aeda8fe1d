//! Generation: KV-cache decoding with a sampler chain (repetition penalty → temperature →
//! top-k → top-p). With temperature 0 the chain is greedy.

use burn::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::{KvCache, Llama};
use crate::nn::coord3d::Coords;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to p; 1 keeps all.
    pub top_p: f32,
    /// CTRL's penalty (arXiv 1909.05858) on tokens already in the context; 1 is off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Picks the next token from `logits` given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let c = &self.config;
        let mut logits = logits.to_vec();
        if c.repetition_penalty != 1.0 {
            for &id in context {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repetition_penalty
                    } else {
                        *l * c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if c.top_k > 0 {
            order.truncate(c.top_k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (((logits[i] - max) / c.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= c.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return order[i] as u32;
            }
        }
        order[order.len() - 1] as u32
    }
}

/// The index of the largest value (the first, on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Logits of the last position of `[1, seq, vocab]`.
fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [_, seq, vocab] = logits.dims();
    logits
        .slice([0..1, seq - 1..seq, 0..vocab])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default()
}

fn tokens_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    crate::train::ids_tensor(ids, [1, ids.len()], device)
}

/// How [`generate`] runs.
#[derive(Debug, Clone, Copy)]
pub struct Decoding<'a> {
    /// Generation ends before this token (the end-of-sequence id), if given.
    pub stop: Option<u32>,
    /// Each step feeds only the new token (KV cache); `false` recomputes the whole sequence,
    /// the reference the cache is tested against.
    pub use_cache: bool,
    /// For a coord3d model trained with `data.coords = "line_col"`: which token ids end a line.
    /// Tokens are then placed at the line/column coordinates the training data gave them
    /// ([`Coords::line_col`] over the context), following the text as it is generated. `None`
    /// places every token at its index.
    pub line_breaks: Option<&'a [bool]>,
}

impl Decoding<'_> {
    /// KV-cache decoding at token indices, stopping at `stop`.
    pub fn cached(stop: Option<u32>) -> Self {
        Self {
            stop,
            use_cache: true,
            line_breaks: None,
        }
    }
}

/// Generates up to `max_new` tokens after `prompt`, calling `on_token` for each as it is
/// chosen, decoding as `decoding` says. When the context fills `max_seq_len`, it restarts from
/// the last half of it. Line/column placement on a model without coordinates is an error that
/// names `model.attention`.
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    decoding: Decoding,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let device = model.embed.weight.device();
    let max_len = model.max_seq_len();
    // The coordinates of context[from..], where tokens are placed by line and column.
    let coords = |context: &[u32], from: usize| {
        decoding.line_breaks.map(|breaks| {
            let all = Coords::line_col(context, 1, context.len(), breaks);
            Coords {
                batch: 1,
                seq: context.len() - from,
                xyz: all.xyz[from..].to_vec(),
            }
        })
    };
    let full = |context: &[u32]| -> Result<Vec<f32>> {
        let tokens = tokens_tensor::<B>(context, &device);
        Ok(last_logits(match coords(context, 0) {
            None => model.forward(tokens),
            Some(at) => model.forward_at(tokens, &at)?,
        }))
    };
    // Feeds context[from..] through the cache, which holds context[..from].
    let cached = |context: &[u32], from: usize, cache: &mut KvCache<B>| -> Result<Vec<f32>> {
        let tokens = tokens_tensor::<B>(&context[from..], &device);
        Ok(last_logits(match coords(context, from) {
            None => model.forward_cached(tokens, cache),
            Some(at) => model.forward_cached_at(tokens, &at, cache)?,
        }))
    };
    let mut cache: KvCache<B> = model.new_cache();
    decode_loop(
        prompt,
        max_len,
        max_new,
        sampler,
        decoding.stop,
        on_token,
        |context, fed| {
            if fed == 0 {
                cache = model.new_cache();
            }
            if decoding.use_cache {
                cached(context, fed, &mut cache)
            } else {
                full(context)
            }
        },
    )
}

/// The sampling loop every engine shares: the prompt (its last `max_len - 1` tokens) is run,
/// then each sampled token; when the context fills `max_len` it restarts from the last half of
/// it. `step(context, fed)` returns the logits after `context`, of which the first `fed` tokens
/// have been run already (0: none, so start a fresh cache).
pub fn decode_loop(
    prompt: &[u32],
    max_len: usize,
    max_new: usize,
    sampler: &mut Sampler,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32),
    mut step: impl FnMut(&[u32], usize) -> Result<Vec<f32>>,
) -> Result<Vec<u32>> {
    let mut context = prompt[prompt.len().saturating_sub(max_len - 1)..].to_vec();
    let mut logits = step(&context, 0)?;
    let mut generated = Vec::new();
    for _ in 0..max_new {
        let next = sampler.sample(&logits, &context);
        if Some(next) == stop {
            break;
        }
        generated.push(next);
        context.push(next);
        on_token(next);
        let fed = if context.len() >= max_len {
            context.drain(..context.len() - max_len / 2);
            0
        } else {
            context.len() - 1
        };
        logits = step(&context, fed)?;
    }
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max_and_penalty_changes_it() {
        let logits = [1.0, 3.0, 2.9, -1.0];
        assert_eq!(
            Sampler::new(SamplerConfig::greedy()).sample(&logits, &[]),
            1
        );
        let penalised = SamplerConfig {
            repetition_penalty: 1.5,
            ..SamplerConfig::greedy()
        };
        assert_eq!(Sampler::new(penalised).sample(&logits, &[1]), 2);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() {
        let logits = [5.0, 4.9, 0.0, 0.0, 0.0];
        let mut top_k = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 3,
        });
        let mut top_p = Sampler::new(SamplerConfig {
            temperature: 5.0,
            top_k: 0,
            top_p: 0.5,
            repetition_penalty: 1.0,
            seed: 4,
        });
        for _ in 0..200 {
            assert!(top_k.sample(&logits, &[]) < 2);
            assert!(top_p.sample(&logits, &[]) < 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Two tokens with probabilities 0.75 / 0.25 at temperature 1.
        let logits = [3f32.ln(), 0.0];
        let mut sampler = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 9,
        });
        let ones = (0..4000)
            .filter(|_| sampler.sample(&logits, &[]) == 0)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }
}
