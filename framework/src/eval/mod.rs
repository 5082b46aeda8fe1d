//! Held-out loss, perplexity and bits per byte; per-sub-layer depth statistics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::error::Result;
use crate::io::atomic_write;
use crate::model::Llama;
use crate::train::{batch_loss, batch_tensors};

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
        let (loss, n) = batch_loss(model, batch, &device);
        total += loss.into_scalar().elem::<f64>() * n as f64;
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

/// One row of a [`DepthProfile`]: a sub-layer (`attn 3`, `mlp 3`) or the final read (`output`).
#[derive(Debug, Clone, PartialEq)]
pub struct DepthRow {
    pub name: String,
    /// RMS of the sub-layer's input h_l, before its pre-norm.
    pub input_rms: f64,
    /// RMS of its output f_l(h_l); none for `output`.
    pub output_rms: Option<f64>,
    /// RMS of the gradient of its parameters (norm, depth attention and weights together).
    pub grad_rms: Option<f64>,
    /// AttnRes only: the mean weight on each source, named in `sources`.
    pub weights: Vec<f64>,
    pub sources: Vec<String>,
}

/// Per-sub-layer statistics on held-out batches, averaged over them: how the residual stream's
/// magnitude grows with depth and, under AttnRes, where each sub-layer reads from.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthProfile {
    pub rows: Vec<DepthRow>,
}

pub fn depth_profile<B: Backend>(model: &Llama<B>, batches: &[Batch]) -> DepthProfile {
    let device = model.embed.weight.device();
    let mut rows: Vec<DepthRow> = Vec::new();
    for batch in batches {
        let (inputs, _) = batch_tensors::<B>(batch, &device);
        let (_, trace) = model.forward_traced(inputs);
        if rows.is_empty() {
            rows = trace
                .iter()
                .enumerate()
                .map(|(l, t)| DepthRow {
                    name: sublayer_name(l, trace.len() - 1),
                    input_rms: 0.0,
                    output_rms: t.output_rms.map(|_| 0.0),
                    grad_rms: None,
                    weights: vec![0.0; t.depth_weights.len()],
                    sources: source_names(model.attnres_block_len, l, t.depth_weights.len()),
                })
                .collect();
        }
        let share = 1.0 / batches.len() as f64;
        for (row, t) in rows.iter_mut().zip(&trace) {
            // RMS averages as a root of the mean square, so batches of equal size combine exactly.
            row.input_rms += share * f64::from(t.input_rms).powi(2);
            if let (Some(sum), Some(v)) = (row.output_rms.as_mut(), t.output_rms) {
                *sum += share * f64::from(v).powi(2);
            }
            for (w, v) in row.weights.iter_mut().zip(&t.depth_weights) {
                *w += share * f64::from(*v);
            }
        }
    }
    for row in &mut rows {
        row.input_rms = row.input_rms.sqrt();
        row.output_rms = row.output_rms.map(f64::sqrt);
    }
    DepthProfile { rows }
}

impl DepthProfile {
    /// Sets `grad_rms` from per-parameter (sum of squares, count) keyed by parameter path.
    pub fn set_gradients(&mut self, squares: &BTreeMap<String, (f64, usize)>) {
        let sublayers = self.rows.len() - 1;
        for (l, row) in self.rows.iter_mut().enumerate() {
            let prefixes = if l == sublayers {
                vec!["output_res.".to_owned(), "norm.".to_owned()]
            } else {
                let part = if l % 2 == 0 { "attn" } else { "mlp" };
                vec![format!("blocks.{}.{part}", l / 2)]
            };
            let (sum, count) = squares
                .iter()
                .filter(|(path, _)| prefixes.iter().any(|p| path.starts_with(p.as_str())))
                .fold((0.0, 0), |(s, c), (_, (sq, n))| (s + sq, c + n));
            row.grad_rms = (count > 0).then(|| (sum / count as f64).sqrt());
        }
    }

    /// Writes `depth.csv` (one row per sub-layer) and, for AttnRes models, `depth_weights.csv`
    /// (one row per sub-layer and source) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.6e}")).unwrap_or_default();
        atomic_write(&dir.join("depth.csv"), |f| {
            writeln!(f, "layer,name,input_rms,output_rms,grad_rms")?;
            for (l, row) in self.rows.iter().enumerate() {
                writeln!(
                    f,
                    "{l},{},{:.6e},{},{}",
                    row.name,
                    row.input_rms,
                    opt(row.output_rms),
                    opt(row.grad_rms)
                )?;
            }
            Ok(())
        })?;
        if self.rows.iter().any(|r| !r.weights.is_empty()) {
            atomic_write(&dir.join("depth_weights.csv"), |f| {
                writeln!(f, "layer,name,source,source_name,weight")?;
                for (l, row) in self.rows.iter().enumerate() {
                    for (s, (w, source)) in row.weights.iter().zip(&row.sources).enumerate() {
                        writeln!(f, "{l},{},{s},{source},{w:.6}", row.name)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

fn sublayer_name(layer: usize, sublayers: usize) -> String {
    match layer {
        l if l == sublayers => "output".into(),
        l if l % 2 == 0 => format!("attn {}", l / 2),
        l => format!("mlp {}", l / 2),
    }
}

/// What each source of sub-layer `layer` is: the embedding, a completed block (under Full
/// AttnRes, the output of one sub-layer), or the current block's partial sum.
fn source_names(block_len: usize, layer: usize, count: usize) -> Vec<String> {
    // Not AttnRes (block length 0): no sources.
    let completed = layer.checked_div(block_len).map_or(0, |n| n + 1);
    (0..count)
        .map(|s| match s {
            0 => "embedding".into(),
            s if s >= completed => "partial".into(),
            s if block_len == 1 => sublayer_name(s - 1, usize::MAX),
            s => format!("block {s}"),
        })
        .collect()
}
