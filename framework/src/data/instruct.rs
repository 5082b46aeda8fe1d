//! Instruction data for fine-tuning: JSONL lines of `{"prompt": …, "response": …}` or
//! `{"messages": [{"role": …, "content": …}, …]}`, rendered with a chat template, with the loss
//! on the response (assistant) tokens only, and packed whole into rows of `seq_len + 1` tokens so
//! that short examples share a row instead of padding one each.
//!
//! Templates (the text around each turn; the trained part is marked «»):
//! - `chatml` (SmolLM2, Qwen): `<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n«{response}<|im_end|>»\n`
//! - `alpaca`: `### Instruction:\n{prompt}\n\n### Response:\n«{response}<eos>»\n\n`
//!   (a system message becomes `### System:\n{content}\n\n`).
//!
//! Every example starts with BOS when the tokenizer has one. Examples longer than a row are cut
//! to the row (counted in [`PackedRows::truncated`]).

use std::path::Path;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Batch, DataConfig, Split, evenly_spaced};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
    #[default]
    Chatml,
    Alpaca,
}

/// One rendered piece of an example and whether the loss counts its tokens.
struct Segment {
    text: String,
    trained: bool,
}

/// A conversation turn as read from a line.
struct Turn {
    role: String,
    content: String,
}

impl ChatTemplate {
    fn render(self, turns: &[Turn]) -> Vec<Segment> {
        let fixed = |text: String| Segment {
            text,
            trained: false,
        };
        let trained = |text: String| Segment {
            text,
            trained: true,
        };
        let mut out = Vec::new();
        for turn in turns {
            let assistant = turn.role == "assistant";
            match self {
                ChatTemplate::Chatml => {
                    out.push(fixed(format!("<|im_start|>{}\n", turn.role)));
                    if assistant {
                        out.push(trained(format!("{}<|im_end|>", turn.content)));
                        out.push(fixed("\n".into()));
                    } else {
                        out.push(fixed(format!("{}<|im_end|>\n", turn.content)));
                    }
                }
                ChatTemplate::Alpaca => {
                    let header = match turn.role.as_str() {
                        "system" => "### System:\n",
                        "user" => "### Instruction:\n",
                        _ => "### Response:\n",
                    };
                    out.push(fixed(header.to_owned()));
                    if assistant {
                        out.push(trained(turn.content.clone()));
                        out.push(fixed("\n\n".into()));
                    } else {
                        out.push(fixed(format!("{}\n\n", turn.content)));
                    }
                }
            }
        }
        out
    }
}

/// Examples packed into rows of `row_len` tokens; `mask[i]` says whether token i is a trained
/// target (so position i − 1 predicting it counts in the loss).
#[derive(Debug, Clone)]
pub struct PackedRows {
    pub ids: Vec<u32>,
    pub mask: Vec<bool>,
    pub row_len: usize,
    pub examples: usize,
    /// Examples cut to fit a row.
    pub truncated: usize,
    /// Malformed lines skipped under `data.skip_malformed`.
    pub skipped: usize,
    /// UTF-8 bytes of the trained text, for bits per byte.
    pub trained_bytes: u64,
}

impl PackedRows {
    pub fn rows(&self) -> usize {
        self.ids.len() / self.row_len
    }

    /// Trained tokens in all rows.
    pub fn trained_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    pub fn bytes_per_token(&self) -> f64 {
        self.trained_bytes as f64 / self.trained_tokens().max(1) as f64
    }

    fn batch(&self, rows: &[usize]) -> Batch {
        let seq = self.row_len - 1;
        let mut batch = Batch {
            inputs: Vec::with_capacity(rows.len() * seq),
            targets: Vec::with_capacity(rows.len() * seq),
            loss_mask: Vec::with_capacity(rows.len() * seq),
            batch: rows.len(),
            seq,
            coords: None,
        };
        for &r in rows {
            let at = r * self.row_len;
            batch.inputs.extend_from_slice(&self.ids[at..at + seq]);
            batch
                .targets
                .extend_from_slice(&self.ids[at + 1..at + self.row_len]);
            batch
                .loss_mask
                .extend_from_slice(&self.mask[at + 1..at + self.row_len]);
        }
        batch
    }

