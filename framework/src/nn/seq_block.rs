//! Sequence-block attention: each query attends, causally, to the tokens of its own block of
//! `block_len` tokens and to one summary (the mean key and mean value) of each of the
//! `summaries` blocks before it; `summaries = 0` means every earlier block. It is a sequence-axis
//! scheme in the family of Block Transformer (arXiv 2406.02657) and H-Transformer-1D
//! (arXiv 2107.11906), not Attention Residuals, which mixes along depth.
//!
//! Cost per layer: O(T·B·d) for the local part plus O(T·S·d) for the summaries, with S the
//! summaries a query sees. With every earlier block (S = T/B) that is O(T·B·d + T²·d/B): linear
//! in T only when S is bounded. A summary is built only from a block whose tokens all precede
//! the query, so nothing reads the future.

use burn::prelude::*;
use burn::tensor::activation::softmax;

/// The blocked computation used for training and prefill: queries and keys at the same
/// positions (`[batch, heads, seq, head_dim]`, keys already repeated to every query head).
pub fn seq_block_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    block_len: usize,
    summaries: usize,
) -> Tensor<B, 4> {
    let [batch, heads, seq, head_dim] = q.dims();
    let device = q.device();
    let blocks = seq.div_ceil(block_len);
    let window = if summaries == 0 { blocks } else { summaries };
    let padded = blocks * block_len;
    let split = |x: Tensor<B, 4>| {
        into_blocks(x, block_len).reshape([batch, heads, blocks, block_len, head_dim])
    };
    let (q, k, v) = (split(q), split(k), split(v));
    let scale = (head_dim as f64).powf(-0.5);

    // Local scores within each block, [batch, heads, blocks, B, B].
    let local = q.clone().matmul(k.clone().swap_dims(3, 4)) * scale;

    // The `window` summaries before block i are blocks i − window … i − 1; padding the summary
    // list with `window` empty blocks in front lets every block take the same slice shape.
    let summarize = |x: Tensor<B, 5>| {
        let means: Tensor<B, 4> = x.mean_dim(3).squeeze_dim(3);
        let front = Tensor::zeros([batch, heads, window, head_dim], (&device, means.dtype()));
        let padded = Tensor::cat(vec![front, means], 2);
        let slots: Vec<Tensor<B, 4>> = (0..window)
            .map(|s| {
                padded
                    .clone()
                    .slice([0..batch, 0..heads, s..s + blocks, 0..head_dim])
            })
            .collect();
        Tensor::stack::<5>(slots, 3) // [batch, heads, blocks, window, head_dim]
    };
    let (k_sum, v_sum) = (summarize(k), summarize(v.clone()));
    let summary_scores = q.matmul(k_sum.swap_dims(3, 4)) * scale; // [.., blocks, B, window]

    let mask = block_mask::<B>(blocks, block_len, window, &device);
    let scores = Tensor::cat(vec![summary_scores, local], 4).mask_fill(mask, f32::NEG_INFINITY);
    let weights = softmax(scores, 4);
    let to_summaries =
        weights
            .clone()
            .slice([0..batch, 0..heads, 0..blocks, 0..block_len, 0..window]);
    let to_tokens = weights.slice([
        0..batch,
        0..heads,
        0..blocks,
        0..block_len,
        window..window + block_len,
    ]);
    let out = to_summaries.matmul(v_sum) + to_tokens.matmul(v);
    out.reshape([batch, heads, padded, head_dim])
        .slice([0..batch, 0..heads, 0..seq, 0..head_dim])
}

/// `x: [batch, heads, seq, head_dim]` padded with zero rows to a whole number of blocks.
pub(crate) fn into_blocks<B: Backend>(x: Tensor<B, 4>, block_len: usize) -> Tensor<B, 4> {
    let [batch, heads, seq, head_dim] = x.dims();
    let padded = seq.next_multiple_of(block_len);
    if padded == seq {
        return x;
    }
    let zeros = Tensor::zeros(
        [batch, heads, padded - seq, head_dim],
        (&x.device(), x.dtype()),
    );
    Tensor::cat(vec![x, zeros], 2)
}

/// `true` where block i's query r must not look: summary slot s stands for block i − window + s,
/// which must exist; local key c must not come after r.
fn block_mask<B: Backend>(
    blocks: usize,
    block_len: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 5, Bool> {
    let width = window + block_len;
    let mut masked = Vec::with_capacity(blocks * block_len * width);
    for i in 0..blocks {
        for r in 0..block_len {
            for s in 0..window {
                masked.push(i + s < window);
            }
            for c in 0..block_len {
                masked.push(c > r);
            }
        }
    }
    Tensor::<B, 3, Bool>::from_data(TensorData::new(masked, [blocks, block_len, width]), device)
        .unsqueeze::<5>()
}

/// The same attention for queries at the last `q_len` of `kv_len` positions (KV-cache decoding),
/// computed directly from the definition: one score per key and per earlier block summary, with
/// everything a query may not see masked. O(q_len · kv_len); also the reference the blocked
/// version is tested against.
pub fn seq_block_attention_at<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    block_len: usize,
    summaries: usize,
) -> Tensor<B, 4> {
    let [batch, heads, q_len, head_dim] = q.dims();
    let kv_len = k.dims()[2];
    let device = q.device();
    let start = kv_len - q_len;
    let complete = kv_len / block_len;
    let scale = (head_dim as f64).powf(-0.5);

    let token_scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
    let mut parts = vec![token_scores];
    let mut values = vec![v.clone()];
    if complete > 0 {
        let used = complete * block_len;
        let mean = |x: Tensor<B, 4>| {
            x.slice([0..batch, 0..heads, 0..used, 0..head_dim])
                .reshape([batch, heads, complete, block_len, head_dim])
                .mean_dim(3)
                .squeeze_dim::<4>(3)
        };
        let (k_sum, v_sum) = (mean(k), mean(v));
        parts.push(q.matmul(k_sum.swap_dims(2, 3)) * scale);
        values.push(v_sum);
    }
    let mut masked = Vec::with_capacity(q_len * (kv_len + complete));
    for t in start..kv_len {
        let own = t / block_len;
        for j in 0..kv_len {
            masked.push(j / block_len != own || j > t);
        }
        for b in 0..complete {
            let oldest = if summaries == 0 {
                0
            } else {
                own.saturating_sub(summaries)
            };
            masked.push(b >= own || b < oldest);
        }
    }
    let mask = Tensor::<B, 2, Bool>::from_data(
        TensorData::new(masked, [q_len, kv_len + complete]),
        &device,
    )
    .unsqueeze::<4>();
    let weights = softmax(Tensor::cat(parts, 3).mask_fill(mask, f32::NEG_INFINITY), 3);
    weights.matmul(Tensor::cat(values, 2))
}
