//! The causal softmax of attention scores and its gradient, one kernel each, for attention in
//! matrix form: the products `Q Kᵀ`, `P V` and those of the backward pass run as batched matrix
//! products (cuBLAS on CUDA) and these kernels do everything between them.
//!
//! Written as tensor ops, the softmax between the two products is eight launches over the n×n
//! scores (scale, mask, max, subtract, exp, sum, divide, log) and its gradient about as many;
//! each reads and writes the whole score matrix. Here each is one kernel: a cube per score
//! row, its units striding along the row in vectors of up to 16 bytes (consecutive units read
//! consecutive vectors).
//!
//! - [`causal_softmax`]: from the raw products `S = Q Kᵀ` (row `r` is the query at position
//!   `first + r`, which reads keys `0..=first + r`), the probabilities
//!   `P = exp(S·scale − lse)` (zero past the query's position) and each row's log-sum-exp `lse`.
//! - [`causal_softmax_grad`]: from `S` (recomputed), `lse` and `dP = dO Vᵀ`, the probabilities
//!   `P` again (for `dV = Pᵀ dO`) and the gradient of the raw products,
//!   `dS = P ∘ (dP − D)·scale` with `D = rowsum(P ∘ dP)` (which equals FlashAttention's
//!   `rowsum(dO ∘ O)`, as `O = P V`), so that `dQ = dS K` and `dK = dSᵀ Q`.
//!
//! Arithmetic is f32 whatever the tensors' type; `lse` is an f32 tensor.

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::rows::{LOWEST, RunningLogSumExp, cube_reduce, lane_sum};
use crate::{empty, vector_size};

/// Units per cube, one cube per score row. A power of two (the reductions halve it).
pub const UNITS: usize = 128;

/// Index of element 0 of row (`batch`, `head`, `row`) of `x`: `[batch, heads, rows, ..]`.
#[cube]
fn row_start<T: CubePrimitive>(x: &Tensor<T>) -> usize {
    CUBE_POS_Z as usize * x.stride(0)
        + CUBE_POS_Y as usize * x.stride(1)
        + CUBE_POS_X as usize * x.stride(2)
}

/// Vector `c` of a score row (`row` its first element's offset, `column` the offset between
/// consecutive vectors), scaled, in f32, with the lanes at or past `keys` (masked, causal) set
/// below every real score so that their exponentials vanish.
#[cube]
fn scaled_scores<F: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    row: usize,
    column: usize,
    c: usize,
    scale: f32,
    keys: usize,
) -> Vector<f32, N> {
    let width = scores.vector_size();
    let mut z = Vector::<f32, N>::cast_from(scores[(row + c * column) / width])
        * Vector::<f32, N>::new(scale);
    #[unroll]
    for k in 0..width {
        if c * width + k >= keys {
            z[k] = LOWEST;
        }
    }
    z
}