    /// Random rows; like [`super::train_batch`], a function of (seed, step, micro-step) only.
    pub fn train_batch(&self, seed: u64, step: usize, micro: usize, batch: usize) -> Batch {
        let mix = seed
            ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (micro as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let mut rng = StdRng::seed_from_u64(mix);
        let rows: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..self.rows()))
            .collect();
        self.batch(&rows)
    }

    /// Every row in order, at most `count` batches.
    pub fn validation_batches(&self, count: usize, batch: usize) -> Vec<Batch> {
        let rows: Vec<usize> = (0..self.rows()).collect();
        rows.chunks(batch)
            .take(count)
            .map(|c| self.batch(c))
            .collect()
    }
}

/// Reads one line into turns; the error says what the line lacks.
fn parse_line(value: &Value) -> std::result::Result<Vec<Turn>, String> {
    let text = |v: &Value, what: &str| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("\"{what}\" must be a string"))
    };
    if let Some(messages) = value.get("messages") {
        let list = messages
            .as_array()
            .ok_or("\"messages\" must be a list of {\"role\", \"content\"} objects")?;
        let mut turns = Vec::new();
        for m in list {
            let role = text(m.get("role").unwrap_or(&Value::Null), "role")?;
            if !["system", "user", "assistant"].contains(&role.as_str()) {
                return Err(format!(
                    "role {role:?}; expected \"system\", \"user\" or \"assistant\""
                ));
            }
            let content = text(m.get("content").unwrap_or(&Value::Null), "content")?;
            turns.push(Turn { role, content });
        }
        if !turns.iter().any(|t| t.role == "assistant") {
            return Err("\"messages\" has no assistant turn to train on".into());
        }
        return Ok(turns);
    }
    match (value.get("prompt"), value.get("response")) {
        (Some(p), Some(r)) => Ok(vec![
            Turn {
                role: "user".into(),
                content: text(p, "prompt")?,
            },
            Turn {
                role: "assistant".into(),
                content: text(r, "response")?,
            },
        ]),
        _ => Err("expected \"prompt\" and \"response\" strings, or a \"messages\" list".into()),
    }
}

