//! Tokenizers behind one trait: the built-in byte-level tokenizer and any Hugging Face
//! `tokenizer.json`. A tokenizer's `fingerprint` identifies it in token caches and checkpoints.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, without BOS/EOS.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids`; special tokens are dropped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    fn vocab_size(&self) -> usize;
    fn bos_id(&self) -> Option<u32>;
    fn eos_id(&self) -> Option<u32>;
    fn pad_id(&self) -> Option<u32>;
    /// Changes whenever the mapping from text to ids could change.
    fn fingerprint(&self) -> String;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[derive(Default)]
pub enum TokenizerConfig {
    /// 256 byte values, then BOS, EOS and PAD.
    #[default]
    Byte,
    /// A Hugging Face `tokenizer.json`.
    Hf { path: PathBuf },
    /// The tokenizer stored in a GGUF file's metadata.
    Gguf { path: PathBuf },
}

impl TokenizerConfig {
    pub fn load(&self) -> Result<Box<dyn Tokenizer>> {
        Ok(match self {
            TokenizerConfig::Byte => Box::new(ByteTokenizer),
            TokenizerConfig::Hf { path } => Box::new(HfTokenizer::from_file(path)?),
            TokenizerConfig::Gguf { path } => crate::gguf::import::read_file_tokenizer(path)?,
        })
    }
}

/// Bytes are their own ids; 256 = BOS, 257 = EOS, 258 = PAD.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const BOS: u32 = 256;
    pub const EOS: u32 = 257;
    pub const PAD: u32 = 258;
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| id < 256)
            .map(|&id| id as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        259
    }

    fn bos_id(&self) -> Option<u32> {
        Some(Self::BOS)
    }

    fn eos_id(&self) -> Option<u32> {
        Some(Self::EOS)
    }

    fn pad_id(&self) -> Option<u32> {
        Some(Self::PAD)
    }

    fn fingerprint(&self) -> String {
        "byte-v1".into()
    }
}

/// A Hugging Face tokenizer loaded from `tokenizer.json` (BPE, Unigram, WordPiece).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    fingerprint: String,
}

impl HfTokenizer {
    /// A tokenizer built in code (e.g. from a GGUF file's vocabulary) with its special ids.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
        fingerprint: String,
    ) -> Self {
        Self {
            inner,
            bos,
            eos,
            pad,
            fingerprint,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::file(path, format!("not a valid tokenizer.json: {e}")))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&[
            "<|begin_of_text|>",
            "<s>",
            "<|im_start|>",
            "<|endoftext|>",
            "[CLS]",
        ]);
        let eos = find(&[
            "<|end_of_text|>",
            "</s>",
            "<|im_end|>",
            "<|endoftext|>",
            "[SEP]",
        ]);
        let pad = find(&["<pad>", "<|pad|>", "[PAD]"]);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            fingerprint: format!("hf-{:016x}", fnv1a64(&bytes)),
        })
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}

/// FNV-1a, 64 bit: a stable content hash for cache keys (not for security).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_utf8() {
        let text = "Ay, marry — “là”!\n";
        let ids = ByteTokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        let mut with_specials = vec![ByteTokenizer::BOS];
        with_specials.extend(&ids);
        with_specials.push(ByteTokenizer::EOS);
        assert_eq!(ByteTokenizer.decode(&with_specials).unwrap(), text);
    }

    #[test]
    fn bad_tokenizer_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("strata-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = HfTokenizer::from_file(&path).err().unwrap().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a valid tokenizer.json"),
            "{err}"
        );
    }
}