/// A cube per score row, each unit taking every `UNITS`-th vector of `N` scores. The row's
/// log-sum-exp in one pass ([`RunningLogSumExp`]), then
/// the probabilities in another. Offsets are in elements; with `N > 1` the key axis has unit
/// stride and the others multiples of `N`.
#[cube(launch_unchecked)]
fn softmax_kernel<F: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    probs: &mut Tensor<Vector<F, N>>,
    lse: &mut Tensor<f32>,
    scale: f32,
    first: u32,
    #[define(F)] _dtype: StorageType,
) {
    let width = scores.vector_size();
    let kv_len = scores.shape(3);
    let keys = min(first as usize + CUBE_POS_X as usize + 1, kv_len);
    let (s_row, s_col) = (row_start(scores), scores.stride(3) * width);
    let mut shared = SharedMemory::<f32>::new(UNITS);
    let mut running = RunningLogSumExp::new();
    let mut c = UNIT_POS_X as usize;
    while c * width < keys {
        running.add(scaled_scores(scores, s_row, s_col, c, scale, keys));
        c += UNITS;
    }
    let row_lse = running.cube_total(&mut shared);

    let (p_row, p_col) = (row_start(probs), probs.stride(3) * width);
    let lse_vector = Vector::<f32, N>::new(row_lse);
    let mut c = UNIT_POS_X as usize;
    while c < kv_len / width {
        // Vectors wholly past the query's position are zeros, written without reading them.
        let mut p = Vector::<f32, N>::new(0.0f32);
        if c * width < keys {
            p = (scaled_scores(scores, s_row, s_col, c, scale, keys) - lse_vector).exp();
        }
        probs[(p_row + c * p_col) / width] = Vector::<F, N>::cast_from(p);
        c += UNITS;
    }
    if UNIT_POS_X == 0 {
        lse[row_start(lse)] = row_lse;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn softmax_grad_kernel<F: Float, N: Size>(
    scores: &Tensor<Vector<F, N>>,
    grad_probs: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    probs: &mut Tensor<Vector<F, N>>,
    grad_scores: &mut Tensor<Vector<F, N>>,
    scale: f32,
    first: u32,
    #[define(F)] _dtype: StorageType,
) {
    let width = scores.vector_size();
    let kv_len = scores.shape(3);
    let keys = min(first as usize + CUBE_POS_X as usize + 1, kv_len);
    let (s_row, s_col) = (row_start(scores), scores.stride(3) * width);
    let (g_row, g_col) = (row_start(grad_probs), grad_probs.stride(3) * width);
    let lse_vector = Vector::<f32, N>::new(lse[row_start(lse)]);
    let mut shared = SharedMemory::<f32>::new(UNITS);

    let mut dot = 0.0f32;
    let mut c = UNIT_POS_X as usize;
    while c * width < keys {
        let p = (scaled_scores(scores, s_row, s_col, c, scale, keys) - lse_vector).exp();
        dot += lane_sum(p * Vector::<f32, N>::cast_from(grad_probs[(g_row + c * g_col) / width]));
        c += UNITS;
    }
    let delta = Vector::<f32, N>::new(cube_reduce(dot, &mut shared, false));

    let (p_row, p_col) = (row_start(probs), probs.stride(3) * width);
    let (d_row, d_col) = (row_start(grad_scores), grad_scores.stride(3) * width);
    let scale_vector = Vector::<f32, N>::new(scale);
    let mut c = UNIT_POS_X as usize;
    while c < kv_len / width {
        // Masked lanes: p = 0, so their dS is 0 too; vectors wholly past the query's position
        // are written as zeros without reading the scores or dP there (half the square, from
        // memory: the pass above read only the keys up to the query's position).
        let mut p = Vector::<f32, N>::new(0.0f32);
        let mut ds = Vector::<f32, N>::new(0.0f32);
        if c * width < keys {
            p = (scaled_scores(scores, s_row, s_col, c, scale, keys) - lse_vector).exp();
            let dp = Vector::<f32, N>::cast_from(grad_probs[(g_row + c * g_col) / width]);
            ds = p * (dp - delta) * scale_vector;
        }
        probs[(p_row + c * p_col) / width] = Vector::<F, N>::cast_from(p);
        grad_scores[(d_row + c * d_col) / width] = Vector::<F, N>::cast_from(ds);
        c += UNITS;
    }
}

/// `[batch, heads, rows, kv_len]`, checked to fit the launch grid (one cube per row).
fn score_dims<R: CubeRuntime>(scores: &CubeTensor<R>, first: usize) -> [usize; 4] {
    let dims = scores.shape().dims::<4>();
    let [batch, heads, rows, kv_len] = dims;
    assert!(
        rows > 0 && kv_len > 0 && first + rows <= kv_len,
        "causal softmax: rows at positions {first}..{} must lie within the {kv_len} keys",
        first + rows
    );
    // 65535 cubes per grid dimension is what every runtime allows (wgpu's limit).
    assert!(
        [batch, heads, rows].iter().all(|&n| n <= u16::MAX as usize) && kv_len <= u32::MAX as usize,
        "causal softmax: batch {batch}, heads {heads} and rows {rows} must each be at most 65535"
    );
    dims
}

fn grid(dims: [usize; 4]) -> CubeCount {
    let [batch, heads, rows, _] = dims;
    CubeCount::Static(rows as u32, heads as u32, batch as u32)
}

/// Probabilities (same type and shape as `scores`) and row log-sum-exp `[batch, heads, rows]`
/// (f32) of the causal softmax of `scores·scale`, `scores` being `[batch, heads, rows,
/// kv_len]` raw products whose row `r` is the query at position `first + r`.
pub fn causal_softmax<R: CubeRuntime>(
    scores: CubeTensor<R>,
    scale: f32,
    first: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let dims = score_dims(&scores, first);
    let probs = empty(&scores, dims.to_vec(), scores.dtype);
    let lse = empty(&scores, dims[..3].to_vec(), DType::F32);
    let width = vector_size(&[&scores, &probs]);
    let (client, dtype) = (scores.client.clone(), scores.dtype);
    // SAFETY: the grid has one cube per row of `scores`, and every column index is checked
    // against the row length, which `width` divides.
    unsafe {
        softmax_kernel::launch_unchecked::<R>(
            &client,
            grid(dims),
            CubeDim::new_1d(UNITS as u32),
            width,
            scores.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            scale,
            first as u32,
            dtype.into(),
        );
    }
    (probs, lse)
}

/// The probabilities again and the gradient of the raw `scores`, from the scores, the
/// forward pass's `lse` (f32) and the probabilities' gradient `grad_probs` (as `scores`).
pub fn causal_softmax_grad<R: CubeRuntime>(
    scores: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad_probs: CubeTensor<R>,
    scale: f32,
    first: usize,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let dims = score_dims(&scores, first);
    assert_eq!(
        grad_probs.shape().dims::<4>(),
        dims,
        "causal softmax: the probabilities' gradient must have the scores' shape"
    );
    assert_eq!(
        lse.shape().dims::<3>(),
        [dims[0], dims[1], dims[2]],
        "causal softmax: lse must be [batch, heads, rows]"
    );
    assert_eq!(lse.dtype, DType::F32, "causal softmax: lse must be f32");
    assert_eq!(
        grad_probs.dtype, scores.dtype,
        "causal softmax: the probabilities' gradient must have the scores' type"
    );
    let probs = empty(&scores, dims.to_vec(), scores.dtype);
    let grad_scores = empty(&scores, dims.to_vec(), scores.dtype);
    let width = vector_size(&[&scores, &grad_probs, &probs, &grad_scores]);
    let (client, dtype) = (scores.client.clone(), scores.dtype);
    // SAFETY: as in `causal_softmax`; `grad_probs` and `lse` were checked to match `scores`.
    unsafe {
        softmax_grad_kernel::launch_unchecked::<R>(
            &client,
            grid(dims),
            CubeDim::new_1d(UNITS as u32),
            width,
            scores.into_tensor_arg(),
            grad_probs.into_tensor_arg(),
            lse.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            grad_scores.clone().into_tensor_arg(),
            scale,
            first as u32,
            dtype.into(),
        );
    }
    (probs, grad_scores)
}
