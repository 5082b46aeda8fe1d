//! Causal grouped-query self-attention with rotary positions and an optional KV cache.

use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::coord3d::{Bms, MAX_SCORES_PER_PASS, bms_attention, bms_attention_masked};
#[cfg(any(feature = "wgpu", feature = "cuda"))]
use super::fused::kernel;
use super::lora::LoraLinear;
use super::rope::Phases;
use super::seq_block::{seq_block_attention, seq_block_attention_at};

/// Which positions a query reads along the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixing {
    /// Every earlier position.
    Dense,
    /// Its own block and summaries of earlier blocks (see [`super::seq_block`]).
    SeqBlock { block_len: usize, summaries: usize },
    /// The key blocks the block multi-scale rule keeps (see [`super::coord3d`]); blocks no
    /// later query reads leave the KV cache.
    Coord3d(Bms),
}

/// Keys and values of one layer for the tokens seen so far, `[batch, kv_heads, cached, head_dim]`,
/// and the token index of each cached row (all tokens, except where a sparse attention has
/// dropped keys no later query reads).
#[derive(Debug, Clone)]
pub struct LayerKvCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub positions: Vec<usize>,
}

/// Where a layer's keys and values come from.
pub enum KvSource<'a, B: Backend> {
    /// Its own projections of its input, appended to this cache slot when there is one.
    Own(Option<&'a mut Option<LayerKvCache<B>>>),
    /// Those another layer attended over (cross-layer KV sharing: Brandon et al.,
    /// arXiv 2405.12981), new tokens included.
    Shared(&'a LayerKvCache<B>),
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub wq: LoraLinear<B>,
    /// Key and value projections; `None` in a layer that reads the keys and values of the
    /// first layer of its sharing group (`model.kv_share`).
    pub wk: Option<LoraLinear<B>>,
    pub wv: Option<LoraLinear<B>>,
    pub wo: LoraLinear<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    #[module(skip)]
    pub mixing: Mixing,
}

impl<B: Backend> Attention<B> {
    #[allow(clippy::too_many_arguments)] // the layer's shape, as ModelConfig gives it
    pub fn new(
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        owns_kv: bool,
        mixing: Mixing,
        init: Initializer,
        out_init: Initializer,
        device: &B::Device,
    ) -> Self {
        let head_dim = d_model / n_heads;
        let linear = |d_in, d_out, init: &Initializer| LoraLinear::new(d_in, d_out, init, device);
        Self {
            wq: linear(d_model, n_heads * head_dim, &init),
            wk: owns_kv.then(|| linear(d_model, n_kv_heads * head_dim, &init)),
            wv: owns_kv.then(|| linear(d_model, n_kv_heads * head_dim, &init)),
            wo: linear(n_heads * head_dim, d_model, &out_init),
            n_heads,
            n_kv_heads,
            head_dim,
            mixing,
        }
    }

    /// `x: [batch, seq, d_model]` at the positions `phases` gives, attending over the keys and
    /// values `kv` names (its own ones are appended to the cache slot, if any). Returns the output
    /// and every key/value row it attended over, for the layers that share them.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        phases: &Phases<B>,
        kv: KvSource<'_, B>,
    ) -> (Tensor<B, 3>, LayerKvCache<B>) {
        let [batch, seq, _] = x.dims();
        // Rotary positions are applied in [batch, seq, heads, head_dim], where the projections
        // are still contiguous, then heads move to dim 1 for attention.
        let split = |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, self.head_dim]);
        let q = phases
            .rotate(split(self.wq.forward(x.clone()), self.n_heads))
            .swap_dims(1, 2);

        let (k, v, positions, cache) = match kv {
            KvSource::Shared(kv) => (kv.k.clone(), kv.v.clone(), kv.positions.clone(), None),
            KvSource::Own(cache) => {
                let (Some(wk), Some(wv)) = (&self.wk, &self.wv) else {
                    panic!("a layer without key/value projections must be given shared ones")
                };
                let k = phases
                    .rotate(split(wk.forward(x.clone()), self.n_kv_heads))
                    .swap_dims(1, 2);
                let v = split(wv.forward(x), self.n_kv_heads).swap_dims(1, 2);
                let new_positions = phases.offset..phases.offset + seq;
                match cache.as_ref().and_then(|slot| slot.as_ref()) {
                    Some(past) => (
                        Tensor::cat(vec![past.k.clone(), k], 2),
                        Tensor::cat(vec![past.v.clone(), v], 2),
                        past.positions
                            .iter()
                            .copied()
                            .chain(new_positions)
                            .collect(),
                        cache,
                    ),
                    None => (k, v, new_positions.collect::<Vec<_>>(), cache),
                }
            }
        };
        let (k_all, v_all) = (self.repeat_kv(k.clone()), self.repeat_kv(v.clone()));

        let kv_len = positions.len();
        let out = match self.mixing {
            Mixing::Dense => dense_causal(q, k_all, v_all),
            Mixing::SeqBlock {
                block_len,
                summaries,
            } if seq == kv_len => seq_block_attention(q, k_all, v_all, block_len, summaries),
            Mixing::SeqBlock {
                block_len,
                summaries,
            } => seq_block_attention_at(q, k_all, v_all, block_len, summaries),
            Mixing::Coord3d(bms) if seq == kv_len => bms_attention(q, k_all, v_all, bms),
            Mixing::Coord3d(bms) => {
                let q_positions = &positions[kv_len - seq..];
                bms_attention_masked(q, k_all, v_all, q_positions, &positions, bms)
            }
        };
        if let Some(slot) = cache {
            let next = phases.offset + seq;
            *slot = Some(self.live(k.clone(), v.clone(), positions.clone(), next));
        }
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, seq, self.n_heads * self.head_dim]);
        (self.wo.forward(out), LayerKvCache { k, v, positions })
    }

    /// The cache rows that a query at token index `next` or later may still read.
    fn live(
        &self,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        positions: Vec<usize>,
        next: usize,
    ) -> LayerKvCache<B> {
        let Mixing::Coord3d(bms) = self.mixing else {
            return LayerKvCache { k, v, positions };
        };
        let next_block = next / bms.block_len;
        let keep: Vec<usize> = (0..positions.len())
            .filter(|&row| {
                bms.last_reader(positions[row] / bms.block_len)
                    .is_none_or(|last| last >= next_block)
            })
            .collect();
        if keep.len() == positions.len() {
            return LayerKvCache { k, v, positions };
        }
        let rows = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                keep.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [keep.len()],
            ),
            &k.device(),
        );
        LayerKvCache {
            k: k.select(2, rows.clone()),
            v: v.select(2, rows),
            positions: keep.iter().map(|&r| positions[r]).collect(),
        }
    }

    /// Grouped-query attention: each KV head serves `n_heads / n_kv_heads` query heads.
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.n_heads / self.n_kv_heads;
        if groups == 1 {
            return x;
        }
        let [batch, kv_heads, seq, head_dim] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, seq, head_dim])
            .reshape([batch, kv_heads * groups, seq, head_dim])
    }
}

