//! Causal softmax attention with its own backward pass, for training.
//!
//! Under burn 0.21's autodiff, `attention` is composed of tracked tensor ops: the tape keeps the
//! scores, their mask, the softmax and its intermediates, an n×n tensor each per head and layer,
//! and the backward pass walks every op. This op keeps only what flash attention keeps —
//! queries, keys, values, the output and each query row's log-sum-exp — and computes the
//! gradients in one pass from those (Dao et al., FlashAttention, arXiv 2205.14135, §3.1 and
//! Algorithm 4):
//!
//! ```text
//! P = exp(Q Kᵀ·s − lse)       (causal entries only)
//! dV = Pᵀ dO    dP = dO Vᵀ    D = rowsum(dO ∘ O)    dS = P ∘ (dP − D)
//! dQ = dS K·s   dK = dSᵀ Q·s
//! ```
//!
//! On the CPU backends both passes are one fused loop per (batch, head), run on every core, with
//! no n×n tensor at all. On wgpu and CUDA (without fusion) they are the CubeCL flash kernels of
//! `strata-kernels` ([`super::kernel`]), with no n×n tensor either; elsewhere they are tensor
//! ops in passes of queries, so the n×n scores exist for one layer at a time instead of for
//! every layer until backward.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorPrimitive};
use rayon::prelude::*;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
use super::kernel::{self, Pattern};
use super::{AutodiffOp, Inner, on_host, run_on_autodiff, same};
use crate::nn::coord3d::Bms;

type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// Causal attention of queries at the last `q_len` of `kv_len` positions, `[batch, heads, q_len,
/// head_dim]` against `[batch, heads, kv_len, head_dim]`, through this op when `B` is one of the
/// autodiff backends compiled in; `Err` gives the inputs back for any other backend.
pub fn dense_causal_trained<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Qkv<B>> {
    run_on_autodiff(CausalAttentionOp(q, k, v), Inner::Any).map_err(|op| (op.0, op.1, op.2))
}

struct CausalAttentionOp<B: Backend>(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

impl<B: Backend> AutodiffOp<B> for CausalAttentionOp<B> {
    type Output = Tensor<B, 4>;

    fn run<I: Backend>(self) -> Tensor<B, 4> {
        let out = attention_autodiff::<I>(same(self.0), same(self.1), same(self.2), None);
        same(out)
    }
}

/// Block multi-scale attention (queries and keys at the same positions) through the GPU flash
/// kernels, with their backward pass, when `B` is `Autodiff` over a backend they run on and
/// the block length is a multiple of their tile; `Err` gives the inputs back otherwise.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn bms_trained<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bms: Bms,
) -> Result<Tensor<B, 4>, Qkv<B>> {
    match run_on_autodiff(BmsAttentionOp(q, k, v, bms), Inner::Any) {
        Ok(result) => result,
        Err(op) => Err((op.0, op.1, op.2)),
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
struct BmsAttentionOp<B: Backend>(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Bms);

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl<B: Backend> AutodiffOp<B> for BmsAttentionOp<B> {
    type Output = Result<Tensor<B, 4>, Qkv<B>>;

    fn run<I: Backend>(self) -> Self::Output {
        let BmsAttentionOp(q, k, v, bms) = self;
        if !kernel::chosen::<I>(q.dims(), k.dims(), Pattern::from(bms)) {
            return Err((q, k, v));
        }
        let out = attention_autodiff::<I>(same(q), same(k), same(v), Some(bms));
        Ok(same(out))
    }
}

/// The autodiff node: causal attention, or BMS attention (GPU kernels only).
#[derive(Debug)]
struct FlashAttention {
    bms: Option<Bms>,
}

/// Saved for backward: q, k, v, the output and the row log-sum-exp `[batch, heads, q_len]`.
type Saved<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

impl<B: Backend> Backward<B, 3> for FlashAttention {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad_out = grads.consume::<B>(&ops.node);
        let (q, k, v, out, lse) = ops.state;
        let wrap = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
        let lse = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse));
        let (q, k, v, out, grad_out) = (wrap(q), wrap(k), wrap(v), wrap(out), wrap(grad_out));
        let (dq, dk, dv) = match self.bms {
            None => causal_backward(q, k, v, out, lse, grad_out),
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            Some(bms) => {
                let [dq, dk, dv] =
                    kernel::backward([q, k, v], out, lse, grad_out, Pattern::from(bms));
                (dq, dk, dv)
            }
            #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
            Some(_) => unreachable!("BMS attention is an autodiff op only on the GPU kernels"),
        };
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

/// Output and row log-sum-exp of causal (`bms` = `None`) or BMS attention.
fn forward_pass<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bms: Option<Bms>,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    match bms {
        None => causal_forward(q, k, v),
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        Some(bms) => kernel::forward(q, k, v, Pattern::from(bms)),
        #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
        Some(_) => unreachable!("BMS attention is an autodiff op only on the GPU kernels"),
    }
}

