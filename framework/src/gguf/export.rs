//! Export of a Strata model to GGUF. A plain Llama (standard residual, dense attention, every
//! layer its own keys and values) is written as `general.architecture = "llama"` in the layout
//! llama.cpp loads (tensor names, metadata keys and their exact types as llama.cpp's loader
//! checks them). Any other model (AttnRes, sequence-block or 3D-coordinate attention, KV
//! sharing) is written as Strata's own architecture, `strata`: every `ModelConfig` key as
//! `strata.<key>` metadata, the tensors llama's table names under those names, and the rest
//! under their Strata paths. Our engine loads both; llama.cpp refuses `strata` with its
//! ordinary "unknown model architecture" error.
//!
//! Tensor names and layouts come from [`super::layout`] (query/key rows permuted for llama.cpp's
//! RoPE); the byte tokenizer is written as a GPT-2-style byte-level BPE vocabulary without
//! merges, which llama.cpp tokenizes byte for byte; other tokenizers as
//! [`super::tokenizer::tokenizer_metadata`] writes them.

use std::path::Path;

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::gguf::format::{TensorInfo, Value, ValueType, write_gguf};
use crate::gguf::layout::{Layout, model_tensors};
use crate::gguf::preset::Quantization;
use crate::gguf::quant::{GgmlType, quantize};
use crate::gguf::tokenizer::tokenizer_metadata;
use crate::io::params::{named_param, param_shapes};
use crate::model::{AttentionKind, Llama, ModelConfig, ResidualMode};
use crate::tokenizer::{ByteTokenizer, TokenizerConfig};

/// What an export wrote: each tensor's GGUF name and type.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub tensors: Vec<(String, GgmlType)>,
    pub bytes: u64,
}

impl ExportSummary {
    /// What was written to `path` with these tensors.
    pub(crate) fn of(infos: &[TensorInfo], path: &Path) -> Result<Self> {
        Ok(Self {
            tensors: infos.iter().map(|t| (t.name.clone(), t.ty)).collect(),
            bytes: std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .len(),
        })
    }
}

/// Writes `model` to `path` with its matrices stored as `quantization` says (a type, or a
/// llama.cpp k-quant preset; see [`Quantization::matrix_type`] for rows that do not fill whole
/// blocks); norm gains stay F32.
pub fn export_llama<B: Backend>(
    model: &Llama<B>,
    config: &ModelConfig,
    tokenizer: &TokenizerConfig,
    name: &str,
    quantization: impl Into<Quantization>,
    path: &Path,
) -> Result<ExportSummary> {
    let quantization = quantization.into();
    let tokenizer_metadata = tokenizer_metadata(tokenizer, config.vocab_size)?;
    // Each tensor is fetched from the model and converted only when the writer reaches it, so
    // the host holds one tensor at a time besides the model itself.
    let plan = model_tensors(config, &param_shapes(model));
    let head_dim = config.head_dim();
    let infos: Vec<TensorInfo> = plan
        .iter()
        .map(|t| TensorInfo {
            name: t.gguf.clone(),
            dims: t.dims.clone(),
            ty: match t.layout {
                Layout::Vector | Layout::Own => GgmlType::F32,
                _ => quantization.matrix_type(
                    &t.gguf,
                    t.dims[0] as usize,
                    config.n_layers,
                    !config.tie_embeddings,
                ),
            },
        })
        .collect();
    let mut metadata = match architecture(config) {
        "llama" => llama_metadata(config, name, quantization),
        _ => strata_metadata(config, name, quantization)?,
    };
    metadata.extend(tokenizer_metadata);
    write_gguf(path, &metadata, &infos, |i| {
        let t = &plan[i];
        let tensor = named_param(model, &t.ours)
            .ok_or_else(|| Error::Data(format!("the model has no parameter {}", t.ours)))?;
        let rows = t.layout.to_gguf(tensor, head_dim);
        if rows.values.len() as u64 != t.dims.iter().product::<u64>() {
            return Err(Error::Data(format!(
                "parameter {} has shape {:?}, the GGUF tensor {} needs {:?} (ggml order)",
                t.ours, rows.shape, t.gguf, t.dims
            )));
        }
        quantize(infos[i].ty, &rows.values)
    })?;
    ExportSummary::of(&infos, path)
}

/// The GGUF architecture `config` is written as: `llama` when llama.cpp's `llama` loader computes
/// the same function, `strata` otherwise.
pub fn architecture(config: &ModelConfig) -> &'static str {
    let plain = config.residual == ResidualMode::Standard
        && config.attention == AttentionKind::Dense
        && config.kv_share == 1;
    if plain { "llama" } else { "strata" }
}

