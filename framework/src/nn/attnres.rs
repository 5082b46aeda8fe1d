//! Attention Residuals (Kimi Team, "Attention Residuals", arXiv 2603.15031): the input of a
//! sub-layer is a softmax over depth of the earlier sub-layer outputs, per token, instead of
//! their plain sum. It does not touch attention along the sequence.
//!
//! The one thing to know: the weights come from one learned pseudo-query per sub-layer against
//! the RMS-normalised sources (the keys); the values are the raw sources. The query starts at
//! zero, so a fresh model averages its sources uniformly, and the next pre-norm removes the 1/k:
//! at initialisation the model computes what the standard residual computes.

use burn::module::Param;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;

/// One depth-attention read: `h = Σ_i α_i v_i`, `α = softmax_i(w · RMSNorm(v_i))` (paper Eq. 2–3;
/// one head, no 1/√d scale).
#[derive(Module, Debug)]
pub struct DepthAttention<B: Backend> {
    /// The pseudo-query w_l ∈ R^d; input-independent, zero at initialisation.
    pub query: Param<Tensor<B, 1>>,
    /// Makes the keys; its gain is the other learned vector of the sub-layer.
    pub key_norm: RmsNorm<B>,
}

impl<B: Backend> DepthAttention<B> {
    pub fn new(d_model: usize, norm_eps: f64, device: &B::Device) -> Self {
        Self {
            query: Param::from_tensor(Tensor::zeros([d_model], device)),
            key_norm: RmsNormConfig::new(d_model)
                .with_epsilon(norm_eps)
                .init(device),
        }
    }

    /// Mixes `sources`, each `[batch, seq, d_model]`, for every token independently.
    pub fn forward(&self, sources: &[Tensor<B, 3>]) -> Tensor<B, 3> {
        self.forward_with_weights(sources).0
    }

    /// Also returns the weights α, `[batch, seq, sources]`.
    pub fn forward_with_weights(&self, sources: &[Tensor<B, 3>]) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let values: Tensor<B, 4> = Tensor::stack(sources.to_vec(), 2);
        let [batch, seq, n, d] = values.dims();
        let keys = self.key_norm.forward(values.clone());
        let logits = keys.matmul(self.query.val().reshape([1, 1, d, 1]));
        let weights = softmax(logits.reshape([batch, seq, 1, n]), 3);
        let mixed = weights.clone().matmul(values).reshape([batch, seq, d]);
        (mixed, weights.reshape([batch, seq, n]))
    }

    /// `w ⊙ g`: the logit of a source v is `(w ⊙ g) · v / rms(v)`, so the key norm's gain folds
    /// into the query and each source's rms is computed once for all the queries that read it.
    fn folded_query(&self) -> Tensor<B, 1> {
        self.query.val() * self.key_norm.gamma.val()
    }
}

/// The residual stream of an AttnRes decoder (paper Eq. 6). Sub-layers are grouped into blocks of
/// `block_len`; the stream keeps, per token, the completed block representations b_0 (the
/// embedding), b_1, … (each the sum of its block's outputs) and the partial sum of the current
/// block. The first sub-layer of a block reads [b_0 … b_{n−1}]; later ones also read the partial
/// sum. `block_len = 1` is Full AttnRes; one block spanning every sub-layer keeps only the
/// embedding and the running sum as sources.
///
/// Reads use the paper's two-phase computation: when a block starts, the queries of all its
/// sub-layers are scored against the completed blocks in one batched product (phase 1); each
/// sub-layer then merges in the partial sum with an online-softmax update (phase 2). The result
/// equals [`DepthAttention::forward`] over the same sources (tested).
pub struct DepthStream<'a, B: Backend> {
    /// One per sub-layer in order, then the one that reads the decoder's output.
    queries: Vec<&'a DepthAttention<B>>,
    block_len: usize,
    /// Completed block representations `[batch, seq, n, d]` and their 1/rms `[batch, seq, n, 1]`.
    completed: Tensor<B, 4>,
    inv_rms: Tensor<B, 4>,
    partial: Option<Tensor<B, 3>>,
    phase1: Option<Phase1<B>>,
    eps: f64,
}

/// The completed blocks' contribution to each query of the current block, as online-softmax
/// state: the running max `[batch, seq, 1, S]`, the sum of exp(logit − max) `[batch, seq, 1, S]`
/// and the correspondingly weighted sum of values `[batch, seq, S, d]`.
struct Phase1<B: Backend> {
    max: Tensor<B, 4>,
    denom: Tensor<B, 4>,
    sum: Tensor<B, 4>,
}

