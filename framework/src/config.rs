//! The experiment config: one TOML file with `name`, `[model]`, `[tokenizer]`, `[data]` and
//! `[train]`. The file, the `--set key.path=value` overrides and the config saved in a run
//! directory are the same struct, validated the same way.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
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
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            name: "run".into(),
            model: ModelConfig::default(),
            tokenizer: TokenizerConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

impl ExperimentConfig {
    /// Reads a TOML config, applies `key.path=value` overrides, and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, overrides).map_err(|e| match e {
            Error::Config { .. } => e,
            other => Error::file(path, other),
        })
    }

    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| Error::Toml(format!("not valid TOML: {e}")))?;
        for assignment in overrides {
            apply_override(&mut value, assignment)?;
        }
        // Re-parse the merged text so that errors point at the offending line and key.
        let merged = toml::to_string(&value).map_err(|e| Error::Toml(e.to_string()))?;
        let config: ExperimentConfig =
            toml::from_str(&merged).map_err(|e| Error::Toml(e.to_string()))?;
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
        self.train.validate("train.")?;
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

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
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
