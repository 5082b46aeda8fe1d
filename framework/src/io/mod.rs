//! Files: named parameters in safetensors, run checkpoints, Hugging Face import.
//! Everything written here goes to a temporary file first and is renamed into place.

pub mod checkpoint;
pub mod hf;
pub mod params;
pub mod peft;

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `path` through `write` into a temporary file in the same folder, syncs it, then renames
/// it into place, so a reader (or a killed run) sees either the old file or the whole new one.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "is not a file path"))?;
    // Unique per process and call, so concurrent writers never share a temporary file.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}-{n}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// A model ready for evaluation or generation, with its tokenizer.
pub struct LoadedModel<B: burn::prelude::Backend> {
    pub model: crate::model::Llama<B>,
    pub model_config: crate::model::ModelConfig,
    pub tokenizer: Box<dyn crate::tokenizer::Tokenizer>,
    /// Where the tokenizer comes from, for configs that must load it again.
    pub tokenizer_config: crate::tokenizer::TokenizerConfig,
    /// The experiment config, for Strata checkpoints.
    pub experiment: Option<crate::config::ExperimentConfig>,
}

fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The architecture and tokenizer of what [`load_model`] would load from `path`, without the
/// weights. A LoRA fine-tuning run is refused: merge it first (`strata merge`).
pub fn describe_model(
    path: &Path,
) -> Result<(crate::model::ModelConfig, crate::tokenizer::TokenizerConfig)> {
    use crate::tokenizer::TokenizerConfig;
    if is_gguf(path) {
        return crate::gguf::import::read_config(path);
    }
    if path.join("config.json").is_file() {
        let config = hf::HfLlamaConfig::read(&path.join("config.json"))?.to_model_config();
        let tokenizer = path.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(Error::file(path, "has config.json but no tokenizer.json"));
        }
        return Ok((config, TokenizerConfig::Hf { path: tokenizer }));
    }
    let ckpt = checkpoint::read(&checkpoint::resolve(path)?)?;
    if ckpt.config.lora.is_some() {
        return Err(Error::file(
            path,
            "is a LoRA fine-tuning run; merge its adapters first (strata merge) to use it as a base",
        ));
    }
    Ok((ckpt.config.model, ckpt.config.tokenizer))
}

/// Loads a Hugging Face checkpoint folder (it has `config.json`), a Strata checkpoint folder, a
/// run directory (its latest checkpoint), or a `.gguf` file (dequantized).
pub fn load_model<B: burn::prelude::Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    if is_gguf(path) {
        let (model_config, model, tokenizer) = crate::gguf::import::load_llama_gguf(path, device)?;
        return Ok(LoadedModel {
            model,
            model_config,
            tokenizer,
            tokenizer_config: crate::gguf::import::read_config(path)?.1,
            experiment: None,
        });
    }
    if path.join("config.json").is_file() {
        let (model_config, model) = hf::load_llama::<B>(path, device)?;
        let tokenizer_path = path.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::file(path, "has config.json but no tokenizer.json"));
        }
        let tokenizer = crate::tokenizer::HfTokenizer::from_file(&tokenizer_path)?;
        return Ok(LoadedModel {
            model,
            model_config,
            tokenizer: Box::new(tokenizer),
            tokenizer_config: crate::tokenizer::TokenizerConfig::Hf {
                path: tokenizer_path,
            },
            experiment: None,
        });
    }
    let ckpt = checkpoint::read(&checkpoint::resolve(path)?)?;
    let tokenizer = ckpt.config.tokenizer.load()?;
    let model = ckpt.load_model::<B>(device)?;
    Ok(LoadedModel {
        model,
        model_config: ckpt.config.model.clone(),
        tokenizer,
        tokenizer_config: ckpt.config.tokenizer.clone(),
        experiment: Some(ckpt.config),
    })
}
