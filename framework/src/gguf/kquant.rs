//! ggml's k-quants: super-blocks of 256 values split into sub-blocks whose scales are themselves
//! quantized (ggml-common.h, ggml-quants.c). The quantizers follow ggml's reference ones
//! (`quantize_row_q{4,5,6}_K_ref`, what llama-quantize runs without an importance matrix): a
//! weighted least-squares search for each sub-block's scale (and minimum), then the sub-block
//! scales quantized to 6 or 8 bits and the values requantized against them.
//!
//! | type | bytes / 256 values | layout | value |
//! | --- | --- | --- | --- |
//! | Q4_K | 144 | f16 d, f16 dmin, 12 bytes of 6-bit scales and mins (8 sub-blocks of 32), 128 bytes of nibbles | d·sc·q − dmin·m |
//! | Q5_K | 176 | as Q4_K, then 32 bytes of fifth bits before the nibbles | d·sc·q − dmin·m |
//! | Q6_K | 210 | 128 bytes of low nibbles, 64 bytes of high 2 bits, 16 × i8 scales (sub-blocks of 16), f16 d | d·sc·(q − 32) |

use half::f16;

pub const QK_K: usize = 256;

/// ggml's `nearest_int`: round half to even (valid for |x| < 2²²).
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// ggml's `make_qkx2_quants`: a scale and a non-positive minimum for `x` with levels 0..=nmax
/// minimising the weighted squared error, searching `nstep + 1` scales around the min–max one.
/// Writes the levels to `levels` and returns (scale, −minimum).
fn scale_and_min(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * diff * diff;
    }
    let mut trial = vec![0u8; n];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            trial[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..n {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                error += weights[i] * diff * diff;
            }
            if error < best_error {
                levels.copy_from_slice(&trial);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared first half of Q4_K and Q5_K: per 32-value sub-block scales and minimums, their
/// 6-bit codes, and the values requantized to 0..=nmax against the coded ones. Returns
/// (d, dmin, packed scales, levels).
fn q45_k_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> (f32, f32, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut weights = [0f32; 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = sub.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(sub) {
            *w = av_x + v.abs();
        }
        let (scale, min) = scale_and_min(
            sub,
            &weights,
            nmax,
            &mut levels[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        max_scale = max_scale.max(scale);
        max_min = max_min.max(min);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
    (max_scale / 63.0, max_min / 63.0, packed, levels)
}

pub fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, levels) = q45_k_levels(x, 15, -1.0, 20);
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(dmin));
    out.extend(scales);
    for chunk in levels.chunks(64) {
        out.extend((0..32).map(|l| chunk[l] | (chunk[l + 32] << 4)));
    }
}

pub fn quantize_q5_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, levels) = q45_k_levels(x, 31, -0.5, 15);
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(dmin));
    out.extend(scales);
    // Fifth bits: bit 2n of byte l is value 64n + l's, bit 2n + 1 is value 64n + 32 + l's.
    let mut high = [0u8; 32];
    for (n, chunk) in levels.chunks(64).enumerate() {
        for l in 0..32 {
            high[l] |= ((chunk[l] >> 4) << (2 * n)) | ((chunk[l + 32] >> 4) << (2 * n + 1));
        }
    }
    out.extend(high);
    for chunk in levels.chunks(64) {
        out.extend((0..32).map(|l| (chunk[l] & 0xf) | ((chunk[l + 32] & 0xf) << 4)));
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights x²): a signed scale for levels
/// −nmax..nmax−1, searching 18 scales around −nmax/max. Writes levels + nmax; returns the scale.
fn signed_scale(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sum_lx, mut sum_l2) = (0f32, 0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sum_lx += w * v * l;
            sum_l2 += w * l * l;
        }
        (sum_lx, sum_l2)
    };
    let iscale = -(nmax as f32) / max;
    for (q, &v) in levels.iter_mut().zip(x) {
        *q = (level(iscale, v) + nmax) as u8;
    }
    let (sum_lx, sum_l2) = sums(iscale);
    let mut scale = if sum_l2 != 0.0 { sum_lx / sum_l2 } else { 0.0 };
    let mut best = scale * sum_lx;
    for step in -9..=9 {
        if step == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sum_lx, sum_l2) = sums(iscale);
        if sum_l2 > 0.0 && sum_lx * sum_lx > best * sum_l2 {
            for (q, &v) in levels.iter_mut().zip(x) {
                *q = (level(iscale, v) + nmax) as u8;
            }
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
        }
    }
    scale
}

