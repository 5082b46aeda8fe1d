//! ggml tensor types and their block formats (ggml-common.h), with quantizers that reproduce
//! ggml's reference ones bit for bit (checked against the `gguf` Python package, whose numpy
//! quantizers are ggml's reference code ported) and the matching dequantizers.
//!
//! A quantized row is a sequence of blocks of `block_size()` values; rows must hold a whole
//! number of blocks.

use half::{bf16, f16};

use super::kquant::{
    QK_K, dequantize_q6_k, dequantize_q45_k, quantize_q4_k, quantize_q5_k, quantize_q6_k,
};
use crate::error::{Error, Result};

/// ggml's names, so that a type reads as llama.cpp's documentation writes it.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// 32 values: f16 scale d, 32 × i8; x = d·q.
    Q8_0,
    /// 32 values: f16 scale d, 16 bytes of nibbles; x = d·(q − 8).
    Q4_0,
    /// 32 values: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d·q + m.
    Q4_1,
    /// 32 values: f16 scale d, 4 bytes of fifth bits, 16 bytes of nibbles; x = d·(q − 16).
    Q5_0,
    /// 32 values: f16 scale d, f16 minimum m, 4 bytes of fifth bits, nibbles; x = d·q + m.
    Q5_1,
    /// 256 values in 8 sub-blocks with 6-bit scales and minimums (see [`super::kquant`]).
    Q4_K,
    /// Q4_K with a fifth bit per value.
    Q5_K,
    /// 256 values in 16 sub-blocks with 8-bit scales, 6-bit values.
    Q6_K,
}

impl GgmlType {
    /// Every type this module reads and writes.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// The `ggml_type` id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The lower-case name llama.cpp uses (`q8_0`), also accepted by [`GgmlType::parse`].
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q4_K => "q4_k",
            GgmlType::Q5_K => "q5_k",
            GgmlType::Q6_K => "q6_k",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// Bytes that `values` values take; an error unless they fill whole blocks.
    pub fn bytes_for(self, values: usize) -> Result<usize> {
        if !values.is_multiple_of(self.block_size()) {
            return Err(Error::Data(format!(
                "{} stores blocks of {} values; {values} values do not fill whole blocks",
                self.name(),
                self.block_size()
            )));
        }
        Ok(values / self.block_size() * self.block_bytes())
    }
}

/// Encodes `values` (a whole number of blocks) as `ty`.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.bytes_for(values.len())?);
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend(to_bf16(*v).to_le_bytes())),
        GgmlType::Q8_0 => values.chunks(32).for_each(|b| quantize_q8_0(b, &mut out)),
        GgmlType::Q4_0 => values.chunks(32).for_each(|b| quantize_q4_0(b, &mut out)),
        GgmlType::Q4_1 => values.chunks(32).for_each(|b| quantize_q4_1(b, &mut out)),
        GgmlType::Q5_0 => values.chunks(32).for_each(|b| quantize_q5_0(b, &mut out)),
        GgmlType::Q5_1 => values.chunks(32).for_each(|b| quantize_q5_1(b, &mut out)),
        GgmlType::Q4_K => values.chunks(QK_K).for_each(|b| quantize_q4_k(b, &mut out)),
        GgmlType::Q5_K => values.chunks(QK_K).for_each(|b| quantize_q5_k(b, &mut out)),
        GgmlType::Q6_K => values.chunks(QK_K).for_each(|b| quantize_q6_k(b, &mut out)),
    }
    Ok(out)
}

/// Decodes `bytes` of type `ty` into f32 values.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(bytes.len() / ty.block_bytes() * ty.block_size());
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// [`dequantize`] appending to `out`, so that a caller decoding block after block reuses one
/// buffer.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    if !bytes.len().is_multiple_of(ty.block_bytes()) {
        return Err(Error::Data(format!(
            "{} data must be whole blocks of {} bytes, got {} bytes",
            ty.name(),
            ty.block_bytes(),
            bytes.len()
        )));
    }
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for block in bytes.chunks(ty.block_bytes()) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([block[0], block[1], block[2], block[3]])),
            GgmlType::F16 => out.push(half(block)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32()),
            GgmlType::Q8_0 => {
                let d = half(block);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
            GgmlType::Q4_0 => {
                let d = half(block);
                let nibbles = &block[2..];
                out.extend(nibbles.iter().map(|&q| d * (f32::from(q & 0x0f) - 8.0)));
                out.extend(nibbles.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (half(block), half(&block[2..]));
                let nibbles = &block[4..];
                out.extend(nibbles.iter().map(|&q| d * f32::from(q & 0x0f) + m));
                out.extend(nibbles.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
            GgmlType::Q5_0 => {
                let d = half(block);
                out.extend(five_bit_values(&block[2..]).map(|q| d * (f32::from(q) - 16.0)));
            }
            GgmlType::Q5_1 => {
                let (d, m) = (half(block), half(&block[2..]));
                out.extend(five_bit_values(&block[4..]).map(|q| d * f32::from(q) + m));
            }
            GgmlType::Q4_K => dequantize_q45_k(block, false, out),
            GgmlType::Q5_K => dequantize_q45_k(block, true, out),
            GgmlType::Q6_K => dequantize_q6_k(block, out),
        }
    }
    Ok(())
}

/// The 32 five-bit values of a Q5 block from its 4 bytes of fifth bits (bit j of the
/// little-endian u32 is value j's) followed by 16 bytes of low nibbles (as in Q4).
fn five_bit_values(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let high = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let nibbles = &bytes[4..20];
    (0..32).map(move |j| {
        let low = if j < 16 {
            nibbles[j] & 0x0f
        } else {
            nibbles[j - 16] >> 4
        };
        low | ((((high >> j) & 1) as u8) << 4)
    })
}

/// Writes Q5 fifth bits and nibbles for 32 five-bit values.
fn push_five_bit(q: &[u8; 32], out: &mut Vec<u8>) {
    let high = (0..32).fold(0u32, |acc, j| acc | (u32::from(q[j] >> 4) << j));
    out.extend(high.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
}

/// ggml_compute_fp32_to_bf16: round to nearest even; NaN stays a (quiet) NaN.
fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    ((u64::from(bits) + 0x7fff + u64::from((bits >> 16) & 1)) >> 16) as u16
}

/// Round half away from zero, as ggml's `roundf`.
fn round_away(x: f32) -> f32 {
    let a = x.abs();
    let floored = a.floor();
    let rounded = floored + (2.0 * (a - floored)).floor();
    if x < 0.0 { -rounded } else { rounded }
}

/// `1/d`, or 0 for an all-zero block.
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

fn quantize_q8_0(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|v| round_away(v * id) as i8 as u8));
}

fn quantize_q4_0(block: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude, with its sign, maps to −8.
    let max = block
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = inverse(d);
    let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
}

fn quantize_q4_1(block: &[f32], out: &mut Vec<u8>) {
    let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
    let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let q = |v: f32| (((v - min) * id + 0.5).trunc() as u8).min(15);
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(f16::from_f32(min).to_le_bytes());
    out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
}

fn quantize_q5_0(block: &[f32], out: &mut Vec<u8>) {
    let max = block
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -16.0;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(block) {
        *q = ((v * id + 16.5).trunc() as u8).min(31);
    }
    out.extend(f16::from_f32(d).to_le_bytes());
    push_five_bit(&q, out);
}

fn quantize_q5_1(block: &[f32], out: &mut Vec<u8>) {
    let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
    let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(block) {
        *q = (((v - min) * id + 0.5).trunc() as u8).min(31);
    }
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(f16::from_f32(min).to_le_bytes());
    push_five_bit(&q, out);
}
