//! The library's error type: every variant names the file, key or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config: {key} = {value}: {expected}")]
    Config {
        key: String,
        value: String,
        expected: String,
    },

    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("data: {0}")]
    Data(String),

    /// A config that is not valid TOML or does not fit the schema; the message points at the line.
    #[error("{0}")]
    Toml(String),

    #[error(
        "training stopped at step {step}: {what} is not finite ({value}); the last good checkpoint is kept"
    )]
    NonFinite {
        step: usize,
        what: &'static str,
        value: f64,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(
        key: impl Into<String>,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Error::Config {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}