pub fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for (ib, scale) in scales.iter_mut().enumerate() {
        *scale = signed_scale(
            &x[16 * ib..16 * ib + 16],
            32,
            &mut levels[16 * ib..16 * ib + 16],
        );
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs_scale < 1e-15 {
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let codes: Vec<i8> = scales
        .iter()
        .map(|&s| nearest_int(iscale * s).min(127) as i8)
        .collect();
    for (j, &code) in codes.iter().enumerate() {
        let d = d.to_f32() * code as f32;
        if d == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / d).clamp(-32, 31) + 32) as u8;
        }
    }
    let mut low = Vec::with_capacity(128);
    let mut high = Vec::with_capacity(64);
    for chunk in levels.chunks(128) {
        low.extend((0..32).map(|l| (chunk[l] & 0xf) | ((chunk[l + 64] & 0xf) << 4)));
        low.extend((0..32).map(|l| (chunk[l + 32] & 0xf) | ((chunk[l + 96] & 0xf) << 4)));
        high.extend((0..32).map(|l| {
            (chunk[l] >> 4)
                | ((chunk[l + 32] >> 4) << 2)
                | ((chunk[l + 64] >> 4) << 4)
                | ((chunk[l + 96] >> 4) << 6)
        }));
    }
    out.extend(low);
    out.extend(high);
    out.extend(codes.iter().map(|&c| c as u8));
    out.extend(d.to_le_bytes());
}

/// Q4_K (`with_fifth_bit = false`, 144-byte blocks) or Q5_K (176-byte blocks) → 256 values.
pub fn dequantize_q45_k(block: &[u8], with_fifth_bit: bool, out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let scales = &block[4..16];
    let (high, low) = if with_fifth_bit {
        (Some(&block[16..48]), &block[48..176])
    } else {
        (None, &block[16..144])
    };
    for (n, nibbles) in low.chunks(32).enumerate() {
        for half in 0..2 {
            let (sc, m) = scale_min_k4(2 * n + half, scales);
            let (d, m) = (d * sc as f32, dmin * m as f32);
            for l in 0..32 {
                let mut q = (nibbles[l] >> (4 * half)) & 0xf;
                if let Some(high) = high {
                    q |= ((high[l] >> (2 * n + half)) & 1) << 4;
                }
                out.push(d * q as f32 - m);
            }
        }
    }
}

/// Q6_K (210-byte blocks) → 256 values.
pub fn dequantize_q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (low, rest) = block.split_at(128);
    let (high, rest) = rest.split_at(64);
    let (scales, d) = rest.split_at(16);
    let d = f16_at(d, 0);
    for half in 0..2 {
        let (low, high, scales) = (
            &low[64 * half..64 * half + 64],
            &high[32 * half..32 * half + 32],
            &scales[8 * half..8 * half + 8],
        );
        for quarter in 0..4 {
            for l in 0..32 {
                let nibble = (low[l + 32 * (quarter % 2)] >> (4 * (quarter / 2))) & 0xf;
                let q = (nibble | (((high[l] >> (2 * quarter)) & 3) << 4)) as i32 - 32;
                let scale = scales[l / 16 + 2 * quarter] as i8 as f32;
                out.push(d * scale * q as f32);
            }
        }
    }
}
