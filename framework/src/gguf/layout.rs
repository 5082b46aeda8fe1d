//! Where each parameter of a Strata Llama lives in a GGUF `llama` file and how its values are laid
//! out there: one table that export and import both read.
//!
//! llama.cpp's `llama` RoPE rotates adjacent pairs, while our RoPE uses Hugging Face's
//! rotate-half layout, so the rows of the query and key projections are permuted on the way out
//! (as llama.cpp's `convert_hf_to_gguf.py` does) and back on the way in.

use std::collections::{BTreeMap, BTreeSet};

use crate::io::params::HostTensor;
use crate::model::ModelConfig;

/// How a Strata parameter's values become the rows of a GGUF tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A norm gain: stays a vector.
    Vector,
    /// Already one row per output (the embedding).
    AsIs,
    /// A Burn `Linear` weight `[in, out]`: transposed to one row per output.
    Transposed,
    /// A query or key projection with this many heads: transposed, then its rows permuted.
    Rotary(usize),
    /// A parameter that only Strata's own architecture has (AttnRes queries and norms, say):
    /// stored as it is, named by its Strata path, in f32.
    Own,
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaTensor {
    pub gguf: String,
    /// The Strata parameter path.
    pub ours: String,
    pub layout: Layout,
    /// The GGUF shape in ggml order: `[cols, rows]`, or `[len]` for a vector.
    pub dims: Vec<u64>,
}

impl Layout {
    /// Strata's values → the GGUF tensor's rows.
    pub fn to_gguf(self, t: HostTensor, head_dim: usize) -> HostTensor {
        match self {
            Layout::Vector | Layout::AsIs | Layout::Own => t,
            Layout::Transposed => t.transposed(),
            Layout::Rotary(heads) => permute_rotary(&t.transposed(), heads, head_dim),
        }
    }

    /// The GGUF tensor's rows → Strata's values.
    pub fn from_gguf(self, t: HostTensor, head_dim: usize) -> HostTensor {
        match self {
            Layout::Vector | Layout::AsIs | Layout::Own => t,
            Layout::Transposed => t.transposed(),
            Layout::Rotary(heads) => unpermute_rotary(&t, heads, head_dim).transposed(),
        }
    }
}

/// Every tensor of a `llama` GGUF file for `config`, in the order export writes them.
pub fn llama_tensors(config: &ModelConfig) -> Vec<LlamaTensor> {
    let (d, ffn, vocab) = (config.d_model, config.ffn_hidden, config.vocab_size);
    let head_dim = config.head_dim();
    let (q_heads, kv_heads) = (config.n_heads, config.kv_heads());
    let mut out = Vec::new();
    let mut add = |gguf: String, ours: String, layout: Layout, rows: usize, cols: usize| {
        let dims = match layout {
            Layout::Vector => vec![cols as u64],
            _ => vec![cols as u64, rows as u64],
        };
        out.push(LlamaTensor {
            gguf,
            ours,
            layout,
            dims,
        });
    };
    add(
        "token_embd.weight".into(),
        "embed.weight".into(),
        Layout::AsIs,
        vocab,
        d,
    );
    for i in 0..config.n_layers {
        let (blk, p) = (format!("blk.{i}"), format!("blocks.{i}"));
        for (gguf, ours, layout, rows, cols) in [
            ("attn_norm", "attn_norm.gamma", Layout::Vector, 0, d),
            (
                "attn_q",
                "attn.wq.weight",
                Layout::Rotary(q_heads),
                q_heads * head_dim,
                d,
            ),
            (
                "attn_k",
                "attn.wk.weight",
                Layout::Rotary(kv_heads),
                kv_heads * head_dim,
                d,
            ),
            (
                "attn_v",
                "attn.wv.weight",
                Layout::Transposed,
                kv_heads * head_dim,
                d,
            ),
            (
                "attn_output",
                "attn.wo.weight",
                Layout::Transposed,
                d,
                q_heads * head_dim,
            ),
            ("ffn_norm", "mlp_norm.gamma", Layout::Vector, 0, d),
            ("ffn_gate", "mlp.w_gate.weight", Layout::Transposed, ffn, d),
            ("ffn_up", "mlp.w_up.weight", Layout::Transposed, ffn, d),
            ("ffn_down", "mlp.w_down.weight", Layout::Transposed, d, ffn),
        ] {
            add(
                format!("{blk}.{gguf}.weight"),
                format!("{p}.{ours}"),
                layout,
                rows,
                cols,
            );
        }
    }
    add(
        "output_norm.weight".into(),
        "norm.gamma".into(),
        Layout::Vector,
        0,
        d,
    );
    if !config.tie_embeddings {
        add(
            "output.weight".into(),
            "lm_head.weight".into(),
            Layout::Transposed,
            vocab,
            d,
        );
    }
    out
}

/// Every tensor of a GGUF file for a model with these parameters (path → shape): the `llama`
/// table's entries for the parameters the model has (a layer that shares another's keys and
/// values has no key or value projection), then every parameter the table does not name, under
/// its Strata path ([`Layout::Own`]). For a plain Llama that is exactly [`llama_tensors`]. LoRA
/// adapters are not model tensors: they are merged first or written as an adapter file
/// ([`super::adapter`]).
pub fn model_tensors(
    config: &ModelConfig,
    params: &BTreeMap<String, Vec<usize>>,
) -> Vec<LlamaTensor> {
    let mut out: Vec<LlamaTensor> = llama_tensors(config)
        .into_iter()
        .filter(|t| params.contains_key(&t.ours))
        .collect();
    let named: BTreeSet<String> = out.iter().map(|t| t.ours.clone()).collect();
    for (path, shape) in params {
        if !named.contains(path) && !path.contains(".lora.") {
            out.push(LlamaTensor {
                gguf: path.clone(),
                ours: path.clone(),
                layout: Layout::Own,
                dims: shape.iter().rev().map(|&d| d as u64).collect(),
            });
        }
    }
    out
}

/// HF → GGUF row order of a query or key projection (`[heads·head_dim, d_in]` rows): within each
/// head, row `t·head_dim/2 + i` (rotate-half pair member t of pair i) moves to `2i + t`
/// (adjacent pairs).
pub fn permute_rotary(w: &HostTensor, heads: usize, head_dim: usize) -> HostTensor {
    move_rows(w, rotary_rows(heads, head_dim))
}

/// The inverse of [`permute_rotary`]: adjacent pairs back to rotate-half rows.
pub fn unpermute_rotary(w: &HostTensor, heads: usize, head_dim: usize) -> HostTensor {
    move_rows(w, rotary_rows(heads, head_dim).map(|(hf, gguf)| (gguf, hf)))
}

/// `(rotate-half row, adjacent-pair row)` for every row of the projection.
fn rotary_rows(heads: usize, head_dim: usize) -> impl Iterator<Item = (usize, usize)> {
    let half = head_dim / 2;
    (0..heads).flat_map(move |h| {
        (0..2).flat_map(move |t| {
            (0..half).map(move |i| (h * head_dim + t * half + i, h * head_dim + 2 * i + t))
        })
    })
}

/// Copies row `from` of `w` to row `to` for each `(from, to)`.
fn move_rows(w: &HostTensor, moves: impl Iterator<Item = (usize, usize)>) -> HostTensor {
    let cols = w.shape[1];
    let mut values = vec![0f32; w.values.len()];
    for (from, to) in moves {
        values[to * cols..(to + 1) * cols]
            .copy_from_slice(&w.values[from * cols..(from + 1) * cols]);
    }
    HostTensor {
        shape: w.shape.clone(),
        values,
    }
}
