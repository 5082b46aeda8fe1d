//! The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata: Strata's byte vocabulary
//! (what `export` writes), or a byte-level BPE (`tokenizer.ggml.model = "gpt2"`: GPT-2, SmolLM,
//! StarCoder, …) rebuilt from its tokens and ranked merges as a Hugging Face `tokenizers` BPE with
//! the pre-tokenizer llama.cpp selects by `tokenizer.ggml.pre` (llama-vocab.cpp): for `gpt-2` and
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
use crate::tokenizer::{ByteTokenizer, HfTokenizer, Tokenizer, TokenizerConfig, fnv1a64};

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
        "default" | "gpt-2" => false,
        "smollm" | "starcoder" | "refact" | "codeshell" => true,
        other => {
            return Err(Error::file(
                path,
                format!(
                    "tokenizer.ggml.pre is {other:?}; the pre-tokenizers read are default, gpt-2, \
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
    let mut vocab = ahash::AHashMap::<String, u32>::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.to_string(), id as u32) {
            return Err(Error::file(
                path,
                format!(
                    "tokenizer.ggml.tokens: token {token:?} appears at ids {first} and {id}; \
                     a vocabulary maps each token to one id"
                ),
            ));
        }
    }
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

/// The `tokenizer.*` metadata that stores `tokenizer` in a GGUF file for a model whose
/// embedding has `vocab_size` rows: Strata's byte vocabulary; the keys of a GGUF file's own
/// tokenizer, copied as they are (chat template included); or a Hugging Face byte-level BPE
/// `tokenizer.json` written as llama.cpp's `gpt2` model with its merges.
pub fn tokenizer_metadata(
    tokenizer: &TokenizerConfig,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    match tokenizer {
        TokenizerConfig::Byte => Ok(super::export::byte_tokenizer_metadata(vocab_size)),
        TokenizerConfig::Gguf { path } => {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // Safety: read-only map of a file we do not modify while it is open.
            let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let header = super::format::read_header(&bytes, path)?;
            let tokens = strings(&header, "tokenizer.ggml.tokens", path)?.len();
            if tokens != vocab_size {
                return Err(Error::file(
                    path,
                    format!(
                        "its tokenizer has {tokens} tokens, the model's vocabulary {vocab_size}"
                    ),
                ));
            }
            Ok(header
                .metadata
                .iter()
                .filter(|(key, _)| key.starts_with("tokenizer."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        TokenizerConfig::Hf { path } => hf_bpe_metadata(path, vocab_size),
    }
}

/// A Hugging Face `tokenizer.json` holding a byte-level BPE (GPT-2's scheme, no normalizer) as
/// llama.cpp's `gpt2` tokenizer metadata.
fn hf_bpe_metadata(path: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    use serde_json::Value as Json;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Json = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let unsupported = |what: String| {
        Error::file(
            path,
            format!("{what}; only byte-level BPE tokenizers (GPT-2's scheme) export to GGUF"),
        )
    };
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(unsupported(format!("model.type is {}", model["type"])));
    }
    if !json["normalizer"].is_null() {
        return Err(unsupported("it has a normalizer".into()));
    }
    // The pre-tokenizer decides llama.cpp's `tokenizer.ggml.pre`.
    let byte_level_ok = |p: &Json| {
        p["type"] == "ByteLevel"
            && p["add_prefix_space"] == false
            && p["use_regex"].as_bool().unwrap_or(true)
    };
    let pre = &json["pre_tokenizer"];
    let pre_name = if byte_level_ok(pre) {
        "gpt-2"
    } else if pre["type"] == "Sequence"
        && pre["pretokenizers"].as_array().is_some_and(|list| {
            list.len() == 2
                && list[0]["type"] == "Digits"
                && list[0]["individual_digits"] == true
                && byte_level_ok(&list[1])
        })
    {
        "smollm"
    } else {
        return Err(unsupported(format!("its pre-tokenizer is {pre}")));
    };

    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::file(path, "model.vocab is not an object"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let mut place = |token: &str, id: &Json, ty: i32| -> Result<()> {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::file(path, format!("token {token:?} has no integer id")))?
            as usize;
        if id >= vocab_size {
            return Err(Error::file(
                path,
                format!("token {token:?} has id {id}, beyond the model's vocabulary {vocab_size}"),
            ));
        }
        tokens[id] = Some(token.to_owned());
        types[id] = ty;
        Ok(())
    };
    for (token, id) in vocab {
        place(token, id, 1)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let content = added["content"].as_str().unwrap_or_default();
        let ty = if added["special"] == true {
            CONTROL as i32
        } else {
            USER_DEFINED as i32
        };
        place(content, &added["id"], ty)?;
    }
    const UNUSED: i32 = 5;
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("<unused{i}>")
            }))
        })
        .collect();
    // Merges are "a b" strings in older files and ["a", "b"] pairs in newer ones.
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| Error::file(path, "model.merges is not a list"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                Some(format!("{} {}", pair[0].as_str()?, pair[1].as_str()?))
            }
            _ => None,
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| Error::file(path, "a merge is neither \"a b\" nor [\"a\", \"b\"]"))?;

    let hf = HfTokenizer::from_file(path)?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_owned(),
            Value::String(pre_name.into()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            Value::Array(super::format::ValueType::String, tokens),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array(
                super::format::ValueType::I32,
                types.into_iter().map(Value::I32).collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".to_owned(),
            Value::Array(
                super::format::ValueType::String,
                merges.into_iter().map(Value::String).collect(),
            ),
        ),
        (
            "tokenizer.ggml.add_bos_token".to_owned(),
            Value::Bool(false),
        ),
    ];
    for (key, id) in [
        ("bos_token_id", hf.bos_id()),
        ("eos_token_id", hf.eos_id()),
        ("padding_token_id", hf.pad_id()),
    ] {
        if let Some(id) = id {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    Ok(out)
}
