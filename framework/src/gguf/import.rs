//! Loading a GGUF file that [`super::export`] can write (`general.architecture` `llama`, or
//! Strata's own `strata`) into a Strata model: every tensor is dequantized to f32 and put back in
//! Strata's layout ([`super::layout`], the query/key permutation undone), so `generate` and
//! `eval` run GGUF files, and a GGUF model can be trained further. Quantized kernels that compute
//! on the blocks directly are not implemented yet.

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::gguf::format::{GgufHeader, Value, read_header};
use crate::gguf::layout::model_tensors;
use crate::gguf::quant::dequantize;
use crate::gguf::tokenizer::{is_byte_vocabulary, read_tokenizer};
use crate::io::params::{HostTensor, assign_params, param_shapes};
use crate::model::{Llama, ModelConfig};
use crate::tokenizer::{Tokenizer, TokenizerConfig};

/// The model, its config, and its tokenizer (Strata's byte vocabulary is the one recognised).
pub fn load_llama_gguf<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(ModelConfig, Llama<B>, Box<dyn Tokenizer>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Safety: read-only map of a file we do not modify while it is open.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let header = read_header(&bytes, path)?;
    let config = model_config(&header, path)?;
    let tokenizer = read_tokenizer(&header, path)?;

    let mut tensors: HashMap<String, HostTensor> = HashMap::new();
    for (i, (info, _)) in header.tensors.iter().enumerate() {
        let values = dequantize(info.ty, header.tensor_bytes(&bytes, i)?)?;
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        tensors.insert(info.name.clone(), HostTensor { shape, values });
    }
    let head_dim = config.head_dim();
    let model = config.init::<B>(device);
    let mut params = HashMap::new();
    for t in model_tensors(&config, &param_shapes(&model)) {
        let found = tensors
            .remove(&t.gguf)
            .ok_or_else(|| Error::file(path, format!("has no tensor {}", t.gguf)))?;
        params.insert(t.ours, t.layout.from_gguf(found, head_dim));
    }
    let model = assign_params(model, &params, path)?;
    Ok((config, model, tokenizer))
}

/// The model config and tokenizer config of a GGUF file that [`load_llama_gguf`] accepts,
/// without reading its tensors.
pub fn read_config(path: &Path) -> Result<(ModelConfig, TokenizerConfig)> {
    let header = read_file_header(path)?;
    read_tokenizer(&header, path)?;
    let tokenizer = if is_byte_vocabulary(&header) {
        TokenizerConfig::Byte
    } else {
        TokenizerConfig::Gguf {
            path: path.to_owned(),
        }
    };
    Ok((model_config(&header, path)?, tokenizer))
}

/// The tokenizer stored in the GGUF file at `path`.
pub fn read_file_tokenizer(path: &Path) -> Result<Box<dyn Tokenizer>> {
    read_tokenizer(&read_file_header(path)?, path)
}

fn read_file_header(path: &Path) -> Result<GgufHeader> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Safety: read-only map of a file we do not modify while it is open.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    read_header(&bytes, path)
}

fn model_config(header: &GgufHeader, path: &Path) -> Result<ModelConfig> {
    match header.get("general.architecture").and_then(Value::as_str) {
        Some("llama") => llama_config(header, path),
        Some("strata") => strata_config(header, path),
        arch => Err(Error::file(
            path,
            format!("general.architecture is {arch:?}; \"llama\" and \"strata\" are read"),
        )),
    }
}

/// The `strata.<key>` metadata back into a model config (every key [`ModelConfig`] has; one it
/// does not know is an error).
fn strata_config(header: &GgufHeader, path: &Path) -> Result<ModelConfig> {
    fn json(key: &str, v: &Value, path: &Path) -> Result<serde_json::Value> {
        Ok(match v {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::U32(n) => serde_json::json!(n),
            Value::U64(n) => serde_json::json!(n),
            Value::F32(f) => serde_json::json!(f64::from(*f)),
            Value::F64(f) => serde_json::json!(f),
            Value::Array(_, items) => serde_json::Value::Array(
                items
                    .iter()
                    .map(|item| json(key, item, path))
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(Error::file(
                    path,
                    format!(
                        "metadata {key} is {other:?}; expected an unsigned integer, a float, a bool, a string or a list"
                    ),
                ));
            }
        })
    }
    let mut fields = serde_json::Map::new();
    for (key, v) in &header.metadata {
        if let Some(field) = key.strip_prefix("strata.") {
            fields.insert(field.to_owned(), json(key, v, path)?);
        }
    }
    if fields.is_empty() {
        return Err(Error::file(
            path,
            "has general.architecture \"strata\" but no strata.* metadata",
        ));
    }
    let config: ModelConfig = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| Error::file(path, format!("strata.* metadata: {e}")))?;
    config.validate("strata.").map_err(|e| {
        Error::file(
            path,
            format!("its hyper-parameters are not a valid model: {e}"),
        )
    })?;
    Ok(config)
}

fn llama_config(header: &GgufHeader, path: &Path) -> Result<ModelConfig> {
    let number = |key: &str| -> Result<usize> {
        match header.get(key) {
            Some(Value::U32(v)) => Ok(*v as usize),
            Some(Value::U64(v)) => Ok(*v as usize),
            other => Err(Error::file(
                path,
                format!("metadata {key} is {other:?}; expected an unsigned integer"),
            )),
        }
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match header.get(key) {
            None => Ok(default),
            Some(Value::F32(v)) => Ok(f64::from(*v)),
            Some(Value::F64(v)) => Ok(*v),
            Some(other) => Err(Error::file(
                path,
                format!("metadata {key} is {other:?}; expected a float"),
            )),
        }
    };
    let n_heads = number("llama.attention.head_count")?;
    let vocab_size = match header.get("tokenizer.ggml.tokens") {
        Some(Value::Array(_, tokens)) => tokens.len(),
        _ => number("llama.vocab_size")?,
    };
    let config = ModelConfig {
        vocab_size,
        d_model: number("llama.embedding_length")?,
        n_layers: number("llama.block_count")?,
        n_heads,
        n_kv_heads: Some(match header.get("llama.attention.head_count_kv") {
            None => n_heads,
            Some(_) => number("llama.attention.head_count_kv")?,
        }),
        ffn_hidden: number("llama.feed_forward_length")?,
        max_seq_len: number("llama.context_length")?,
        rope_theta: float("llama.rope.freq_base", 10_000.0)?,
        norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        tie_embeddings: !header
            .tensors
            .iter()
            .any(|(t, _)| t.name == "output.weight"),
        ..ModelConfig::default()
    };
    config.validate("").map_err(|e| {
        Error::file(
            path,
            format!("its hyper-parameters are not a valid model: {e}"),
        )
    })?;
    if let Some(Value::U32(rope_dims)) = header.get("llama.rope.dimension_count")
        && *rope_dims as usize != config.head_dim()
    {
        return Err(Error::file(
            path,
            format!(
                "llama.rope.dimension_count is {rope_dims}, but only full-head RoPE (head_dim {}) \
                 is implemented",
                config.head_dim()
            ),
        ));
    }
    Ok(config)
}
