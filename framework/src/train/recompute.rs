//! Activation checkpointing: the forward pass keeps only the residual stream entering each
//! segment of decoder blocks (on the device, or in host memory with offload), and the backward
//! pass reruns one segment at a time with autodiff, so the activations of at most one segment
//! exist at once. The price is a second forward pass through the blocks.
//!
//! Burn's autodiff checkpoints single memory-bound ops, not blocks, so each segment gets a
//! backward pass of its own: the gradient `g` arriving at a segment's output `y` is injected as
//! the scalar `sum(y · g)`, whose gradient with respect to `y` is exactly `g`; the same backward
//! pass yields the gradient at the segment's input, which feeds the segment before it.

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::batch_tensors;
use crate::data::Batch;
use crate::model::Llama;

/// Which activations the backward pass recomputes (`train.activation_checkpointing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ActivationCheckpointing {
    /// Keep every activation: fastest, most memory.
    #[default]
    None,
    /// Keep the stream entering each decoder block; recompute one block at a time.
    Block,
    /// Keep the stream entering every `train.checkpoint_every`-th block; recompute that many
    /// blocks at a time (fewer saved streams, larger recomputed segments).
    EveryK,
}

impl ActivationCheckpointing {
    /// The config value.
    pub fn name(self) -> &'static str {
        match self {
            ActivationCheckpointing::None => "none",
            ActivationCheckpointing::Block => "block",
            ActivationCheckpointing::EveryK => "every_k",
        }
    }
}

/// How one training step recomputes: segments of blocks, where their inputs wait, and how many
/// positions the LM head and loss handle at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub blocks_per_segment: usize,
    /// Keep the saved segment inputs in host memory.
    pub offload: bool,
    /// Sequence positions per pass through the LM head and loss (0: all), so that the logits
    /// of a long sequence over a large vocabulary never exist whole.
    pub head_chunk: usize,
}

/// A saved segment input: on the device, or copied to host memory.
enum Saved<B: Backend> {
    Device(Tensor<B, 3>),
    Host(TensorData),
}

impl<B: Backend> Saved<B> {
    fn keep(h: Tensor<B, 3>, offload: bool) -> Self {
        if offload {
            Saved::Host(h.into_data())
        } else {
            Saved::Device(h)
        }
    }

    fn restore(self, device: &B::Device) -> Tensor<B, 3> {
        match self {
            Saved::Device(h) => h,
            Saved::Host(data) => Tensor::from_data(data, device),
        }
    }
}

/// Forward and backward of one micro-batch, recomputing as `plan` says. Adds the gradients of
/// `loss · loss_scale` to `accumulator` and returns that scaled loss. The model's residual
/// stream must be a single tensor ([`Llama::has_single_stream`]); the config check refuses
/// other models.
pub fn loss_and_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &Batch,
    loss_scale: f64,
    plan: Plan,
    accumulator: &mut GradientsAccumulator<Llama<B>>,
    device: &B::Device,
) -> f64 {
    let Plan {
        blocks_per_segment,
        offload,
        head_chunk,
    } = plan;
    assert!(model.has_single_stream() && blocks_per_segment > 0);
    let n_blocks = model.blocks.len();
    let starts: Vec<usize> = (0..n_blocks).step_by(blocks_per_segment).collect();

    // Forward without a graph, keeping each segment's input.
    let plain = model.valid();
    let (inputs, targets) = batch_tensors::<B>(batch, device);
    let mut h = plain.embed_tokens(inputs.clone().inner());
    let mut saved = Vec::with_capacity(starts.len());
    for &start in &starts {
        saved.push(Saved::keep(h.clone(), offload));
        for i in start..(start + blocks_per_segment).min(n_blocks) {
            h = plain.block_forward(i, h);
        }
    }
    drop(plain);

    // Head: the loss from the last hidden state, and the gradient arriving there, a chunk of
    // positions at a time. Each chunk's loss is its share of the batch mean.
    let [rows, seq, _] = h.dims();
    let chunk = if head_chunk == 0 { seq } else { head_chunk };
    let weights = loss_weights(batch, loss_scale);
    let mut loss_value = 0.0;
    let mut grad_chunks = Vec::new();
    for start in (0..seq).step_by(chunk) {
        let len = chunk.min(seq - start);
        let last = Tensor::<B, 3>::from_inner(h.clone().narrow(1, start, len)).require_grad();
        let logits = model.logits(last.clone());
        let loss = weighted_nll(
            logits,
            targets.clone().narrow(1, start, len),
            columns(&weights, rows, seq, start, len, device),
        );
        loss_value += loss.clone().into_scalar().elem::<f64>();
        let grads = loss.backward();
        grad_chunks.push(
            last.grad(&grads)
                .expect("the last hidden state requires a gradient"),
        );
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    let mut grad = Tensor::cat(grad_chunks, 1);

    // Segments, last to first: rerun with autodiff, inject the arriving gradient.
    for (&start, input) in starts.iter().zip(saved).rev() {
        let x = Tensor::<B, 3>::from_inner(input.restore(device)).require_grad();
        let mut y = x.clone();
        for i in start..(start + blocks_per_segment).min(n_blocks) {
            y = model.block_forward(i, y);
        }
        let grads = (y * Tensor::from_inner(grad)).sum().backward();
        grad = x.grad(&grads).expect("a segment input requires a gradient");
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }

    // The embedding, when it trains (a LoRA run freezes it).
    if model.embed.weight.val().is_require_grad() {
        let e = model.embed_tokens(inputs);
        let grads = (e * Tensor::from_inner(grad)).sum().backward();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    loss_value
}

/// Each target position's weight in the scaled batch loss: `scale / counted` where the loss
/// counts the position (every position, or those the loss mask marks), 0 elsewhere; row-major
/// `[rows, seq]`.
fn loss_weights(batch: &Batch, scale: f64) -> Vec<f32> {
    if batch.loss_mask.is_empty() {
        let w = (scale / (batch.batch * batch.seq) as f64) as f32;
        return vec![w; batch.batch * batch.seq];
    }
    let counted = batch.loss_mask.iter().filter(|&&m| m).count().max(1);
    let w = (scale / counted as f64) as f32;
    batch
        .loss_mask
        .iter()
        .map(|&m| if m { w } else { 0.0 })
        .collect()
}

/// Columns `start..start + len` of a row-major `[rows, seq]` table, as a tensor.
fn columns<B: Backend>(
    table: &[f32],
    rows: usize,
    seq: usize,
    start: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let values: Vec<f32> = (0..rows)
        .flat_map(|r| {
            table[r * seq + start..r * seq + start + len]
                .iter()
                .copied()
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, len]), device)
}

/// Σ weight · (−log softmax(logits)[target]) over the positions of `logits` `[rows, len, vocab]`.
fn weighted_nll<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [rows, len, vocab] = logits.dims();
    // In f32, as `cross_entropy`: mixed precision leaves the logits in the compute type.
    let logits = crate::nn::cast_to(logits.reshape([rows * len, vocab]), DType::F32);
    let log_probs = burn::tensor::activation::log_softmax(logits, 1);
    let picked = log_probs
        .gather(1, targets.reshape([rows * len, 1]))
        .reshape([rows * len]);
    (picked * weights.reshape([rows * len])).sum().neg()
}
