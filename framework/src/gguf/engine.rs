//! Our own engine for `llama` GGUF files: the weights stay in the file's blocks, memory-mapped
//! (the model takes the file's size, not four bytes per weight, and pages in as it is read), and
//! every matrix product decodes one stretch of a row's blocks at a time into a small buffer and
//! multiplies it with every input row while it is in cache, so a prompt (prefill) costs one pass
//! over the weights like a single token does. CPU, every core (rayon over output rows).
//!
//! Every ggml type the writer knows runs here (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q4_K, Q5_K, Q6_K), decoded by the same dequantizers that are checked against gguf-py. Files of
//! Strata's own architecture (`strata`) run through the dequantized Burn model instead
//! ([`super::import::load_llama_gguf`]).
//!
//! Rotary embeddings rotate adjacent pairs here, as llama.cpp's `llama` does: the exporter
//! permuted the query and key rows for that ([`super::layout`]).

use std::path::Path;

use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gguf::export::architecture;
use crate::gguf::format::read_header;
use crate::gguf::import::read_config;
use crate::gguf::quant::{GgmlType, dequantize, dequantize_into};
use crate::infer::{Sampler, decode_loop};
use crate::model::ModelConfig;
use crate::nn::rope::inverse_frequencies;

/// A `llama` GGUF file, ready to run.
pub struct GgufEngine {
    map: Mmap,
    pub config: ModelConfig,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Matrix,
}

/// A weight matrix in the file: `rows` rows of `cols` values of type `ty` from byte `offset`.
#[derive(Debug, Clone, Copy)]
struct Matrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    offset: usize,
}

impl Matrix {
    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.block_bytes()
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// Keys and values of the tokens run so far, per layer: `[position, kv_heads · head_dim]`.
pub struct EngineCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pub len: usize,
}

/// Values decoded per stretch of a row: whole blocks, and at least this many for the one-value
/// "blocks" of F32/F16/BF16.
const STRETCH: usize = 256;

