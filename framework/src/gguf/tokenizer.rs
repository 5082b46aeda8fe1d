//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata: Strata's byte vocabulary
//! (what `export` writes), or a byte-level BPE (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM,
//! StarCoder, …) rebuilt from its tokens and ranked merges as a Hugging Face `tokenizers` BPE with
//! the pre-tokenizer llama.cpp selects by `tokenizer.ggml.pre` (llama-vocab.cpp): for `gpt2` and
//! `default` the GPT-2 split, for `smollm`, `starcoder`, `refact`, `codeshell` the same split
//! after one-digit pieces. Control and user-defined tokens (`token_type` 3 and 4) are matched
//! whole in the text, as llama.cpp does when it parses special tokens.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer as HfInner};

use crate::error::{Error, Result};
use crate::gguf::format::{GgufHeader, Value};
use crate::tokenizer::{ByteTokenizer, HfTokenizer, Tokenizer, fnv1a64};

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn strings<'h>(header: &'h GgufHeader, key: &str, path: &Path) -> Result<Vec<&'h str>> {
    match header.get(key) {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::file(path, format!("metadata {key} holds non-strings"))),
        _ => Err(Error::file(
            path,
            format!("metadata {key} is missing; expected an array of strings"),
        )),
    }
}

fn token_id(header: &GgufHeader, key: &str) -> Option<u32> {
    header.get(key).and_then(Value::as_u32)
}

/// Whether the file holds exactly the vocabulary `export` writes for the byte tokenizer.
pub fn is_byte_vocabulary(header: &GgufHeader) -> bool {
    let expected = super::export::byte_tokenizer_tokens();
    match header.get("tokenizer.ggml.tokens") {
        Some(Value::Array(_, tokens)) => {
            tokens.len() == expected.len()
                && tokens
                    .iter()
                    .zip(&expected)
                    .all(|(t, e)| t.as_str() == Some(e.as_str()))
        }
        _ => false,
    }
}

/// The tokenizer stored in `header` (of the file at `path`, for errors).
pub fn read_tokenizer(header: &GgufHeader, path: &Path) -> Result<Box<dyn Tokenizer>> {
    if is_byte_vocabulary(header) {
        return Ok(Box::new(ByteTokenizer));
    }
    let model = header
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(Error::file(
            path,
            format!(
                "tokenizer.ggml.model is {model:?}; the byte-level BPE (\"gpt2\") and Strata's \
                 byte vocabulary are read, SentencePiece (\"llama\") is not implemented yet"
            ),
        ));
    }
    let pre = header
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let split_digits = match pre {
        "default" | "gpt2" => false,
        "smollm" | "starcoder" | "refact" | "codeshell" => true,
        other => {
            return Err(Error::file(
                path,
                format!(
                    "tokenizer.ggml.pre is {other:?}; the pre-tokenizers read are default, gpt2, \
                     smollm, starcoder, refact and codeshell"
                ),
            ));
        }
    };
    let tokens = strings(header, "tokenizer.ggml.tokens", path)?;
    let merges = strings(header, "tokenizer.ggml.merges", path)?;
    let types: Vec<i64> = match header.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, items)) => items
            .iter()
            .map(|v| match v {
                Value::I32(t) => i64::from(*t),
                Value::U32(t) => i64::from(*t),
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let pairs = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| Error::file(path, format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| Error::file(path, format!("its BPE tokenizer is invalid: {e}")))?;
    let mut inner = HfInner::new(bpe);
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let pre_tokenizer = if split_digits {
        PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level,
        ]))
    } else {
        byte_level
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
        .map(|(token, t)| AddedToken::from(token.to_string(), *t == CONTROL))
        .collect();
    inner.add_special_tokens(&special);

    let mut identity = Vec::new();
    for part in tokens.iter().chain(&merges) {
        identity.extend_from_slice(part.as_bytes());
        identity.push(0);
    }
    identity.extend_from_slice(pre.as_bytes());
    Ok(Box::new(HfTokenizer::from_parts(
        inner,
        token_id(header, "tokenizer.ggml.bos_token_id"),
        token_id(header, "tokenizer.ggml.eos_token_id"),
        token_id(header, "tokenizer.ggml.padding_token_id"),
        format!("gguf-bpe-{:016x}", fnv1a64(&identity)),
    )))
}
