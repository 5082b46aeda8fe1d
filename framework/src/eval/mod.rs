//! Held-out loss, perplexity and bits per byte.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::model::Llama;
use crate::train::batch_tensors;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Mean cross-entropy, nats per token.
    pub loss: f64,
    pub perplexity: f64,
    /// loss / ln 2 / (text bytes per token): comparable across tokenizers.
    pub bits_per_byte: f64,
    pub tokens: usize,
}

pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    batches: &[Batch],
    bytes_per_token: f64,
) -> EvalReport {
    let device = model.embed.weight.device();
    let mut total = 0.0;
    let mut tokens = 0;
    for batch in batches {
        let (inputs, targets) = batch_tensors::<B>(batch, &device);
        let n = batch.batch * batch.seq;
        total += model.loss(inputs, targets).into_scalar().elem::<f64>() * n as f64;
        tokens += n;
    }
    let loss = total / tokens.max(1) as f64;
    EvalReport {
        loss,
        perplexity: loss.exp(),
        bits_per_byte: loss / std::f64::consts::LN_2 / bytes_per_token,
        tokens,
    }
}