impl GgufEngine {
    /// Maps `path` and finds every tensor a `llama` model needs; nothing is decoded but the norm
    /// gains.
    pub fn open(path: &Path) -> Result<Self> {
        let (config, _) = read_config(path)?;
        if architecture(&config) != "llama" {
            return Err(Error::file(
                path,
                "is Strata's own architecture; it runs through the dequantized model \
                 (`--engine burn`), not the block engine",
            ));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Safety: read-only map of a file we do not modify while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = read_header(&map, path)?;
        let find = |name: &str| {
            header
                .tensors
                .iter()
                .position(|(t, _)| t.name == name)
                .ok_or_else(|| Error::file(path, format!("has no tensor {name}")))
        };
        let matrix = |name: &str| -> Result<Matrix> {
            let (info, start) = &header.tensors[find(name)?];
            let [cols, rows] = info.dims[..] else {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor {name} has dims {:?}; a matrix was expected",
                        info.dims
                    ),
                ));
            };
            let m = Matrix {
                ty: info.ty,
                rows: rows as usize,
                cols: cols as usize,
                offset: *start as usize,
            };
            if !m.cols.is_multiple_of(m.ty.block_size()) {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor {name}: rows of {} values are not whole {} blocks",
                        m.cols,
                        m.ty.name()
                    ),
                ));
            }
            Ok(m)
        };
        let vector = |name: &str| -> Result<Vec<f32>> {
            let i = find(name)?;
            dequantize(header.tensors[i].0.ty, header.tensor_bytes(&map, i)?)
        };
        let layers = (0..config.n_layers)
            .map(|i| {
                let t = |n: &str| format!("blk.{i}.{n}.weight");
                Ok(Layer {
                    attn_norm: vector(&t("attn_norm"))?,
                    q: matrix(&t("attn_q"))?,
                    k: matrix(&t("attn_k"))?,
                    v: matrix(&t("attn_v"))?,
                    o: matrix(&t("attn_output"))?,
                    ffn_norm: vector(&t("ffn_norm"))?,
                    gate: matrix(&t("ffn_gate"))?,
                    up: matrix(&t("ffn_up"))?,
                    down: matrix(&t("ffn_down"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = matrix("token_embd.weight")?;
        let output = if config.tie_embeddings {
            embed
        } else {
            matrix("output.weight")?
        };
        let norm = vector("output_norm.weight")?;
        drop(header);
        Ok(Self {
            map,
            config,
            embed,
            layers,
            norm,
            output,
        })
    }

    pub fn new_cache(&self) -> EngineCache {
        EngineCache {
            keys: vec![Vec::new(); self.config.n_layers],
            values: vec![Vec::new(); self.config.n_layers],
            len: 0,
        }
    }

    /// Runs `tokens` after what `cache` holds and returns the logits of every token
    /// (`[tokens, vocab]`), or of the last one only.
    pub fn forward(&self, tokens: &[u32], cache: &mut EngineCache, every_token: bool) -> Vec<f32> {
        let c = &self.config;
        let (n, d) = (tokens.len(), c.d_model);
        let (heads, kv_heads, head_dim) = (c.n_heads, c.kv_heads(), c.head_dim());
        let start = cache.len;
        let inv_freq = inverse_frequencies(c.rope_theta, head_dim);
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| self.row(&self.embed, t as usize))
            .collect();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.norm_eps as f32);
            let mut q = self.matmul(&layer.q, &h, n);
            let mut k = self.matmul(&layer.k, &h, n);
            let v = self.matmul(&layer.v, &h, n);
            rope(&mut q, heads, head_dim, start, &inv_freq);
            rope(&mut k, kv_heads, head_dim, start, &inv_freq);
            cache.keys[l].extend_from_slice(&k);
            cache.values[l].extend_from_slice(&v);
            let mixed = attention(&q, &cache.keys[l], &cache.values[l], start, c);
            add(&mut x, &self.matmul(&layer.o, &mixed, n));
            let h = rms_norm(&x, &layer.ffn_norm, c.norm_eps as f32);
            let mut gate = self.matmul(&layer.gate, &h, n);
            let up = self.matmul(&layer.up, &h, n);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            add(&mut x, &self.matmul(&layer.down, &gate, n));
        }
        cache.len += n;
        let x = rms_norm(&x, &self.norm, c.norm_eps as f32);
        if every_token {
            self.matmul(&self.output, &x, n)
        } else {
            self.matmul(&self.output, &x[(n - 1) * d..], 1)
        }
    }

    /// Generates up to `max_new` tokens after `prompt` as [`crate::infer::generate`] does with
    /// the KV cache (the same sampler, stop token and context restart at `max_seq_len`).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        stop: Option<u32>,
        on_token: impl FnMut(u32),
    ) -> Vec<u32> {
        let mut cache = self.new_cache();
        let step = |context: &[u32], fed: usize| {
            if fed == 0 {
                cache = self.new_cache();
            }
            Ok(self.forward(&context[fed..], &mut cache, false))
        };
        let max_len = self.config.max_seq_len;
        // The step never fails, so neither does the loop.
        decode_loop(prompt, max_len, max_new, sampler, stop, on_token, step).unwrap_or_default()
    }

    /// Row `r` of `m`, decoded.
    fn row(&self, m: &Matrix, r: usize) -> Vec<f32> {
        let bytes = &self.map[m.offset + r * m.row_bytes()..][..m.row_bytes()];
        let mut out = Vec::with_capacity(m.cols);
        // The length was checked against the type when the file was opened.
        let _ = dequantize_into(m.ty, bytes, &mut out);
        out
    }

    /// `xs · mᵀ` for `n` input rows of `m.cols` values: `[n, m.rows]`.
    fn matmul(&self, m: &Matrix, xs: &[f32], n: usize) -> Vec<f32> {
        let row_bytes = m.row_bytes();
        let weights = &self.map[m.offset..m.offset + m.rows * row_bytes];
        let stretch_values = m.ty.block_size() * STRETCH.div_ceil(m.ty.block_size());
        let stretch_bytes = stretch_values / m.ty.block_size() * m.ty.block_bytes();
        // One task per output row writes that row's n results: [rows, n], transposed below.
        let mut by_row = vec![0f32; m.rows * n];
        by_row.par_chunks_mut(n).enumerate().for_each_init(
            || Vec::with_capacity(stretch_values),
            |decoded, (r, acc)| {
                let row = &weights[r * row_bytes..(r + 1) * row_bytes];
                for (s, stretch) in row.chunks(stretch_bytes).enumerate() {
                    decoded.clear();
                    let _ = dequantize_into(m.ty, stretch, decoded);
                    let from = s * stretch_values;
                    for (t, a) in acc.iter_mut().enumerate() {
                        let x = &xs[t * m.cols + from..][..decoded.len()];
                        *a += dot(decoded, x);
                    }
                }
            },
        );
        let mut out = vec![0f32; n * m.rows];
        for (r, row) in by_row.chunks(n).enumerate() {
            for (t, v) in row.iter().enumerate() {
                out[t * m.rows + r] = *v;
            }
        }
        out
    }
}

/// Eight running sums, so the compiler can keep them in one SIMD register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Each row of `x` divided by its root mean square, times `gain`.
fn rms_norm(x: &[f32], gain: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(gain.len())
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(gain).map(move |(v, g)| v * inv * g)
        })
        .collect()
}

/// Rotates adjacent pairs `(2i, 2i + 1)` of every head of every row by `position · inv_freq[i]`,
/// rows at positions `start, start + 1, …`.
fn rope(x: &mut [f32], heads: usize, head_dim: usize, start: usize, inv_freq: &[f64]) {
    for (t, row) in x.chunks_mut(heads * head_dim).enumerate() {
        let position = (start + t) as f64;
        for head in row.chunks_mut(head_dim) {
            for (i, pair) in head.chunks_mut(2).enumerate() {
                let angle = position * inv_freq[i];
                let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }
}

/// Causal grouped-query attention of the queries (rows at positions `start…`) over the cached
/// keys and values of positions `0..=` each query's own.
fn attention(q: &[f32], keys: &[f32], values: &[f32], start: usize, c: &ModelConfig) -> Vec<f32> {
    let (heads, kv_heads, head_dim) = (c.n_heads, c.kv_heads(), c.head_dim());
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(i, o)| {
        let (t, h) = (i / heads, i % heads);
        let query = &q[t * q_width + h * head_dim..][..head_dim];
        let kv = (h / group) * head_dim;
        let seen = start + t + 1;
        let scores: Vec<f32> = (0..seen)
            .map(|j| dot(query, &keys[j * kv_width + kv..][..head_dim]) * scale)
            .collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        for (j, w) in weights.iter().enumerate() {
            let value = &values[j * kv_width + kv..][..head_dim];
            for (o, v) in o.iter_mut().zip(value) {
                *o += w / total * v;
            }
        }
    });
    out
}
