//! A Llama-style decoder: token embedding, pre-norm blocks of rotary grouped-query attention and
//! a SwiGLU MLP, final RMSNorm, LM head (tied to the embedding or not).

use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::attention::{Attention, LayerKvCache};
use crate::nn::rope::Rope;

/// How each sub-layer's output is combined with the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResidualMode {
    /// `h = h + f(norm(h))`, the pre-norm Transformer residual.
    #[default]
    Standard,
}

/// How tokens attend to each other along the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Full causal softmax attention.
    #[default]
    Dense,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads for grouped-query attention; unset means `n_heads` (multi-head attention).
    pub n_kv_heads: Option<usize>,
    pub ffn_hidden: usize,
    pub max_seq_len: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    /// Standard deviation of the normal initialisation (GPT-2's 0.02).
    pub init_std: f64,
    pub residual: ResidualMode,
    pub attention: AttentionKind,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 259,
            d_model: 256,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: None,
            ffn_hidden: 688,
            max_seq_len: 256,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            init_std: 0.02,
            residual: ResidualMode::Standard,
            attention: AttentionKind::Dense,
        }
    }
}

impl ModelConfig {
    /// Checks every constraint; the error names the key (under `prefix`, e.g. "model.").
    pub fn validate(&self, prefix: &str) -> Result<()> {
        let key = |k: &str| format!("{prefix}{k}");
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.kv_heads()),
            ("ffn_hidden", self.ffn_hidden),
            ("max_seq_len", self.max_seq_len),
        ] {
            if value == 0 {
                return Err(Error::config(key(name), 0, "must be at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                key("n_heads"),
                self.n_heads,
                format!("must divide {} = {}", key("d_model"), self.d_model),
            ));
        }
        if !self.n_heads.is_multiple_of(self.kv_heads()) {
            return Err(Error::config(
                key("n_kv_heads"),
                self.kv_heads(),
                format!("must divide {} = {}", key("n_heads"), self.n_heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                key("n_heads"),
                self.n_heads,
                format!(
                    "d_model / n_heads = {} must be even for rotary embeddings",
                    self.head_dim()
                ),
            ));
        }
        for (name, value) in [
            ("rope_theta", self.rope_theta),
            ("norm_eps", self.norm_eps),
            ("init_std", self.init_std),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::config(key(name), value, "must be a positive number"));
            }
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Parameter count, embeddings included once when tied.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let kv = self.kv_heads() * self.head_dim();
        let block = 2 * d * d + 2 * d * kv + 3 * d * self.ffn_hidden + 2 * d;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * d
        };
        self.vocab_size * d + self.n_layers * block + d + head
    }

    /// Matmul FLOPs per token for forward + backward (6N plus attention's 12·L·d·T, PaLM's formula).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let non_embedding = self.num_params()
            - if self.tie_embeddings {
                0
            } else {
                self.vocab_size * self.d_model
            };
        6.0 * non_embedding as f64 + 12.0 * (self.n_layers * self.d_model * seq_len) as f64
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let init = Initializer::Normal {
            mean: 0.0,
            std: self.init_std,
        };
        // GPT-2 scales the projections that write into the residual stream by 1/sqrt(2·layers).
        let out_init = Initializer::Normal {
            mean: 0.0,
            std: self.init_std / (2.0 * self.n_layers as f64).sqrt(),
        };
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                attn_norm: RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.norm_eps)
                    .init(device),
                attn: Attention::new(
                    self.d_model,
                    self.n_heads,
                    self.kv_heads(),
                    init.clone(),
                    out_init.clone(),
                    device,
                ),
                mlp_norm: RmsNormConfig::new(self.d_model)
                    .with_epsilon(self.norm_eps)
                    .init(device),
                mlp: Mlp {
                    w_gate: linear(self.d_model, self.ffn_hidden, &init, device),
                    w_up: linear(self.d_model, self.ffn_hidden, &init, device),
                    w_down: linear(self.ffn_hidden, self.d_model, &out_init, device),
                },
            })
            .collect();
        Llama {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(init.clone())
                .init(device),
            blocks,
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device),
            lm_head: (!self.tie_embeddings)
                .then(|| linear(self.d_model, self.vocab_size, &init, device)),
            rope: Rope::new(self.head_dim(), self.max_seq_len, self.rope_theta, device),
        }
    }
}

fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    init: &Initializer,
    device: &B::Device,
) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(init.clone())
        .init(device)
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub w_gate: Linear<B>,
    pub w_up: Linear<B>,
    pub w_down: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// SwiGLU (Shazeer, arXiv 2002.05202): down(silu(gate(x)) · up(x)).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.w_down
            .forward(silu(self.w_gate.forward(x.clone())) * self.w_up.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn_norm: RmsNorm<B>,
    pub attn: Attention<B>,
    pub mlp_norm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        offset: usize,
        cache: Option<&mut Option<LayerKvCache<B>>>,
    ) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .attn
                .forward(self.attn_norm.forward(x), rope, offset, cache);
        x.clone() + self.mlp.forward(self.mlp_norm.forward(x))
    }
}

/// Per-layer keys and values of the tokens generated so far.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerKvCache<B>>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Option<Linear<B>>,
    pub rope: Rope<B>,
}

impl<B: Backend> Llama<B> {
    /// Logits `[batch, seq, vocab]` for tokens `[batch, seq]` starting at position 0.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.forward_from(tokens, 0, None)
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache {
            layers: vec![None; self.blocks.len()],
            len: 0,
        }
    }

    /// Runs new tokens through the model, appending their keys and values to `cache`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let offset = cache.len;
        cache.len += tokens.dims()[1];
        self.forward_from(tokens, offset, Some(&mut cache.layers))
    }

    fn forward_from(
        &self,
        tokens: Tensor<B, 2, Int>,
        offset: usize,
        mut cache: Option<&mut Vec<Option<LayerKvCache<B>>>>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed.forward(tokens);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|layers| &mut layers[i]);
            x = block.forward(x, &self.rope, offset, layer_cache);
        }
        let x = self.norm.forward(x);
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => x.matmul(self.embed.weight.val().transpose().unsqueeze::<3>()),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        self.rope.max_seq_len()
    }

    /// Mean cross-entropy (nats per token) of predicting `targets` from `inputs`, both `[batch, seq]`.
    pub fn loss(&self, inputs: Tensor<B, 2, Int>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let logits = self.forward(inputs);
        cross_entropy(logits, targets)
    }
}

/// Mean of −log softmax(logits)[target] over all positions.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let log_probs = log_softmax(logits.reshape([batch * seq, vocab]), 1);
    let picked = log_probs.gather(1, targets.reshape([batch * seq, 1]));
    picked.mean().neg()
}
