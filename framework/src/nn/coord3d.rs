//! 3D-coordinate attention (`attention = "coord3d"`): every token carries integer coordinates
//! (x, y, z); the head's rotary pairs are split among the three axes (M-RoPE, Qwen2-VL,
//! arXiv 2409.12191, with Qwen3-VL's interleaved sections), and each query reads only the key
//! blocks that the block multi-scale ("BMS") rule keeps, so attention costs O(n log n).
//!
//! For plain text x = y = z = token index, which is exactly 1-D RoPE: the rotary phase of pair m
//! is θ_m · c[axis(m)] and every axis holds the same number. Scores depend on coordinate
//! differences only, so a shared offset (such as a layer index) cancels out.
//!
//! BMS, causal over the token order: with block length b, window W (in blocks), I and J the
//! query and key blocks and D = I − J,
//!
//! keep(I, J) = 0 ≤ D < W, or W·2^(k−1) ≤ D < W·2^k and J ≡ 0 (mod 2^k) for some k ≥ 1.
//!
//! Block 0 is always kept (J = 0 is divisible by every 2^k): an attention sink. A query sees at
//! most b·(W + K·(⌊W/2⌋ + 1)) keys with K = ⌈log2(n / (b·W))⌉ levels. Key block J is read by the
//! query blocks I with I − J < W·2^v2(J) and by none after, so decoding can drop it then.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::seq_block::into_blocks;

/// The block multi-scale pruning rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bms {
    /// Tokens per block, b.
    pub block_len: usize,
    /// Blocks of the local window, W.
    pub window: usize,
    /// `false`: the window alone (sliding-window attention, no levels and no sink), the
    /// baseline that tells what the levels add.
    pub multiscale: bool,
}

impl Bms {
    /// The rule with its levels and sink.
    pub fn new(block_len: usize, window: usize) -> Self {
        Self {
            block_len,
            window,
            multiscale: true,
        }
    }

    /// Whether query block `i` reads key block `j`.
    pub fn keeps(&self, i: usize, j: usize) -> bool {
        if j > i {
            return false;
        }
        let d = i - j;
        if d < self.window {
            return true;
        }
        if !self.multiscale {
            return false;
        }
        // W·2^(k−1) ≤ D < W·2^k  ⟺  2^(k−1) ≤ ⌊D/W⌋ < 2^k  ⟺  k = bit length of ⌊D/W⌋.
        let level = usize::BITS - (d / self.window).leading_zeros();
        j == 0 || j.trailing_zeros() >= level
    }

    /// The last query block that reads key block `j`; `None` for block 0, read by every block.
    pub fn last_reader(&self, j: usize) -> Option<usize> {
        if !self.multiscale {
            return Some(j + self.window - 1);
        }
        if j == 0 {
            return None;
        }
        let reach = self.window.checked_shl(j.trailing_zeros())?;
        Some(j + reach - 1)
    }

    /// The key blocks query block `i` reads, ascending.
    pub fn kept_blocks(&self, i: usize) -> Vec<usize> {
        (0..=i).filter(|&j| self.keeps(i, j)).collect()
    }

    /// The bound b·(W + K·(⌊W/2⌋ + 1)), K = ⌈log2(n / (b·W))⌉, on the keys one query sees.
    pub fn max_keys(&self, seq_len: usize) -> usize {
        if !self.multiscale {
            return self.block_len * self.window;
        }
        let span = self.block_len * self.window;
        let mut levels = 0;
        while span << levels < seq_len {
            levels += 1;
        }
        self.block_len * (self.window + levels * (self.window / 2 + 1))
    }

    /// `true` where the query at token index `i` must not read the key at token index `j`.
    pub fn masks(&self, i: usize, j: usize) -> bool {
        j > i || !self.keeps(i / self.block_len, j / self.block_len)
    }
}

/// Integer coordinates per token, `[batch, seq]` of (x, y, z), row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coords {
    pub batch: usize,
    pub seq: usize,
    pub xyz: Vec<[i64; 3]>,
}

impl Coords {
    /// Plain text: x = y = z = the token's index, counting from `offset`.
    pub fn diagonal(batch: usize, seq: usize, offset: usize) -> Self {
        let row = (0..seq).map(|t| [(offset + t) as i64; 3]);
        Self {
            batch,
            seq,
            xyz: (0..batch).flat_map(|_| row.clone()).collect(),
        }
    }

    /// Code and tables: x = the token's index in its row, y = the line it is on and z = its
    /// column, both in tokens and counted from the row's start (so a first line that began
    /// before the row counts its columns from there). `breaks[id]` says whether token `id`
    /// ends a line; the token after it starts the next.
    pub fn line_col(ids: &[u32], batch: usize, seq: usize, breaks: &[bool]) -> Self {
        let mut xyz = Vec::with_capacity(ids.len());
        for row in ids.chunks(seq) {
            let (mut line, mut line_start) = (0i64, 0i64);
            for (t, &id) in row.iter().enumerate() {
                let t = t as i64;
                xyz.push([t, line, t - line_start]);
                if breaks.get(id as usize).copied().unwrap_or(false) {
                    line += 1;
                    line_start = t + 1;
                }
            }
        }
        Self { batch, seq, xyz }
    }