fn attention_autodiff<B: Backend>(
    q: Tensor<Autodiff<B>, 4>,
    k: Tensor<Autodiff<B>, 4>,
    v: Tensor<Autodiff<B>, 4>,
    bms: Option<Bms>,
) -> Tensor<Autodiff<B>, 4> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let inner =
        |p: &FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p.clone()));
    let (qi, ki, vi) = (
        inner(&q.primitive),
        inner(&k.primitive),
        inner(&v.primitive),
    );
    let out = match (FlashAttention { bms })
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = forward_pass(qi.clone(), ki.clone(), vi.clone(), bms);
            let state = (
                qi.into_primitive().tensor(),
                ki.into_primitive().tensor(),
                vi.into_primitive().tensor(),
                out.clone().into_primitive().tensor(),
                lse.into_primitive().tensor(),
            );
            prep.finish(state, out.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = forward_pass(qi, ki, vi, bms);
            prep.finish(out.into_primitive().tensor())
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Whether the fused host loops (f32, CPU backends) compute this op, rather than tensor ops.
fn host_loops<B: Backend>(q: &Tensor<B, 4>) -> bool {
    on_host::<B>() && q.dtype() == DType::F32
}

/// Output `[b, h, q_len, d]` and row log-sum-exp `[b, h, q_len]`.
pub fn causal_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    if host_loops(&q) {
        return host::forward(q, k, v);
    }
    #[cfg(feature = "cuda")]
    if kernel::mma_chosen(&q, &k) {
        return kernel::mma_forward(q, k, v);
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if kernel::chosen::<B>(q.dims(), k.dims(), Pattern::Causal) {
        return kernel::forward(q, k, v, Pattern::Causal);
    }
    device::forward(
        q,
        k,
        v,
        crate::nn::coord3d::MAX_SCORES_PER_PASS,
        query_passes(),
    )
}

/// Gradients of q, k and v.
pub fn causal_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    grad_out: Tensor<B, 4>,
) -> Qkv<B> {
    if host_loops(&q) {
        return host::backward(q, k, v, out, lse, grad_out);
    }
    #[cfg(feature = "cuda")]
    if kernel::mma_chosen(&q, &k) {
        let [dq, dk, dv] = kernel::mma_backward([q, k, v], out, lse, grad_out);
        return (dq, dk, dv);
    }
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if kernel::chosen::<B>(q.dims(), k.dims(), Pattern::Causal) {
        let [dq, dk, dv] = kernel::backward([q, k, v], out, lse, grad_out, Pattern::Causal);
        return (dq, dk, dv);
    }
    device::backward(
        q,
        k,
        v,
        out,
        lse,
        grad_out,
        crate::nn::coord3d::MAX_SCORES_PER_PASS,
        query_passes(),
    )
}

/// Passes of queries for attention in matrix form (`kernel::causal_passes`; 1 without the GPU
/// kernels).
fn query_passes() -> usize {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    return kernel::causal_passes();
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    1
}

/// Tensor-op form, for any backend: queries in passes of at most `max_scores` scores, and, where
/// the GPU score kernels run, in at least `query_passes` passes that each read only the keys up
/// to their last query.
pub mod device {
    use burn::prelude::*;

    use crate::nn::attention::{causal_mask, rows_per_pass};
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    use crate::nn::fused::kernel;

