//! LoRA adapters as a GGUF adapter file, which llama.cpp applies on top of its base model
//! (`llama-cli -m base.gguf --lora adapter.gguf`, llama-cpp-python's `lora_path`) instead of
//! merging them into the weights.
//!
//! The layout is llama.cpp's (`llama-adapter.cpp`): `general.type = "adapter"`,
//! `adapter.type = "lora"`, `adapter.lora.alpha`, and for each adapted matrix of the base file,
//! `<tensor name>.lora_a` (`blk.0.attn_q.weight.lora_a`) with rows `[r, d_in]` and
//! `<tensor name>.lora_b` with rows `[d_out, r]`, so that the update is `B·A` in the base
//! tensor's own row order: B's rows of a query or key projection are
//! permuted as the base rows are ([`super::layout`]). llama.cpp scales the update by
//! `alpha / r`, so `alpha` is written as our scale times the rank (rsLoRA's `alpha / √r`
//! included).

use std::path::Path;

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::gguf::export::{ExportSummary, architecture};
use crate::gguf::format::{TensorInfo, Value, write_gguf};
use crate::gguf::layout::{Layout, llama_tensors, permute_rotary};
use crate::gguf::quant::{GgmlType, quantize};
use crate::io::params::{HostTensor, named_param};
use crate::model::{Llama, ModelConfig};
use crate::nn::lora::LoraConfig;

/// Writes the adapters of `model` (a LoRA model over a plain Llama base) to `path` as a GGUF
/// LoRA adapter for the base that [`super::export::export_llama`] writes from the same model
/// with its adapters left out. Tensors are f32.
pub fn export_lora_adapter<B: Backend>(
    model: &Llama<B>,
    config: &ModelConfig,
    lora: &LoraConfig,
    name: &str,
    path: &Path,
) -> Result<ExportSummary> {
    if architecture(config) != "llama" {
        return Err(Error::config(
            "model",
            architecture(config),
            "a plain Llama (llama.cpp applies adapters to its `llama` architecture only)",
        ));
    }
    let head_dim = config.head_dim();
    // (GGUF name, Strata path of A or B, which, rows permuted for RoPE by this many heads)
    let mut plan = Vec::new();
    for t in llama_tensors(config) {
        let Some(module) = t.ours.strip_suffix(".weight") else {
            continue;
        };
        let a_path = format!("{module}.lora.a");
        if named_param(model, &a_path).is_none() {
            continue;
        }
        let heads = match t.layout {
            Layout::Rotary(heads) => Some(heads),
            Layout::Transposed => None,
            _ => {
                return Err(Error::config(
                    "lora.targets",
                    &t.ours,
                    "projections and the LM head (llama.cpp's adapters on embeddings are laid \
                     out otherwise)",
                ));
            }
        };
        plan.push((format!("{}.lora_a", t.gguf), a_path, None));
        plan.push((
            format!("{}.lora_b", t.gguf),
            format!("{module}.lora.b"),
            heads,
        ));
    }
    if plan.is_empty() {
        return Err(Error::file(
            path,
            "cannot be written: the model has no LoRA adapters on llama.cpp's tensors",
        ));
    }
    // Rows of each tensor as GGUF stores them: A `[d_in, r]` → `[r, d_in]`, B `[r, d_out]` →
    // `[d_out, r]` (permuted for RoPE).
    let rows = |i: usize| -> Result<HostTensor> {
        let (_, ours, heads) = &plan[i];
        let t = named_param(model, ours)
            .ok_or_else(|| Error::Data(format!("the model has no parameter {ours}")))?
            .transposed();
        Ok(match heads {
            Some(heads) => permute_rotary(&t, *heads, head_dim),
            None => t,
        })
    };
    let infos: Vec<TensorInfo> = (0..plan.len())
        .map(|i| {
            let shape = named_param(model, &plan[i].1)
                .map(|t| t.shape)
                .unwrap_or_default();
            TensorInfo {
                name: plan[i].0.clone(),
                // ggml order of the stored rows: [cols, rows] = the Strata shape.
                dims: shape.iter().map(|&d| d as u64).collect(),
                ty: GgmlType::F32,
            }
        })
        .collect();
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.type".into(), Value::String("adapter".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.alignment".into(), Value::U32(32)),
        ("adapter.type".into(), Value::String("lora".into())),
        (
            "adapter.lora.alpha".into(),
            Value::F32((lora.scale() * lora.rank as f64) as f32),
        ),
    ];
    write_gguf(path, &metadata, &infos, |i| {
        quantize(GgmlType::F32, &rows(i)?.values)
    })?;
    ExportSummary::of(&infos, path)
}