    /// Every coordinate moved by `delta` (scores must not change).
    pub fn shifted(&self, delta: [i64; 3]) -> Self {
        let xyz = self
            .xyz
            .iter()
            .map(|c| [c[0] + delta[0], c[1] + delta[1], c[2] + delta[2]])
            .collect();
        Self {
            xyz,
            ..self.clone()
        }
    }
}

/// The axis (0 = x, 1 = y, 2 = z) of each of the head's rotary pairs: pairs are dealt to the axes
/// in turn, x, y, z, x, …, skipping an axis once it has its `sections[axis]` pairs (Qwen3-VL's
/// interleaving, so every axis gets low and high frequencies).
pub fn interleaved_axes(sections: [usize; 3]) -> Vec<usize> {
    let mut left = sections;
    let total: usize = sections.iter().sum();
    let mut axes = Vec::with_capacity(total);
    let mut axis = 0;
    while axes.len() < total {
        if left[axis] > 0 {
            left[axis] -= 1;
            axes.push(axis);
        }
        axis = (axis + 1) % 3;
    }
    axes
}

/// The default split of `pairs` rotary pairs over the axes: as even as possible, x first.
pub fn default_sections(pairs: usize) -> [usize; 3] {
    let third = pairs / 3;
    [pairs - 2 * third, third, third]
}

/// Scores one pass of [`bms_attention`] may hold: under 2^31, so that GPU kernels indexing with
/// 32-bit integers stay exact, and a bound on the pass's memory.
pub const MAX_SCORES_PER_PASS: usize = 1 << 30;

/// BMS attention for training and prefill: queries and keys at the same token positions,
/// `[batch, heads, seq, head_dim]` with keys already repeated to every query head.
///
/// Each query block gathers its kept key blocks (padded to the longest list, the padding
/// masked), so memory and time are O(n · max kept keys) = O(n log n), and every step is an
/// ordinary tensor op: it runs and differentiates on every backend. Query blocks go in passes
/// of at most [`MAX_SCORES_PER_PASS`] scores. On wgpu and CUDA, with a block length that is a
/// multiple of the kernels' tile, the flash kernels of `strata-kernels` compute it instead
/// (forward and backward), skipping the blocks the rule drops.
pub fn bms_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bms: Bms,
) -> Tensor<B, 4> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let (q, k, v) = match super::fused::attention::bms_trained(q, k, v, bms) {
        Ok(out) => return out,
        Err((q, k, v)) => {
            if let Some(out) = super::attention::prefill_kernel(&q, &k, &v, bms.into()) {
                return out;
            }
            (q, k, v)
        }
    };
    bms_attention_in_passes(q, k, v, bms, MAX_SCORES_PER_PASS)
}

/// [`bms_attention`] with at most `max_scores` scores per pass (at least one query block).
pub fn bms_attention_in_passes<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bms: Bms,
    max_scores: usize,
) -> Tensor<B, 4> {
    let [batch, heads, seq, head_dim] = q.dims();
    let b = bms.block_len;
    let blocks = seq.div_ceil(b);
    let lists: Vec<Vec<usize>> = (0..blocks).map(|i| bms.kept_blocks(i)).collect();
    let width = lists.iter().map(Vec::len).max().unwrap_or(1);
    let split = |x: Tensor<B, 4>| into_blocks(x, b).reshape([batch, heads, blocks, b, head_dim]);
    let (q, k, v) = (split(q), split(k), split(v));
    let step = (max_scores / (batch * heads * b * width * b)).max(1);
    let passes: Vec<Tensor<B, 5>> = (0..blocks)
        .step_by(step)
        .map(|first| {
            let last = (first + step).min(blocks);
            let q = q.clone().slice_dim(2, first..last);
            query_blocks(
                q,
                k.clone(),
                v.clone(),
                &lists[first..last],
                first,
                width,
                b,
            )
        })
        .collect();
    Tensor::cat(passes, 2)
        .reshape([batch, heads, blocks * b, head_dim])
        .slice_dim(2, 0..seq)
}