    /// A batched product of attention: through cuBLAS where that is the chosen GPU kernel
    /// (`kernel::attention_matmul_chosen`), Burn's product otherwise.
    fn product<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        if kernel::attention_matmul_chosen::<B>() {
            return kernel::matmul(a, b);
        }
        a.matmul(b)
    }

    /// [`product`] into a layout with heads and positions swapped where cuBLAS runs it
    /// (`kernel::matmul_heads_last`): the `[b, h, n, d]` result is a view of `[b, n, h, d]`.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn product_heads_last<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
        if kernel::attention_matmul_chosen::<B>() {
            return kernel::matmul_heads_last(a, b);
        }
        a.matmul(b)
    }

    /// Query rows per pass: as many as `max_scores` allows; and, where the score kernels run,
    /// at most a `query_passes`-th of the queries, so that each pass reads only the keys up to
    /// its last query ([`pass_keys`]) and most of the masked part of the n×n square is never
    /// computed.
    fn pass_rows<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        max_scores: usize,
        query_passes: usize,
    ) -> usize {
        let [batch, heads, q_len, _] = q.dims();
        let step = rows_per_pass(batch * heads, k.dims()[2], max_scores);
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        if kernel::softmax_chosen::<B>() {
            return step.min(q_len.div_ceil(query_passes.max(1)).max(1));
        }
        let _ = (q_len, query_passes);
        step
    }

    /// The position of query row `r0` and the keys that rows `r0..r1` read (causal).
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn pass_keys<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        r0: usize,
        r1: usize,
    ) -> (usize, std::ops::Range<usize>) {
        let offset = k.dims()[2] - q.dims()[2];
        (offset + r0, 0..offset + r1)
    }

    /// `sum` with `part` added to its first `part.dims()[2]` keys.
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    fn add_to_first_keys<B: Backend>(sum: Tensor<B, 4>, part: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, keys, d] = part.dims();
        if keys == sum.dims()[2] {
            return sum + part;
        }
        let first = [0..b, 0..h, 0..keys, 0..d];
        let updated = sum.clone().slice(first.clone()) + part;
        sum.slice_assign(first, updated)
    }

    /// `1/√head_dim`.
    fn scale<B: Backend>(q: &Tensor<B, 4>) -> f32 {
        (q.dims()[3] as f32).powf(-0.5)
    }

    /// Unscaled, unmasked scores `Q Kᵀ` of query rows `r0..r1`.
    fn raw_scores<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        r0: usize,
        r1: usize,
    ) -> Tensor<B, 4> {
        product(q.clone().slice_dim(2, r0..r1), k.clone().swap_dims(2, 3))
    }

    /// Scaled, masked scores of query rows `r0..r1`.
    fn scores<B: Backend>(
        q: &Tensor<B, 4>,
        k: &Tensor<B, 4>,
        r0: usize,
        r1: usize,
    ) -> Tensor<B, 4> {
        let (q_len, kv_len) = (q.dims()[2], k.dims()[2]);
        let s = raw_scores(q, k, r0, r1).mul_scalar(scale(q));
        let [b, h, rows, _] = s.dims();
        let future = causal_mask::<B>(kv_len - q_len + r0, rows, kv_len, &q.device())
            .expand([b, h, rows, kv_len]);
        s.mask_fill(future, f32::NEG_INFINITY)
    }

    pub fn forward<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        max_scores: usize,
        query_passes: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 3>) {
        let q_len = q.dims()[2];
        let step = pass_rows(&q, &k, max_scores, query_passes);
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for r0 in (0..q_len).step_by(step) {
            let r1 = (r0 + step).min(q_len);
            #[cfg(any(feature = "wgpu", feature = "cuda"))]
            if kernel::softmax_chosen::<B>() {
                let (first, keys) = pass_keys(&q, &k, r0, r1);
                let k = k.clone().slice_dim(2, keys.clone());
                let (p, lse) = kernel::causal_softmax(raw_scores(&q, &k, r0, r1), scale(&q), first);
                outs.push(product_heads_last(p, v.clone().slice_dim(2, keys)));
                lses.push(lse);
                continue;
            }
            let s = scores(&q, &k, r0, r1);
            let max = s.clone().max_dim(3);
            let p = (s - max.clone()).exp();
            let sum = p.clone().sum_dim(3);
            outs.push(product(p, v.clone()).div(sum.clone()));
            lses.push((max + sum.log()).squeeze_dim::<3>(3));
        }
        (cat(outs), cat(lses))
    }

    /// The passes' parts joined along the query axis (one part is returned as it is: Burn's
    /// `cat` copies even one tensor).
    fn cat<B: Backend, const D: usize>(mut parts: Vec<Tensor<B, D>>) -> Tensor<B, D> {
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        Tensor::cat(parts, 2)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        out: Tensor<B, 4>,
        lse: Tensor<B, 3>,
        grad_out: Tensor<B, 4>,
        max_scores: usize,
        query_passes: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let q_len = q.dims()[2];
        let scale = scale(&q);
        let step = pass_rows(&q, &k, max_scores, query_passes);
        let mut dqs = Vec::new();
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        if kernel::softmax_chosen::<B>() {
            // The score kernel computes FlashAttention's rowsum(dO ∘ O) itself.
            let _ = out;
            // Each pass adds its share of dK and dV; the first pass's share starts the sums.
            let (mut dk, mut dv) = (None, None);
            let add = |sum: Option<Tensor<B, 4>>, part: Tensor<B, 4>, like: &Tensor<B, 4>| match sum
            {
                Some(sum) => add_to_first_keys(sum, part),
                None if part.dims()[2] == like.dims()[2] => part,
                None => add_to_first_keys(like.zeros_like(), part),
            };
            for r0 in (0..q_len).step_by(step) {
                let r1 = (r0 + step).min(q_len);
                let dout = grad_out.clone().slice_dim(2, r0..r1);
                let (first, keys) = pass_keys(&q, &k, r0, r1);
                let (k_read, v_read) = (
                    k.clone().slice_dim(2, keys.clone()),
                    v.clone().slice_dim(2, keys),
                );
                let dp = product(dout.clone(), v_read.swap_dims(2, 3));
                let (p, ds) = kernel::causal_softmax_grad(
                    raw_scores(&q, &k_read, r0, r1),
                    lse.clone().slice_dim(2, r0..r1),
                    dp,
                    scale,
                    first,
                );
                let dv_pass = product_heads_last(p.swap_dims(2, 3), dout);
                dv = Some(add(dv, dv_pass, &v));
                let dk_pass = product(ds.clone().swap_dims(2, 3), q.clone().slice_dim(2, r0..r1));
                dk = Some(add(dk, dk_pass, &k));
                dqs.push(product(ds, k_read));
            }
            return (cat(dqs), dk.expect("a pass"), dv.expect("a pass"));
        }
        let delta = (grad_out.clone() * out).sum_dim(3);
        let (mut dk, mut dv) = (k.zeros_like(), v.zeros_like());
        for r0 in (0..q_len).step_by(step) {
            let r1 = (r0 + step).min(q_len);
            let dout = grad_out.clone().slice_dim(2, r0..r1);
            let p =
                (scores(&q, &k, r0, r1) - lse.clone().slice_dim(2, r0..r1).unsqueeze_dim(3)).exp();
            dv = dv + product(p.clone().swap_dims(2, 3), dout.clone());
            let dp = product(dout, v.clone().swap_dims(2, 3));
            let ds = p * (dp - delta.clone().slice_dim(2, r0..r1)) * scale;
            dk = dk + product(ds.clone().swap_dims(2, 3), q.clone().slice_dim(2, r0..r1));
            dqs.push(product(ds, k.clone()));
        }
        (cat(dqs), dk, dv)
    }
}