/// Tokenizes and packs the instruction examples of one split into rows of `seq_len + 1` tokens.
pub fn load_instructions(
    config: &DataConfig,
    tokenizer: &dyn Tokenizer,
    split: Split,
    seq_len: usize,
) -> Result<PackedRows> {
    let path: &Path = &config.path;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::file(path, format!("cannot read as UTF-8 text: {e}")))?;
    let mut examples = Vec::new();
    let mut skipped = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("not valid JSON: {e}"))
            .and_then(|v| parse_line(&v));
        match parsed {
            Ok(turns) => examples.push(turns),
            Err(_) if config.skip_malformed => skipped += 1,
            Err(why) => {
                return Err(Error::file(
                    path,
                    format!(
                        "line {}: {why} (set data.skip_malformed = true to skip such lines)",
                        n + 1
                    ),
                ));
            }
        }
    }
    if examples.is_empty() {
        return Err(Error::file(path, "holds no instruction examples"));
    }
    let held = evenly_spaced(examples.len(), config.val_fraction);
    let row_len = seq_len + 1;
    let mut packed = PackedRows {
        ids: Vec::new(),
        mask: Vec::new(),
        row_len,
        examples: 0,
        truncated: 0,
        skipped,
        trained_bytes: 0,
    };
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let mut row: (Vec<u32>, Vec<bool>) = (Vec::new(), Vec::new());
    let flush = |row: &mut (Vec<u32>, Vec<bool>), packed: &mut PackedRows| {
        if row.0.is_empty() {
            return;
        }
        row.0.resize(row_len, pad);
        row.1.resize(row_len, false);
        packed.ids.append(&mut row.0);
        packed.mask.append(&mut row.1);
    };
    for (i, turns) in examples.iter().enumerate() {
        let wanted = split == Split::All || held.contains(&i) == (split == Split::Validation);
        if !wanted {
            continue;
        }
        let (mut ids, mut mask): (Vec<u32>, Vec<bool>) = (Vec::new(), Vec::new());
        if let Some(bos) = tokenizer.bos_id() {
            ids.push(bos);
            mask.push(false);
        }
        let mut trained_bytes = 0u64;
        for segment in config.chat_template.render(turns) {
            let tokens = tokenizer
                .encode(&segment.text)
                .map_err(|e| Error::Data(format!("{}:{}: {e}", path.display(), i + 1)))?;
            mask.extend(std::iter::repeat_n(segment.trained, tokens.len()));
            ids.extend(tokens);
            if segment.trained {
                trained_bytes += segment.text.len() as u64;
                // Alpaca ends a response with the tokenizer's EOS id, which the model must learn
                // to emit so that generation stops.
                if config.chat_template == ChatTemplate::Alpaca
                    && let Some(eos) = tokenizer.eos_id()
                {
                    ids.push(eos);
                    mask.push(true);
                }
            }
        }
        if ids.len() > row_len {
            ids.truncate(row_len);
            mask.truncate(row_len);
            packed.truncated += 1;
        }
        if row.0.len() + ids.len() > row_len {
            flush(&mut row, &mut packed);
        }
        row.0.extend(ids);
        row.1.extend(mask);
        packed.examples += 1;
        packed.trained_bytes += trained_bytes;
    }
    flush(&mut row, &mut packed);
    if packed.trained_tokens() == 0 {
        let why = if packed.truncated > 0 {
            format!(
                ": {} examples were cut to seq_len + 1 = {row_len} tokens before their response; \
                 raise train.seq_len",
                packed.truncated
            )
        } else {
            String::new()
        };
        return Err(Error::file(
            path,
            format!(
                "the {} has no response tokens to score{why}",
                match split {
                    Split::Validation => "validation split",
                    Split::Train => "training split",
                    Split::All => "file",
                }
            ),
        ));
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ByteTokenizer;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("strata-instruct-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn config(path: std::path::PathBuf, template: ChatTemplate) -> DataConfig {
        DataConfig {
            path,
            format: super::super::DataFormat::Instruction,
            chat_template: template,
            val_fraction: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn only_response_tokens_are_trained_and_examples_pack_whole() {
        let path = write(
            "mask",
            "{\"prompt\": \"hi\", \"response\": \"yo\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
        );
        let rows = load_instructions(
            &config(path, ChatTemplate::Alpaca),
            &ByteTokenizer,
            Split::All,
            127,
        )
        .unwrap();
        // Both examples fit one 128-token row.
        assert_eq!((rows.rows(), rows.examples), (1, 2));
        let trained: Vec<u32> = rows
            .ids
            .iter()
            .zip(&rows.mask)
            .filter(|(_, m)| **m)
            .map(|(id, _)| *id)
            .collect();
        let eos = ByteTokenizer::EOS;
        assert_eq!(
            trained,
            vec![b'y' as u32, b'o' as u32, eos, b'b' as u32, eos]
        );
        let text = ByteTokenizer.decode(&rows.ids).unwrap();
        assert!(
            text.starts_with("### Instruction:\nhi\n\n### Response:\nyo"),
            "{text:?}"
        );

        let batch = rows.batch(&[0]);
        assert_eq!(batch.inputs[1..], batch.targets[..126]);
        assert_eq!(batch.loss_mask, rows.mask[1..].to_vec());
    }

    #[test]
    fn chatml_trains_the_end_marker() {
        let path = write("chatml", "{\"prompt\": \"q\", \"response\": \"r\"}\n");
        let rows = load_instructions(
            &config(path, ChatTemplate::Chatml),
            &ByteTokenizer,
            Split::All,
            63,
        )
        .unwrap();
        let trained: Vec<u32> = rows
            .ids
            .iter()
            .zip(&rows.mask)
            .filter(|(_, m)| **m)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ByteTokenizer.decode(&trained).unwrap(), "r<|im_end|>");
    }

    #[test]
    fn malformed_lines_are_named_or_skipped_and_counted() {
        let text = "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": 3}\nnot json\n{\"prompt\": \"c\", \"response\": \"d\"}\n";
        let path = write("bad", text);
        let mut cfg = config(path, ChatTemplate::Chatml);
        let err = load_instructions(&cfg, &ByteTokenizer, Split::All, 63)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data.jsonl") && err.contains("line 2"),
            "{err}"
        );
        cfg.skip_malformed = true;
        let rows = load_instructions(&cfg, &ByteTokenizer, Split::All, 63).unwrap();
        assert_eq!((rows.examples, rows.skipped), (2, 2));
    }
}
