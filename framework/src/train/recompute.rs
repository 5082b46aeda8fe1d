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
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use super::{batch_tensors, logits_loss};
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

/// Forward and backward of one micro-batch with recomputation in segments of
/// `blocks_per_segment` blocks. Adds the gradients of `loss · loss_scale` to `accumulator` and
/// returns that scaled loss. The model's residual stream must be a single tensor
/// ([`Llama::has_single_stream`]); the config check refuses other models.
pub fn loss_and_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &Batch,
    loss_scale: f64,
    blocks_per_segment: usize,
    offload: bool,
    accumulator: &mut GradientsAccumulator<Llama<B>>,
    device: &B::Device,
) -> f64 {
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

    // Head: the loss from the last hidden state, and the gradient arriving there.
    let last = Tensor::<B, 3>::from_inner(h).require_grad();
    let (loss, _) = logits_loss(model.logits(last.clone()), targets, batch, device);
    let loss = loss.mul_scalar(loss_scale);
    let loss_value = loss.clone().into_scalar().elem::<f64>();
    let grads = loss.backward();
    let mut grad = last
        .grad(&grads)
        .expect("the last hidden state requires a gradient");
    accumulator.accumulate(model, GradientsParams::from_grads(grads, model));

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