/// Attention of query blocks `first..first + lists.len()` (`q: [batch, heads, count, b, d]`)
/// over their kept key blocks of `k`, `v` (`[batch, heads, blocks, b, d]`), `width` slots each.
fn query_blocks<B: Backend>(
    q: Tensor<B, 5>,
    k: Tensor<B, 5>,
    v: Tensor<B, 5>,
    lists: &[Vec<usize>],
    first: usize,
    width: usize,
    b: usize,
) -> Tensor<B, 5> {
    let [batch, heads, count, _, head_dim] = q.dims();
    let device = q.device();
    // Slot s of query block i holds key block lists[i][s]; missing slots repeat block i and are
    // masked, as are keys after the query inside its own block. The mask is put together on
    // the device from per-slot flags and one b×b causal tile, so the host builds O(n/b) entries.
    let mut index = Vec::with_capacity(count * width);
    let mut empty = Vec::with_capacity(count * width);
    let mut diagonal = Vec::with_capacity(count * width);
    for (i, list) in (first..).zip(lists) {
        for s in 0..width {
            let j = list.get(s).copied();
            index.push(j.unwrap_or(i) as i64);
            empty.push(j.is_none());
            diagonal.push(j == Some(i));
        }
    }
    let flags = |v: Vec<bool>| {
        Tensor::<B, 2, Bool>::from_data(TensorData::new(v, [count, width]), &device)
            .reshape([count, 1, width, 1])
    };
    let later: Vec<bool> = (0..b * b).map(|rc| rc % b > rc / b).collect();
    let later = Tensor::<B, 2, Bool>::from_data(TensorData::new(later, [b, b]), &device)
        .reshape([1, b, 1, b]);
    let mask = flags(empty)
        .expand([count, b, width, b])
        .bool_or(
            flags(diagonal)
                .expand([count, b, width, b])
                .bool_and(later.expand([count, b, width, b])),
        )
        .reshape([count, b, width * b])
        .unsqueeze::<5>();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [count * width]), &device);
    let gather = |x: Tensor<B, 5>| {
        x.select(2, index.clone())
            .reshape([batch, heads, count, width * b, head_dim])
    };
    let scale = (head_dim as f64).powf(-0.5);
    let scores = q.matmul(gather(k).swap_dims(3, 4)) * scale; // [batch, heads, count, b, width·b]
    let weights = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 4);
    weights.matmul(gather(v))
}

/// BMS attention computed densely: Burn's attention with the full n×n mask of
/// [`Bms::masks`]. `q_positions` and `k_positions` are the token indices of the query and key
/// rows. O(n²): the reference the gathered path is tested against, and the decode path, where
/// the keys are the live cache.
pub fn bms_attention_masked<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    q_positions: &[usize],
    k_positions: &[usize],
    bms: Bms,
) -> Tensor<B, 4> {
    let masked: Vec<bool> = q_positions
        .iter()
        .flat_map(|&i| k_positions.iter().map(move |&j| bms.masks(i, j)))
        .collect();
    let shape = [q_positions.len(), k_positions.len()];
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(masked, shape), &q.device())
        .unsqueeze::<4>();
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: false,
    };
    attention(q, k, v, Some(mask), None, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_follows_the_definition() {
        let bms = Bms::new(1, 4);
        // D < 4: the window. 4 ≤ D < 8 (k = 1): even J. 8 ≤ D < 16 (k = 2): J ≡ 0 mod 4.
        assert_eq!(bms.kept_blocks(7), vec![0, 2, 4, 5, 6, 7]);
        assert_eq!(bms.kept_blocks(12), vec![0, 4, 6, 8, 9, 10, 11, 12]);
        assert_eq!(bms.last_reader(6), Some(6 + 8 - 1));
        assert_eq!(bms.last_reader(5), Some(5 + 4 - 1));
        assert_eq!(bms.last_reader(0), None);
    }

    #[test]
    fn line_col_counts_lines_and_columns_from_the_row_start() {
        let mut breaks = vec![false; 259];
        breaks[b'\n' as usize] = true;
        let ids: Vec<u32> = b"ab\ncd\n\nefgh\n".iter().map(|&b| u32::from(b)).collect();
        let coords = Coords::line_col(&ids, 2, 6, &breaks);
        let want = [
            // row 1: "ab\ncd\n"
            [0, 0, 0],
            [1, 0, 1],
            [2, 0, 2],
            [3, 1, 0],
            [4, 1, 1],
            [5, 1, 2],
            // row 2: "\nefgh\n", counted afresh
            [0, 0, 0],
            [1, 1, 0],
            [2, 1, 1],
            [3, 1, 2],
            [4, 1, 3],
            [5, 1, 4],
        ];
        assert_eq!(coords.xyz, want);
    }

    #[test]
    fn interleaving_deals_pairs_in_turn() {
        assert_eq!(interleaved_axes([3, 2, 1]), vec![0, 1, 2, 0, 1, 0]);
        let qwen3 = interleaved_axes([24, 20, 20]);
        assert_eq!(&qwen3[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(&qwen3[60..], &[0, 0, 0, 0]);
        assert_eq!(default_sections(64), [22, 21, 21]);
    }
}
