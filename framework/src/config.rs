//! The experiment config: one TOML file with `name`, `[model]`, `[tokenizer]`, `[data]` and
//! `[train]`. The file, the `--set key.path=value` overrides and the config saved in a run
//! directory are the same struct, validated the same way.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{CoordsKind, DataConfig};
use crate::error::{Error, Result};
use crate::model::{AttentionKind, ModelConfig};
use crate::nn::lora::LoraConfig;
use crate::tokenizer::TokenizerConfig;
use crate::train::TrainConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Names the run directory: `runs/<name>-<timestamp>/`.
    pub name: String,
    pub model: ModelConfig,
    pub tokenizer: TokenizerConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    /// Start from a trained model instead of random weights.
    pub finetune: Option<FinetuneConfig>,
    /// Train LoRA adapters on the frozen `finetune.base` instead of every weight.
    pub lora: Option<LoraConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// A Strata run or checkpoint folder, a Hugging Face Llama folder, or a `.gguf` file. Its
    /// architecture and tokenizer replace `[model]` and `[tokenizer]`.
    pub base: PathBuf,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            model: ModelConfig::default(),
            tokenizer: TokenizerConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            finetune: None,
            lora: None,
        }
    }
}

impl ExperimentConfig {
    /// Reads a TOML config, applies `key.path=value` overrides, and validates the result.
    ///
    /// A file may start from another: `base = "other.toml"` (relative to the file) takes every
    /// key of that file, and this file's keys replace them one by one.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let table = read_with_base(path, 0)?;
        Self::from_table(table, overrides).map_err(|e| match e {
            Error::Config { .. } => e,
            other => Error::file(path, other),
        })
    }

    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| Error::Toml(format!("not valid TOML: {e}")))?;
        Self::from_table(table, overrides)
    }

    fn from_table(mut value: toml::Table, overrides: &[String]) -> Result<Self> {
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        // Re-parse the merged text so that errors point at the offending line and key.
        let merged = toml::to_string(&value).map_err(|e| Error::Toml(e.to_string()))?;
        let mut config: ExperimentConfig =
            toml::from_str(&merged).map_err(|e| Error::Toml(e.to_string()))?;
        config.resolve_base()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            return Err(Error::config(
                "name",
                format!("{:?}", self.name),
                "a non-empty name without path separators",
            ));
        }
        self.model.validate("model.")?;
        self.data.validate("data.")?;
        if let Some(lora) = &self.lora {
            lora.validate("lora.")?;
            if self.finetune.is_none() {
                return Err(Error::config(
                    "lora",
                    "a [lora] section",
                    "a [finetune] section with the base model the adapters train on",
                ));
            }
        }
        self.train.validate("train.")?;
        if self.data.coords != CoordsKind::Diagonal {
            if self.model.attention != AttentionKind::Coord3d {
                return Err(Error::config(
                    "data.coords",
                    "\"line_col\"",
                    "\"diagonal\" unless model.attention = \"coord3d\" (only coord3d reads \
                     coordinates)",
                ));
            }
            if self.train.blocks_per_segment().is_some() {
                return Err(Error::config(
                    "train.activation_checkpointing",
                    self.train.activation_checkpointing.name(),
                    "\"none\" with data.coords = \"line_col\" (recomputed blocks use the \
                     diagonal)",
                ));
            }
        }
        if self.train.blocks_per_segment().is_some() {
            if self.model.attnres_block_len().is_some() {
                return Err(Error::config(
                    "train.activation_checkpointing",
                    self.train.activation_checkpointing.name(),
                    "\"none\" for AttnRes models (model.residual = standard or rescaled: \
                     an AttnRes block reads every earlier output, not one saved stream)",
                ));
            }
            if self.model.kv_share > 1 {
                return Err(Error::config(
                    "train.activation_checkpointing",
                    self.train.activation_checkpointing.name(),
                    "\"none\" with model.kv_share > 1 (a block reads the keys and values of the \
                     block before it, not one saved stream)",
                ));
            }
            if let Some(lora) = self.lora.as_ref().filter(|l| l.dropout > 0.0) {
                return Err(Error::config(
                    "lora.dropout",
                    lora.dropout,
                    "0 with train.activation_checkpointing: recomputation does not replay \
                     dropout masks",
                ));
            }
        }
        if self.train.seq_len > self.model.max_seq_len {
            return Err(Error::config(
                "train.seq_len",
                self.train.seq_len,
                format!(
                    "must be at most model.max_seq_len = {}",
                    self.model.max_seq_len
                ),
            ));
        }
        Ok(())
    }

    /// For a fine-tuning config, takes `[model]` and `[tokenizer]` from `finetune.base`. A
    /// `[model]` or `[tokenizer]` that disagrees with the base is an error, never overridden
    /// silently.
    fn resolve_base(&mut self) -> Result<()> {
        let Some(finetune) = &self.finetune else {
            return Ok(());
        };
        let (model, tokenizer) = crate::io::describe_model(&finetune.base)?;
        for (key, given, default, base) in [
            (
                "model",
                format!("{:?}", self.model),
                format!("{:?}", ModelConfig::default()),
                format!("{model:?}"),
            ),
            (
                "tokenizer",
                format!("{:?}", self.tokenizer),
                format!("{:?}", TokenizerConfig::default()),
                format!("{tokenizer:?}"),
            ),
        ] {
            if given != default && given != base {
                return Err(Error::config(
                    key,
                    format!("a [{key}] section"),
                    format!(
                        "none: a fine-tuning run takes its {key} from finetune.base ({})",
                        finetune.base.display()
                    ),
                ));
            }
        }
        self.model = model;
        self.tokenizer = tokenizer;
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The file's table merged over its `base` chain.
fn read_with_base(path: &Path, depth: usize) -> Result<toml::Table> {
    const MAX_DEPTH: usize = 8;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut table: toml::Table = toml::from_str(&text)
        .map_err(|e| Error::file(path, Error::Toml(format!("not valid TOML: {e}"))))?;
    let Some(base) = table.remove("base") else {
        return Ok(table);
    };
    let Some(base) = base.as_str() else {
        return Err(Error::file(path, "`base` must be a path string"));
    };
    if depth >= MAX_DEPTH {
        return Err(Error::file(
            path,
            format!("`base` chains deeper than {MAX_DEPTH} files (a cycle?)"),
        ));
    }
    let base_path = path.parent().unwrap_or(Path::new(".")).join(base);
    let mut merged = read_with_base(&base_path, depth + 1)?;
    merge_into(&mut merged, table);
    Ok(merged)
}

/// Copies `over` into `into`, descending into tables so that one key replaces one key.
fn merge_into(into: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => {
                merge_into(inner, value)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// `train.lr=3e-4` sets `[train] lr`. The value is read as TOML (number, bool, string, array),
/// or as a bare string when it is not valid TOML (`data.path=some/dir`).
fn apply_override(root: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| Error::config("--set", assignment, "key.path=value"))?;
    let key = key.trim();
    let parsed: Option<toml::Value> = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    let value = parsed.unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::config(key, raw, format!("`{part}` is not a table")))?;
    }
    table.insert(parts[parts.len() - 1].to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_applied_and_validated() {
        let config = ExperimentConfig::from_toml(
            "name = \"x\"\n[model]\nd_model = 64\nn_heads = 4\nn_kv_heads = 2\n",
            &["train.lr=0.01".into(), "data.path=some/dir".into()],
        )
        .unwrap();
        assert_eq!(config.train.lr, 0.01);
        assert_eq!(config.data.path, Path::new("some/dir"));
        assert_eq!(config.model.kv_heads(), 2);
    }

    #[test]
    fn a_file_starts_from_its_base_and_replaces_single_keys() {
        let dir = std::env::temp_dir().join(format!("strata-config-base-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("base.toml"),
            "name = \"base\"\n[model]\nd_model = 64\nn_heads = 4\n[train]\nlr = 0.5\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("sub/child.toml"),
            "base = \"../base.toml\"\nname = \"child\"\n[model]\nn_heads = 8\n",
        )
        .unwrap();
        let config = ExperimentConfig::load(&dir.join("sub/child.toml"), &[]).unwrap();
        assert_eq!(config.name, "child");
        assert_eq!((config.model.d_model, config.model.n_heads), (64, 8));
        assert_eq!(config.train.lr, 0.5);

        std::fs::write(dir.join("loop.toml"), "base = \"loop.toml\"\n").unwrap();
        let err = ExperimentConfig::load(&dir.join("loop.toml"), &[]).unwrap_err();
        assert!(err.to_string().contains("a cycle?"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_key_and_constraint() {
        let err = |toml: &str| {
            ExperimentConfig::from_toml(toml, &[])
                .err()
                .unwrap()
                .to_string()
        };
        let e = err("[model]\nd_model = 60\nn_heads = 8\n");
        assert!(
            e.contains("model.n_heads") && e.contains("must divide model.d_model"),
            "{e}"
        );
        let e = err("[model]\nn_heads = 4\nn_kv_heads = 3\n");
        assert!(
            e.contains("model.n_kv_heads") && e.contains("must divide model.n_heads"),
            "{e}"
        );
        let e = err("[model]\nn_layers = 0\n");
        assert!(
            e.contains("model.n_layers") && e.contains("at least 1"),
            "{e}"
        );
        let e = err("[model]\nresidual = \"fancy\"\n");
        assert!(e.contains("fancy") && e.contains("standard"), "{e}");
        let e = err("[model]\nattention = \"sparse\"\n");
        assert!(e.contains("sparse") && e.contains("dense"), "{e}");
        let e = err("[train]\nlearning_rate = 1.0\n");
        assert!(e.contains("learning_rate"), "{e}");
        let e = ExperimentConfig::from_toml("", &["train.seq_len=100000".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("train.seq_len") && e.contains("model.max_seq_len"),
            "{e}"
        );
    }

    #[test]
    fn kv_heads_default_to_heads() {
        let config =
            ExperimentConfig::from_toml("[model]\nd_model = 64\nn_heads = 2\n", &[]).unwrap();
        assert_eq!(config.model.kv_heads(), 2);
    }

    #[test]
    fn saved_config_reads_back_identical() {
        let config = ExperimentConfig::default();
        assert_eq!(
            ExperimentConfig::from_toml(&config.to_toml(), &[]).unwrap(),
            config
        );
    }
}
