//! LoRA adapters in Hugging Face PEFT's layout: a folder with `adapter_config.json` and
//! `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (`[r, d_in]`) and
//! `….lora_B.weight` (`[d_out, r]`). Ours hold A `[d_in, r]` and B `[r, d_out]`, so both are
//! transposed on the way in and out. A folder written here loads with
//! `PeftModel.from_pretrained`, and one PEFT wrote loads here.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use burn::prelude::*;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::io::atomic_write;
use crate::io::hf::{hf_name, our_name};
use crate::io::params::{
    HostTensor, assign_params_where, load_safetensors, named_params_where, save_safetensors,
};
use crate::model::Llama;
use crate::nn::lora::{LoraConfig, canonical_target, peft_module_name};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

fn is_adapter(path: &str) -> bool {
    path.contains(".lora.")
}

/// `blocks.0.attn.wq.lora.a` → `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
fn peft_name(ours: &str) -> Option<String> {
    let (projection, which) = ours.rsplit_once(".lora.")?;
    let suffix = match which {
        "a" => "lora_A.weight",
        "b" => "lora_B.weight",
        _ => return None,
    };
    let hf = hf_name(&format!("{projection}.weight"))?;
    Some(format!("{PREFIX}{}.{suffix}", hf.strip_suffix(".weight")?))
}

/// The inverse of [`peft_name`] (PEFT also accepts the name with the adapter name inserted).
fn ours_from_peft(peft: &str) -> Option<String> {
    let rest = peft.strip_prefix(PREFIX)?;
    let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, "a")
    } else {
        (rest.strip_suffix(".lora_B.weight")?, "b")
    };
    let (ours, _) = our_name(&format!("{module}.weight"))?;
    Some(format!("{}.lora.{which}", ours.strip_suffix(".weight")?))
}

/// Writes the adapters of `model` to `dir` in PEFT's layout. `base` is recorded as
/// `base_model_name_or_path`.
pub fn save_adapter<B: Backend>(
    model: &Llama<B>,
    config: &LoraConfig,
    base: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = std::collections::BTreeMap::new();
    for (path, tensor) in named_params_where(model, &is_adapter) {
        let name = peft_name(&path)
            .ok_or_else(|| Error::file(dir, format!("no PEFT name for adapter `{path}`")))?;
        tensors.insert(name, tensor.transposed());
    }
    if tensors.is_empty() {
        return Err(Error::file(dir, "the model has no LoRA adapters to save"));
    }
    let targets: Vec<&str> = config
        .targets
        .iter()
        .filter_map(|t| canonical_target(t))
        .map(peft_module_name)
        .collect();
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    save_safetensors(&dir.join(WEIGHTS_FILE), &tensors, metadata)?;
    let text = serde_json::to_string_pretty(&adapter_config).map_err(|e| Error::file(dir, e))?;
    atomic_write(&dir.join(CONFIG_FILE), |f| f.write_all(text.as_bytes()))
}

/// Reads `adapter_config.json` into our config, refusing the PEFT options we do not implement.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    let field = |key: &str| value.get(key).filter(|v| !v.is_null());
    let bad = |key: &str, expected: &str| {
        Error::file(
            &path,
            format!(
                "`{key}` is {}; expected {expected}",
                field(key).map_or("missing".into(), |v| v.to_string())
            ),
        )
    };
    if field("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad("peft_type", "\"LORA\""));
    }
    let rank = field("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r", "a positive integer"))? as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("lora_alpha", "a number"))?;
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let rslora = field("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let targets = match field("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("target_modules", "a list of module names"))?,
        _ => {
            return Err(bad(
                "target_modules",
                "a list of module names (a regular expression is not supported)",
            ));
        }
    };
    for (key, neutral) in [
        ("bias", json!("none")),
        ("fan_in_fan_out", json!(false)),
        ("use_dora", json!(false)),
    ] {
        if field(key).is_some_and(|v| *v != neutral) {
            return Err(bad(key, &format!("{neutral} (the only value supported)")));
        }
    }
    for key in [
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "modules_to_save",
    ] {
        let empty = match field(key) {
            None => true,
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => false,
        };
        if !empty {
            return Err(bad(key, "empty (not supported)"));
        }
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
        rslora,
        ..LoraConfig::default()
    };
    config
        .validate(&format!("{}: ", path.display()))
        .map_err(|e| Error::file(&path, e))?;
    Ok(config)
}

/// Attaches the adapters saved in `dir` (PEFT layout) to `model`, whose base weights are frozen.
pub fn load_adapter<B: Backend>(model: Llama<B>, dir: &Path) -> Result<(LoraConfig, Llama<B>)> {
    let config = read_adapter_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let (tensors, _) = load_safetensors(&path)?;
    let mut ours: HashMap<String, HostTensor> = HashMap::new();
    for (name, tensor) in tensors {
        // PEFT also saves the base weight of a targeted embedding-like layer (the LM head) as
        // `….base_layer.weight`; loading it restores that weight, as PEFT does.
        let base_copy = name
            .strip_prefix(PREFIX)
            .and_then(|n| n.strip_suffix(".base_layer.weight"))
            .and_then(|module| our_name(&format!("{module}.weight")));
        let (our, transpose) = match (ours_from_peft(&name), base_copy) {
            (Some(our), _) => (our, true),
            (None, Some(base)) => base,
            (None, None) => {
                return Err(Error::file(
                    &path,
                    format!("tensor `{name}` is not a LoRA A/B weight of a Llama projection"),
                ));
            }
        };
        if tensor.shape.len() != 2 {
            return Err(Error::file(
                &path,
                format!("tensor `{name}` has shape {:?}; expected 2-D", tensor.shape),
            ));
        }
        ours.insert(
            our,
            if transpose {
                tensor.transposed()
            } else {
                tensor
            },
        );
    }
    let model = model.with_lora(&config)?;
    let wanted = |p: &str| is_adapter(p) || ours.contains_key(p);
    let model = assign_params_where(model, &ours, &path, &wanted)?;
    Ok((config, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for ours in [
            "blocks.0.attn.wq.lora.a",
            "blocks.11.mlp.w_down.lora.b",
            "lm_head.lora.a",
        ] {
            let peft = peft_name(ours).unwrap();
            assert_eq!(ours_from_peft(&peft).as_deref(), Some(ours), "{peft}");
        }
        assert_eq!(
            peft_name("blocks.3.attn.wv.lora.b").unwrap(),
            "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
        );
        assert_eq!(ours_from_peft("base_model.model.model.norm.weight"), None);
    }
}
