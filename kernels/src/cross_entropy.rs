//! Cross-entropy over the vocabulary, forward and backward, one kernel each with a cube per row
//! of logits `[rows, vocab]`. Composed of tensor ops the log-softmax, gather and their
//! backward ops are about ten passes over the logits (the largest activation of a small
//! model's step); here the forward pass reads them once (from cache after the first of three
//! strides) and the backward pass reads them once and writes their gradient:
//!
//! ```text
//! loss_n = lse_n − z_n[t_n]          dz_n = c_n · (exp(z_n − lse_n) − onehot(t_n))
//! ```
//!
//! The caller weighs the rows' losses (mean, or a mask) and passes each row's weight times the
//! loss's gradient as `c_n`. A target outside the vocabulary gives its row a NaN loss (the
//! kernel cannot raise an error; NaN reaches the reported loss). Targets are i32 (Burn's int
//! type on the GPU backends); arithmetic is f32 whatever the logits' type.

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::rows::cube_log_sum_exp;
use crate::{cubes, empty};

/// Units per cube, one cube per row. A power of two (the reductions halve it).
const UNITS: usize = 256;

#[cube(launch_unchecked)]
#[allow(clippy::eq_op)] // `x − x` and `0/0` make the NaN below on purpose
fn cross_entropy_kernel<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<i32>,
    losses: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    // The same for every unit of the cube, so the barriers inside are reached by all.
    if row < logits.shape(0) {
        let vocab = logits.shape(1);
        let (z_row, z_col) = (row * logits.stride(0), logits.stride(1));
        let mut shared = SharedMemory::<f32>::new(UNITS);
        let row_lse = cube_log_sum_exp(logits, z_row, z_col, vocab, 1.0f32, &mut shared);
        if UNIT_POS_X == 0 {
            let target = targets[row * targets.stride(0)];
            // NaN made at run time: WGSL has no NaN literal and rejects a constant 0/0.
            let zero = row_lse - row_lse;
            let mut loss = zero / zero;
            if target >= 0 && target < i32::cast_from(vocab) {
                loss = row_lse - f32::cast_from(logits[z_row + usize::cast_from(target) * z_col]);
            }
            losses[row * losses.stride(0)] = loss;
            lse[row * lse.stride(0)] = row_lse;
        }
    }
}

#[cube(launch_unchecked)]
fn cross_entropy_grad_kernel<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<i32>,
    lse: &Tensor<f32>,
    coefficients: &Tensor<f32>,
    grad_logits: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row < logits.shape(0) {
        let vocab = logits.shape(1);
        let (z_row, z_col) = (row * logits.stride(0), logits.stride(1));
        let (g_row, g_col) = (row * grad_logits.stride(0), grad_logits.stride(1));
        let row_lse = lse[row * lse.stride(0)];
        let coefficient = coefficients[row * coefficients.stride(0)];
        let target = targets[row * targets.stride(0)];
        let mut c = UNIT_POS_X as usize;
        while c < vocab {
            let mut p = (f32::cast_from(logits[z_row + c * z_col]) - row_lse).exp();
            if i32::cast_from(c) == target {
                p -= 1.0;
            }
            grad_logits[g_row + c * g_col] = F::cast_from(coefficient * p);
            c += UNITS;
        }
    }
}

/// `[rows, vocab]`, checked against the i32 targets and f32 row vectors.
fn check<R: CubeRuntime>(
    logits: &CubeTensor<R>,
    targets: &CubeTensor<R>,
    rows: &[&CubeTensor<R>],
) -> [usize; 2] {
    let dims = logits.shape().dims::<2>();
    assert!(
        targets.shape().dims::<1>() == [dims[0]] && targets.dtype == DType::I32,
        "cross-entropy: targets must be i32 [rows]"
    );
    for x in rows {
        assert!(
            x.shape().dims::<1>() == [dims[0]] && x.dtype == DType::F32,
            "cross-entropy: lse and coefficients must be f32 [rows]"
        );
    }
    dims
}

/// Each row's loss `lse − z[target]` and `lse` (f32 `[rows]` each), for i32 `targets`.
pub fn cross_entropy<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [rows, _] = check(&logits, &targets, &[]);
    let losses = empty(&logits, vec![rows], DType::F32);
    let lse = empty(&logits, vec![rows], DType::F32);
    let (count, dim) = cubes(&logits, rows, UNITS);
    let (client, dtype) = (logits.client.clone(), logits.dtype);
    // SAFETY: cubes past the last row do nothing; columns stay below `vocab`, and a target is
    // read only after it is checked to be one of them.
    unsafe {
        cross_entropy_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            losses.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    (losses, lse)
}

/// The logits' gradient (their type), row `n` scaled by `coefficients[n]`.
pub fn cross_entropy_grad<R: CubeRuntime>(
    logits: CubeTensor<R>,
    targets: CubeTensor<R>,
    lse: CubeTensor<R>,
    coefficients: CubeTensor<R>,
) -> CubeTensor<R> {
    let [rows, vocab] = check(&logits, &targets, &[&lse, &coefficients]);
    let grad = empty(&logits, vec![rows, vocab], logits.dtype);
    let (count, dim) = cubes(&logits, rows, UNITS);
    let (client, dtype) = (logits.client.clone(), logits.dtype);
    // SAFETY: cubes past the last row do nothing; columns stay below `vocab`.
    unsafe {
        cross_entropy_grad_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            logits.into_tensor_arg(),
            targets.into_tensor_arg(),
            lse.into_tensor_arg(),
            coefficients.into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    grad
}