/// Fused loops over host memory, f32, one task per (batch, head). The loops read and write
/// the `[batch, seq, heads, head_dim]` layout the projections produce, so that the inputs (views
/// with heads and positions swapped) copy out as they lie in memory.
pub mod host {
    use super::*;
    use crate::nn::fused::{HostValues, Strided, dot, exp, from_host, matmul, softmax};

    /// Query rows per block. Each block's scores are one small matrix product against the keys
    /// up to its last row, so the causal half of the score matrix is mostly skipped while the
    /// products stay large enough for the matrix-multiply kernels.
    const QUERY_BLOCK: usize = 32;

    simd_kernel! {
        /// Rows of scores (`keys` wide) to probabilities in place: row `i` attends to its first
        /// `seen + i` keys and gets zeros after them; its log-sum-exp goes to `lse[i]`.
        fn softmax_rows((scores, keys, seen, lse): (&mut [f32], usize, usize, &mut [f32])) {
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let (seen, future) = row.split_at_mut(seen + i);
                lse[i] = softmax(seen);
                future.fill(0.0);
            }
        }
    }

    simd_kernel! {
        /// [`softmax_rows`] again from the saved log-sum-exp: `exp(score − lse)`.
        fn probabilities_rows((scores, keys, seen, lse): (&mut [f32], usize, usize, &[f32])) {
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                let (seen, future) = row.split_at_mut(seen + i);
                for x in seen.iter_mut() {
                    *x = exp(*x - lse[i]);
                }
                future.fill(0.0);
            }
        }
    }

    simd_kernel! {
        /// `dS = P ∘ (dP − D)·s` in place of dP, row `i` with `D = delta[i]`.
        fn score_gradients((dp, p, delta, scale): (&mut [f32], &[f32], &[f32], f32)) {
            let keys = p.len() / delta.len();
            for ((dp, p), &delta) in dp
                .chunks_exact_mut(keys)
                .zip(p.chunks_exact(keys))
                .zip(delta)
            {
                for (ds, &p) in dp.iter_mut().zip(p) {
                    *ds = p * (*ds - delta) * scale;
                }
            }
        }
    }

    /// `[b, h, n, d]` values in `[b, n, h, d]` order.
    fn seq_major<B: Backend>(t: Tensor<B, 4>) -> HostValues {
        HostValues::of(t.swap_dims(1, 2))
    }

    /// Rows of head `hh` of batch `bb` in a `[b, n, h, d]` buffer.
    #[derive(Clone, Copy)]
    struct Head {
        bb: usize,
        hh: usize,
        heads: usize,
        d: usize,
    }

    impl Head {
        #[inline(always)]
        fn at(self, len: usize, i: usize) -> usize {
            ((self.bb * len + i) * self.heads + self.hh) * self.d
        }
        #[inline(always)]
        fn row(self, t: &[f32], len: usize, i: usize) -> &[f32] {
            &t[self.at(len, i)..][..self.d]
        }
        /// Rows `from..` of this head, as a matrix view.
        fn rows(self, t: &[f32], len: usize, from: usize) -> Strided<'_> {
            Strided::rows(&t[self.at(len, from)..], self.heads * self.d)
        }
        /// The same rows transposed: one column per position.
        fn columns(self, t: &[f32], len: usize, from: usize) -> Strided<'_> {
            Strided::columns(&t[self.at(len, from)..], self.heads * self.d)
        }
        /// Writes a head's `[n, d]` rows back into the `[b, n, h, d]` buffer.
        fn scatter(self, t: &mut [f32], len: usize, rows: &[f32]) {
            for (i, row) in rows.chunks_exact(self.d).enumerate() {
                let at = self.at(len, i);
                t[at..at + self.d].copy_from_slice(row);
            }
        }
    }

    /// `[b, n, h, d]` values as a `[b, h, n, d]` tensor (a view with the middle axes swapped).
    fn head_major<B: Backend>(
        values: Vec<f32>,
        [b, h, n, d]: [usize; 4],
        device: &B::Device,
    ) -> Tensor<B, 4> {
        from_host::<B, 4>(values, [b, n, h, d], device).swap_dims(1, 2)
    }

    pub fn forward<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 3>) {
        let [b, heads, q_len, d] = q.dims();
        let kv_len = k.dims()[2];
        let device = q.device();
        let (q, k, v) = (seq_major(q), seq_major(k), seq_major(v));
        let (q, k, v): (&[f32], &[f32], &[f32]) = (&q, &k, &v);
        let scale = (d as f32).powf(-0.5);
        let start = kv_len - q_len;
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..b * heads)
            .into_par_iter()
            .map(|bh| {
                let head = Head {
                    bb: bh / heads,
                    hh: bh % heads,
                    heads,
                    d,
                };
                let mut out = vec![0.0f32; q_len * d];
                let mut lse = vec![0.0f32; q_len];
                let mut p = vec![0.0f32; QUERY_BLOCK * kv_len];
                for r0 in (0..q_len).step_by(QUERY_BLOCK) {
                    let rows = QUERY_BLOCK.min(q_len - r0);
                    let keys = start + r0 + rows;
                    let p = &mut p[..rows * keys];
                    matmul(
                        [rows, keys, d],
                        p,
                        keys,
                        false,
                        head.rows(q, q_len, r0),
                        head.columns(k, kv_len, 0),
                        scale,
                        false,
                    );
                    softmax_rows((&mut *p, keys, start + r0 + 1, &mut lse[r0..]));
                    matmul(
                        [rows, d, keys],
                        &mut out[r0 * d..],
                        d,
                        false,
                        Strided::rows(p, keys),
                        head.rows(v, kv_len, 0),
                        1.0,
                        false,
                    );
                }
                (out, lse)
            })
            .collect();
        let mut out = vec![0.0f32; b * q_len * heads * d];
        let mut lse = Vec::with_capacity(b * heads * q_len);
        for (bh, (rows, row_lse)) in per_head.into_iter().enumerate() {
            let head = Head {
                bb: bh / heads,
                hh: bh % heads,
                heads,
                d,
            };
            head.scatter(&mut out, q_len, &rows);
            lse.extend(row_lse);
        }
        (
            head_major(out, [b, heads, q_len, d], &device),
            from_host(lse, [b, heads, q_len], &device),
        )
    }

    pub fn backward<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        out: Tensor<B, 4>,
        lse: Tensor<B, 3>,
        grad_out: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, heads, q_len, d] = q.dims();
        let kv_len = k.dims()[2];
        let device = q.device();
        let (q, k, v) = (seq_major(q), seq_major(k), seq_major(v));
        let (out, dout, lse) = (seq_major(out), seq_major(grad_out), HostValues::of(lse));
        let (q, k, v): (&[f32], &[f32], &[f32]) = (&q, &k, &v);
        let (out, dout, lse): (&[f32], &[f32], &[f32]) = (&out, &dout, &lse);
        let scale = (d as f32).powf(-0.5);
        let start = kv_len - q_len;
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let per_head: Vec<Grads> = (0..b * heads)
            .into_par_iter()
            .map(|bh| {
                {
                    let head = Head {
                        bb: bh / heads,
                        hh: bh % heads,
                        heads,
                        d,
                    };
                    let lse = &lse[bh * q_len..][..q_len];
                    let mut dq = vec![0.0f32; q_len * d];
                    let mut dk = vec![0.0f32; kv_len * d];
                    let mut dv = vec![0.0f32; kv_len * d];
                    let mut p = vec![0.0f32; QUERY_BLOCK * kv_len];
                    let mut ds = vec![0.0f32; QUERY_BLOCK * kv_len];
                    for r0 in (0..q_len).step_by(QUERY_BLOCK) {
                        let rows = QUERY_BLOCK.min(q_len - r0);
                        let keys = start + r0 + rows;
                        let (p, ds) = (&mut p[..rows * keys], &mut ds[..rows * keys]);
                        let (q_rows, dout_rows) =
                            (head.rows(q, q_len, r0), head.rows(dout, q_len, r0));
                        // P, recomputed from the scores and the saved log-sum-exp.
                        matmul(
                            [rows, keys, d],
                            p,
                            keys,
                            false,
                            q_rows,
                            head.columns(k, kv_len, 0),
                            scale,
                            false,
                        );
                        probabilities_rows((&mut *p, keys, start + r0 + 1, &lse[r0..]));
                        // dV += Pᵀ dO
                        matmul(
                            [keys, d, rows],
                            &mut dv,
                            d,
                            true,
                            Strided::columns(p, keys),
                            dout_rows,
                            1.0,
                            false,
                        );
                        // dS = P ∘ (dO Vᵀ − D)·s
                        matmul(
                            [rows, keys, d],
                            ds,
                            keys,
                            false,
                            dout_rows,
                            head.columns(v, kv_len, 0),
                            1.0,
                            false,
                        );
                        let delta: Vec<f32> = (r0..r0 + rows)
                            .map(|i| dot(head.row(dout, q_len, i), head.row(out, q_len, i)))
                            .collect();
                        score_gradients((&mut *ds, &*p, &delta[..], scale));
                        // dQ = dS K,  dK += dSᵀ Q
                        matmul(
                            [rows, d, keys],
                            &mut dq[r0 * d..],
                            d,
                            false,
                            Strided::rows(ds, keys),
                            head.rows(k, kv_len, 0),
                            1.0,
                            false,
                        );
                        matmul(
                            [keys, d, rows],
                            &mut dk,
                            d,
                            true,
                            Strided::columns(ds, keys),
                            q_rows,
                            1.0,
                            false,
                        );
                    }
                    (dq, dk, dv)
                }
            })
            .collect();
        let mut dq = vec![0.0f32; b * q_len * heads * d];
        let mut dk = vec![0.0f32; b * kv_len * heads * d];
        let mut dv = vec![0.0f32; b * kv_len * heads * d];
        for (bh, (hq, hk, hv)) in per_head.into_iter().enumerate() {
            let head = Head {
                bb: bh / heads,
                hh: bh % heads,
                heads,
                d,
            };
            head.scatter(&mut dq, q_len, &hq);
            head.scatter(&mut dk, kv_len, &hk);
            head.scatter(&mut dv, kv_len, &hv);
        }
        (
            head_major(dq, [b, heads, q_len, d], &device),
            head_major(dk, [b, heads, kv_len, d], &device),
            head_major(dv, [b, heads, kv_len, d], &device),
        )
    }
}
