//! Run checkpoints: `checkpoints/step-0000100/` holding `model.safetensors`,
//! `optimizer.safetensors`, `state.json` (step, tokens, seed, data position) and `config.toml`.
//! A checkpoint folder is written under a temporary name and renamed whole, then `latest` is
//! repointed, so a killed run always leaves its last complete checkpoint readable.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::ExperimentConfig;
use crate::error::{Error, Result};
use crate::io::atomic_write;
use crate::io::params::{
    HostTensor, assign_params, assign_params_where, load_safetensors, named_params,
    named_params_where, save_safetensors,
};
use crate::model::Llama;

/// Where training stands after `step` optimizer steps; with the seed this fixes the data order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub tokens_seen: u64,
    pub seed: u64,
    pub elapsed_secs: f64,
    pub tokenizer: String,
    /// f16 mixed precision's dynamic loss scale (absent in other runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::train::LossScale>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ExperimentConfig,
    pub state: TrainState,
}

pub fn save(
    run_dir: &Path,
    model: &BTreeMap<String, HostTensor>,
    optimizer: &BTreeMap<String, HostTensor>,
    state: &TrainState,
    config: &ExperimentConfig,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    let name = format!("step-{:07}", state.step);
    let tmp = root.join(format!(".{name}.tmp"));
    let dir = root.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let meta = HashMap::from([("format".to_owned(), "strata".to_owned())]);
    save_safetensors(&tmp.join("model.safetensors"), model, meta.clone())?;
    save_safetensors(&tmp.join("optimizer.safetensors"), optimizer, meta)?;
    let state_json = serde_json::to_string_pretty(state).map_err(|e| Error::file(&tmp, e))?;
    atomic_write(&tmp.join("state.json"), |f| {
        f.write_all(state_json.as_bytes())
    })?;
    atomic_write(&tmp.join("config.toml"), |f| {
        f.write_all(config.to_toml().as_bytes())
    })?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    atomic_write(&root.join("latest"), |f| f.write_all(name.as_bytes()))?;

    let mut all = list(&root)?;
    while all.len() > keep_last.max(1) {
        let oldest = all.remove(0);
        let _ = std::fs::remove_dir_all(oldest);
    }
    Ok(dir)
}

/// Complete checkpoint folders under `root`, oldest first.
fn list(root: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(Vec::new());
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The newest checkpoint of a run directory, if it has one.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let root = run_dir.join("checkpoints");
    if let Ok(name) = std::fs::read_to_string(root.join("latest")) {
        let dir = root.join(name.trim());
        if dir.join("state.json").is_file() {
            return Ok(Some(dir));
        }
    }
    Ok(list(&root)?.pop())
}

/// Accepts a checkpoint folder or a run directory (its latest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").is_file() {
        return Ok(path.to_owned());
    }
    latest(path)?.ok_or_else(|| {
        Error::file(
            path,
            "is neither a checkpoint folder nor a run directory with checkpoints",
        )
    })
}

pub fn read(dir: &Path) -> Result<Checkpoint> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: state_path,
        message: e.to_string(),
    })?;
    let config = ExperimentConfig::load(&dir.join("config.toml"), &[])?;
    Ok(Checkpoint {
        dir: dir.to_owned(),
        config,
        state,
    })
}

impl Checkpoint {
    /// The model this checkpoint holds; for a LoRA run, its base (loaded from `finetune.base`)
    /// with the checkpoint's adapters.
    pub fn load_model<B: Backend>(&self, device: &B::Device) -> Result<Llama<B>> {
        let path = self.dir.join("model.safetensors");
        let (tensors, _) = load_safetensors(&path)?;
        match (&self.config.finetune, &self.config.lora) {
            (Some(finetune), Some(lora)) => {
                let base = crate::io::load_model::<B>(&finetune.base, device)?.model;
                assign_params_where(base.with_lora(lora)?, &tensors, &path, &is_adapter)
            }
            _ => assign_params(self.config.model.init::<B>(device), &tensors, &path),
        }
    }

    pub fn optimizer_tensors(&self) -> Result<HashMap<String, HostTensor>> {
        Ok(load_safetensors(&self.dir.join("optimizer.safetensors"))?.0)
    }
}

/// Host copies of the parameters a checkpoint keeps: the adapters of a LoRA run (its base is
/// frozen and read from `finetune.base`), every parameter otherwise.
pub fn model_tensors<B: Backend>(
    model: &Llama<B>,
    config: &ExperimentConfig,
) -> BTreeMap<String, HostTensor> {
    if config.lora.is_some() {
        named_params_where::<B, _>(model, &is_adapter)
    } else {
        named_params::<B, _>(model)
    }
}

fn is_adapter(path: &str) -> bool {
    path.contains(".lora.")
}

/// Writes `model` as a new run directory `out` (one checkpoint at step 0, `config.toml`), for
/// models that come from elsewhere (an import, a merge). A Hugging Face `tokenizer.json` is
/// copied into `out`, so the run does not depend on the folder it came from; `config` is saved
/// with the copy's path.
pub fn write_run<B: Backend>(
    out: &Path,
    model: &Llama<B>,
    mut config: ExperimentConfig,
    tokenizer_fingerprint: String,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if let crate::tokenizer::TokenizerConfig::Hf { path } = &config.tokenizer {
        let copy = out.join("tokenizer.json");
        if *path != copy {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            atomic_write(&copy, |f| f.write_all(&bytes))?;
        }
        config.tokenizer = crate::tokenizer::TokenizerConfig::Hf { path: copy };
    }
    let state = TrainState {
        step: 0,
        tokens_seen: 0,
        seed: config.train.seed,
        elapsed_secs: 0.0,
        tokenizer: tokenizer_fingerprint,
        loss_scale: None,
    };
    let dir = save(
        out,
        &named_params(model),
        &BTreeMap::new(),
        &state,
        &config,
        1,
    )?;
    atomic_write(&out.join("config.toml"), |f| {
        f.write_all(config.to_toml().as_bytes())
    })?;
    Ok(dir)
}
