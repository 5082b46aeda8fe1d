//! Import of Hugging Face Llama-architecture checkpoints: `config.json`, one or several
//! safetensors shards (`model.safetensors` or `model.safetensors.index.json`) and
//! `tokenizer.json`. HF stores linear weights as `[out, in]`; Burn's `Linear` holds `[in, out]`.

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::params::{HostTensor, assign_params, load_safetensors};
use crate::model::{Llama, ModelConfig};

/// The keys of HF's `LlamaConfig` that the architecture depends on.
#[derive(Debug, Clone, Deserialize)]
pub struct HfLlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub head_dim: Option<usize>,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_theta() -> f64 {
    10_000.0
}

impl HfLlamaConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a Llama config.json: {e}")))?;
        let unsupported = |what: &str| {
            Err(Error::file(
                path,
                format!("{what} is not supported by the Llama importer"),
            ))
        };
        if config.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("rope_scaling");
        }
        if config.attention_bias || config.mlp_bias {
            return unsupported("attention_bias / mlp_bias");
        }
        if config.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return unsupported("hidden_act other than silu");
        }
        if config
            .head_dim
            .is_some_and(|h| h * config.num_attention_heads != config.hidden_size)
        {
            return unsupported("head_dim × num_attention_heads ≠ hidden_size");
        }
        Ok(config)
    }

    pub fn to_model_config(&self) -> ModelConfig {
        ModelConfig {
            vocab_size: self.vocab_size,
            d_model: self.hidden_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: Some(self.num_key_value_heads.unwrap_or(self.num_attention_heads)),
            ffn_hidden: self.intermediate_size,
            max_seq_len: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            norm_eps: self.rms_norm_eps,
            tie_embeddings: self.tie_word_embeddings,
            init_std: 0.02,
            ..ModelConfig::default()
        }
    }
}

/// Reads every tensor of the checkpoint in `dir`, across shards.
fn read_shards(dir: &Path) -> Result<HashMap<String, HostTensor>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(load_safetensors(&single)?.0);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).map_err(|_| {
        Error::file(
            dir,
            "holds neither model.safetensors nor model.safetensors.index.json",
        )
    })?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&index_path, e))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(&index_path, "has no \"weight_map\" object"))?;
    let mut shards: Vec<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
    shards.sort();
    shards.dedup();
    let mut all = HashMap::new();
    for shard in shards {
        all.extend(load_safetensors(&dir.join(shard))?.0);
    }
    Ok(all)
}

/// Per-layer tensors: HF's name under `model.layers.N.`, ours under `blocks.N.`, and whether it
/// is a linear weight (stored transposed).
const LAYER_TENSORS: [(&str, &str, bool); 9] = [
    ("self_attn.q_proj.weight", "attn.wq.weight", true),
    ("self_attn.k_proj.weight", "attn.wk.weight", true),
    ("self_attn.v_proj.weight", "attn.wv.weight", true),
    ("self_attn.o_proj.weight", "attn.wo.weight", true),
    ("mlp.gate_proj.weight", "mlp.w_gate.weight", true),
    ("mlp.up_proj.weight", "mlp.w_up.weight", true),
    ("mlp.down_proj.weight", "mlp.w_down.weight", true),
    ("input_layernorm.weight", "attn_norm.gamma", false),
    ("post_attention_layernorm.weight", "mlp_norm.gamma", false),
];

/// Whole-model tensors: HF's name, ours, transposed.
const MODEL_TENSORS: [(&str, &str, bool); 3] = [
    ("model.embed_tokens.weight", "embed.weight", false),
    ("model.norm.weight", "norm.gamma", false),
    ("lm_head.weight", "lm_head.weight", true),
];

/// HF tensor name → our parameter path, and whether the tensor is a linear weight to transpose.
pub fn our_name(hf: &str) -> Option<(String, bool)> {
    if let Some((_, ours, t)) = MODEL_TENSORS.iter().find(|(name, _, _)| *name == hf) {
        return Some((ours.to_string(), *t));
    }
    let (index, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (_, ours, t) = LAYER_TENSORS.iter().find(|(name, _, _)| *name == rest)?;
    Some((format!("blocks.{index}.{ours}"), *t))
}

/// Our parameter path → HF's tensor name (the inverse of [`our_name`]).
pub fn hf_name(ours: &str) -> Option<String> {
    if let Some((hf, _, _)) = MODEL_TENSORS.iter().find(|(_, name, _)| *name == ours) {
        return Some(hf.to_string());
    }
    let (index, rest) = ours.strip_prefix("blocks.")?.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let (hf, _, _) = LAYER_TENSORS.iter().find(|(_, name, _)| *name == rest)?;
    Some(format!("model.layers.{index}.{hf}"))
}

/// Loads a HF Llama checkpoint folder as a model on `device`.
pub fn load_llama<B: Backend>(dir: &Path, device: &B::Device) -> Result<(ModelConfig, Llama<B>)> {
    let hf = HfLlamaConfig::read(&dir.join("config.json"))?;
    let config = hf.to_model_config();
    config
        .validate("config.json: ")
        .map_err(|e| Error::file(dir.join("config.json"), e))?;
    let mut ours = HashMap::new();
    for (name, tensor) in read_shards(dir)? {
        if name.ends_with("rotary_emb.inv_freq") {
            continue; // recomputed from rope_theta
        }
        if config.tie_embeddings && name == "lm_head.weight" {
            continue; // the same tensor as the embedding
        }
        let (path, transpose) = our_name(&name)
            .ok_or_else(|| Error::file(dir, format!("unexpected tensor `{name}`")))?;
        ours.insert(
            path,
            if transpose {
                tensor.transposed()
            } else {
                tensor
            },
        );
    }
    let model = assign_params(config.init::<B>(device), &ours, dir)?;
    Ok((config, model))
}