fn general_metadata(arch: &str, name: &str, quantization: Quantization) -> Vec<(String, Value)> {
    let mut kv = vec![
        ("general.architecture", Value::String(arch.into())),
        ("general.name", Value::String(name.into())),
        ("general.file_type", Value::U32(quantization.file_type())),
        ("general.alignment", Value::U32(32)),
    ];
    if quantization.is_quantized() {
        kv.push(("general.quantization_version", Value::U32(2)));
    }
    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `strata.<key>` for every key of the model config, typed: integers u32, floats f64 (exact),
/// switches bool, variant names strings, lists arrays. Unset options are left out.
fn strata_metadata(
    config: &ModelConfig,
    name: &str,
    quantization: Quantization,
) -> Result<Vec<(String, Value)>> {
    fn value(key: &str, v: &serde_json::Value) -> Result<Option<Value>> {
        Ok(Some(match v {
            serde_json::Value::Null => return Ok(None),
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => Value::U32(u32::try_from(u).map_err(|_| {
                    Error::config(key, u, "a value below 2^32 (GGUF metadata u32)")
                })?),
                (None, Some(f)) => Value::F64(f),
                _ => return Err(Error::config(key, n, "a non-negative integer or a float")),
            },
            serde_json::Value::Array(items) => {
                let items: Vec<Value> = items
                    .iter()
                    .map(|item| value(key, item))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect();
                let ty = items.first().map_or(ValueType::U32, Value::kind);
                Value::Array(ty, items)
            }
            serde_json::Value::Object(_) => {
                return Err(Error::config(key, "a table", "a single value or a list"));
            }
        }))
    }
    let mut kv = general_metadata("strata", name, quantization);
    let fields = match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => unreachable!("ModelConfig serialises to a table"),
    };
    for (key, v) in &fields {
        let key = format!("strata.{key}");
        if let Some(v) = value(&key, v)? {
            kv.push((key, v));
        }
    }
    Ok(kv)
}

fn llama_metadata(
    config: &ModelConfig,
    name: &str,
    quantization: Quantization,
) -> Vec<(String, Value)> {
    let u32v = |v: usize| Value::U32(v as u32);
    let kv: Vec<(&str, Value)> = vec![
        ("llama.context_length", u32v(config.max_seq_len)),
        ("llama.embedding_length", u32v(config.d_model)),
        ("llama.block_count", u32v(config.n_layers)),
        ("llama.feed_forward_length", u32v(config.ffn_hidden)),
        ("llama.attention.head_count", u32v(config.n_heads)),
        ("llama.attention.head_count_kv", u32v(config.kv_heads())),
        // llama.cpp rejects these as f64: they must be f32.
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(config.norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(config.rope_theta as f32)),
        ("llama.rope.dimension_count", u32v(config.head_dim())),
        ("llama.vocab_size", u32v(config.vocab_size)),
    ];
    let mut out = general_metadata("llama", name, quantization);
    out.extend(kv.into_iter().map(|(k, v)| (k.to_owned(), v)));
    out
}

/// The byte tokenizer as a GPT-2-style byte-level BPE vocabulary with no merges: token b is
/// GPT-2's printable stand-in for byte b, so llama.cpp maps text to exactly our ids; BOS, EOS
/// and PAD are control tokens, and ids past them (a larger model vocabulary) are unused.
pub(crate) fn byte_tokenizer_metadata(vocab_size: usize) -> Vec<(String, Value)> {
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    const UNUSED: i32 = 5;
    let stand_in = gpt2_byte_chars();
    let mut tokens: Vec<Value> = (0..256)
        .map(|b| Value::String(stand_in[b].to_string()))
        .collect();
    let mut types: Vec<Value> = vec![Value::I32(NORMAL); 256];
    for special in ["<s>", "</s>", "<pad>"] {
        tokens.push(Value::String(special.into()));
        types.push(Value::I32(CONTROL));
    }
    for i in tokens.len()..vocab_size {
        tokens.push(Value::String(format!("<unused{i}>")));
        types.push(Value::I32(UNUSED));
    }
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(ValueType::String, tokens),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, types),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(ValueType::String, Vec::new()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(ByteTokenizer::BOS),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(ByteTokenizer::EOS),
        ),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(ByteTokenizer::PAD),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ]
}

/// The 259 token strings of the byte tokenizer in GGUF: the 256 byte stand-ins, then BOS, EOS, PAD.
pub fn byte_tokenizer_tokens() -> Vec<String> {
    let mut tokens: Vec<String> = gpt2_byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.extend(["<s>", "</s>", "<pad>"].map(String::from));
    tokens
}

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the others for code points
/// from 256 up, in byte order.
fn gpt2_byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let c = char::from_u32(next).unwrap_or('?');
                next += 1;
                c
            }
        })
        .collect()
}