/// Softmax attention of queries at the last `q_len` of `kv_len` positions over every key up to
/// their own position. Queries go in passes of at most [`MAX_SCORES_PER_PASS`] scores: GPU
/// kernels index with 32 bits, and a larger score tensor came back wrong without an error.
/// Under autodiff this is [`super::fused::attention`]'s op, which keeps no score matrix for
/// backward; a prompt on the GPU backends goes through the flash kernel.
pub fn dense_causal<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    match super::fused::attention::dense_causal_trained(q, k, v) {
        Ok(out) => out,
        Err((q, k, v)) => {
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            if let Some(out) = prefill_kernel(&q, &k, &v, kernel::Pattern::Causal) {
                return out;
            }
            dense_causal_in_passes(q, k, v, MAX_SCORES_PER_PASS)
        }
    }
}

/// The flash kernel's output for a prompt of at least one tile of queries (outside autodiff),
/// where it runs; single decode steps take the tensor ops, which use the whole GPU for one row.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn prefill_kernel<B: Backend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    pattern: kernel::Pattern,
) -> Option<Tensor<B, 4>> {
    let long = q.dims()[2] >= strata_kernels::attention::TILE;
    (long && kernel::chosen::<B>(q.dims(), k.dims(), pattern))
        .then(|| kernel::forward(q.clone(), k.clone(), v.clone(), pattern).0)
}

/// [`dense_causal`] with at most `max_scores` scores per pass (one query row at least).
pub fn dense_causal_in_passes<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    max_scores: usize,
) -> Tensor<B, 4> {
    let [batch, heads, seq, _] = q.dims();
    let kv_len = k.dims()[2];
    let rows = rows_per_pass(batch * heads, kv_len, max_scores);
    if seq <= rows {
        return dense_causal_pass(q, k, v);
    }
    // Queries r0..r1 are the last ones of the keys up to their own positions.
    let passes = (0..seq)
        .step_by(rows)
        .map(|r0| {
            let r1 = (r0 + rows).min(seq);
            let end = kv_len - seq + r1;
            dense_causal_pass(
                q.clone().slice_dim(2, r0..r1),
                k.clone().slice_dim(2, 0..end),
                v.clone().slice_dim(2, 0..end),
            )
        })
        .collect();
    Tensor::cat(passes, 2)
}

fn dense_causal_pass<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (seq, kv_len) = (q.dims()[2], k.dims()[2]);
    // Burn's causal flag masks col > row, which is right only when queries and keys start
    // at the same position; with cached keys the queries sit at the end, so build the mask.
    let (mask, is_causal) = if seq == kv_len {
        (None, true)
    } else if seq == 1 {
        (None, false)
    } else {
        (
            Some(causal_mask::<B>(kv_len - seq, seq, kv_len, &q.device())),
            false,
        )
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    attention(q, k, v, mask, None, options)
}

/// `true` where query row r, at position `first + r`, must not see key j (j > first + r):
/// `[1, 1, rows, kv_len]`, built on the device.
pub(crate) fn causal_mask<B: Backend>(
    first: usize,
    rows: usize,
    kv_len: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let positions = Tensor::<B, 1, Int>::arange(first as i64..(first + rows) as i64, device)
        .reshape([rows, 1])
        .expand([rows, kv_len]);
    let keys = Tensor::<B, 1, Int>::arange(0..kv_len as i64, device)
        .reshape([1, kv_len])
        .expand([rows, kv_len]);
    keys.greater(positions).unsqueeze::<4>()
}

/// Query rows per pass so that a pass over `batch_heads` (batch × heads) sequences of `kv_len`
/// keys holds at most `max_scores` scores (one row at least).
pub(crate) fn rows_per_pass(batch_heads: usize, kv_len: usize, max_scores: usize) -> usize {
    (max_scores / (batch_heads * kv_len)).max(1)
}