impl<'a, B: Backend> DepthStream<'a, B> {
    /// `queries`: one per sub-layer, then the output's. `embedding`: `[batch, seq, d]`.
    pub fn new(
        queries: Vec<&'a DepthAttention<B>>,
        block_len: usize,
        embedding: Tensor<B, 3>,
        eps: f64,
    ) -> Self {
        let inv_rms = inverse_rms(embedding.clone(), eps).unsqueeze_dim(2);
        Self {
            queries,
            block_len,
            completed: embedding.unsqueeze_dim(2),
            inv_rms,
            partial: None,
            phase1: None,
            eps,
        }
    }

    /// The input h_l of sub-layer `layer` (0-based).
    pub fn input(&mut self, layer: usize) -> Tensor<B, 3> {
        let slot = layer % self.block_len;
        if slot == 0 {
            let end = (layer + self.block_len).min(self.queries.len() - 1);
            self.phase1 = Some(self.score_completed(&self.queries[layer..end]));
        }
        let phase1 = self
            .phase1
            .as_ref()
            .expect("phase 1 runs at a block's first sub-layer");
        let [batch, seq, _, d] = phase1.sum.dims();
        let pick = |t: &Tensor<B, 4>, rows: usize, cols: usize| {
            t.clone()
                .slice([0..batch, 0..seq, rows..rows + 1, cols..cols + 1])
                .reshape([batch, seq, 1])
        };
        let max = pick(&phase1.max, 0, slot);
        let denom = pick(&phase1.denom, 0, slot);
        let sum = phase1
            .sum
            .clone()
            .slice([0..batch, 0..seq, slot..slot + 1, 0..d])
            .reshape([batch, seq, d]);
        match &self.partial {
            None => sum / denom,
            Some(partial) => {
                let query = self.queries[layer].folded_query().reshape([1, 1, d]);
                let logit =
                    (partial.clone() * query).sum_dim(2) * inverse_rms(partial.clone(), self.eps);
                let new_max = max.clone().max_pair(logit.clone());
                let old_scale = (max - new_max.clone()).exp();
                let own = (logit - new_max).exp();
                (sum * old_scale.clone() + partial.clone() * own.clone())
                    / (denom * old_scale + own)
            }
        }
    }

    /// Adds sub-layer `layer`'s output to the current block; closes the block when it is full.
    pub fn push(&mut self, layer: usize, output: Tensor<B, 3>) {
        let partial = match self.partial.take() {
            Some(partial) => partial + output,
            None => output,
        };
        if (layer + 1).is_multiple_of(self.block_len) {
            self.close_block(partial);
        } else {
            self.partial = Some(partial);
        }
    }

    /// The decoder's output: the last query's read over every block.
    pub fn output(mut self) -> Tensor<B, 3> {
        if let Some(partial) = self.partial.take() {
            self.close_block(partial);
        }
        let last = self.queries.len() - 1;
        let phase1 = self.score_completed(&self.queries[last..]);
        let [batch, seq, _, d] = phase1.sum.dims();
        phase1.sum.reshape([batch, seq, d]) / phase1.denom.reshape([batch, seq, 1])
    }

    /// The sources sub-layer `layer` reads, in order: completed blocks, then the partial sum.
    pub fn sources(&self) -> Vec<Tensor<B, 3>> {
        let [batch, seq, n, d] = self.completed.dims();
        let mut sources: Vec<_> = (0..n)
            .map(|i| {
                self.completed
                    .clone()
                    .slice([0..batch, 0..seq, i..i + 1, 0..d])
                    .reshape([batch, seq, d])
            })
            .collect();
        sources.extend(self.partial.clone());
        sources
    }

    fn close_block(&mut self, block: Tensor<B, 3>) {
        let inv_rms = inverse_rms(block.clone(), self.eps).unsqueeze_dim(2);
        self.completed = Tensor::cat(vec![self.completed.clone(), block.unsqueeze_dim(2)], 2);
        self.inv_rms = Tensor::cat(vec![self.inv_rms.clone(), inv_rms], 2);
    }

    /// Phase 1: the logits of `queries` against every completed block, in one product.
    fn score_completed(&self, queries: &[&DepthAttention<B>]) -> Phase1<B> {
        let d = self.completed.dims()[3];
        let folded: Vec<_> = queries.iter().map(|q| q.folded_query()).collect();
        let queries = Tensor::stack::<2>(folded, 1).reshape([1, 1, d, queries.len()]);
        let logits = self.completed.clone().matmul(queries) * self.inv_rms.clone();
        let max = logits.clone().max_dim(2);
        let weights = (logits - max.clone()).exp();
        Phase1 {
            denom: weights.clone().sum_dim(2),
            sum: weights.swap_dims(2, 3).matmul(self.completed.clone()),
            max,
        }
    }
}

/// `1 / sqrt(mean(x²) + eps)` over the last axis, `[batch, seq, 1]`.
fn inverse_rms<B: Backend>(x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    (x.square().mean_dim(2) + eps).sqrt().recip()
}
