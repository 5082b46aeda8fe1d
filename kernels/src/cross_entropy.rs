//! Cross-entropy over the vocabulary, forward and backward, one kernel each with a cube per row
//! of logits `[rows, vocab]`. Composed of tensor ops the log-softmax, gather and their
//! backward ops are about ten passes over the logits (the largest activation of a small
//! model's step); here the forward pass reads them once (a running maximum and sum per unit,
//! in vectors of up to 16 bytes) and the backward pass reads them once and writes their
//! gradient:
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

use crate::rows::RunningLogSumExp;
use crate::{cubes, empty, vector_size};

/// Units per cube, one cube per row. A power of two (the reductions halve it).
const UNITS: usize = 256;

/// The element of `v` in lane `lane` (a run-time lane: compared against each, since a vector's
/// lanes are indexed at compile time).
#[cube]
fn lane<N: Size>(v: Vector<f32, N>, lane: usize) -> f32 {
    let mut value = 0.0f32;
    #[unroll]
    for k in 0..v.vector_size() {
        if k == lane {
            value = v[k];
        }
    }
    value
}

/// A cube per row of logits, each unit taking every `UNITS`-th vector of `N` logits; the row's
/// log-sum-exp in one pass over it ([`RunningLogSumExp`]). Offsets are in elements; with
/// `N > 1` the vocabulary axis has unit stride and rows a multiple of `N`.
#[cube(launch_unchecked)]
#[allow(clippy::eq_op)] // `x − x` and `0/0` make the NaN below on purpose
fn cross_entropy_kernel<F: Float, N: Size>(
    logits: &Tensor<Vector<F, N>>,
    targets: &Tensor<i32>,
    losses: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    // The same for every unit of the cube, so the barriers inside are reached by all.
    if row < logits.shape(0) {
        let width = logits.vector_size();
        let vocab = logits.shape(1);
        let (z_row, z_col) = (row * logits.stride(0), logits.stride(1) * width);
        let mut shared = SharedMemory::<f32>::new(UNITS);
        let mut running = RunningLogSumExp::new();
        let mut c = UNIT_POS_X as usize;
        while c < vocab / width {
            running.add(Vector::<f32, N>::cast_from(
                logits[(z_row + c * z_col) / width],
            ));
            c += UNITS;
        }
        let row_lse = running.cube_total(&mut shared);
        if UNIT_POS_X == 0 {
            let target = targets[row * targets.stride(0)];
            // NaN made at run time: WGSL has no NaN literal and rejects a constant 0/0.
            let zero = row_lse - row_lse;
            let mut loss = zero / zero;
            if target >= 0 && target < i32::cast_from(vocab) {
                let t = usize::cast_from(target);
                let z = Vector::<f32, N>::cast_from(logits[(z_row + (t / width) * z_col) / width]);
                loss = row_lse - lane(z, t % width);
            }
            losses[row * losses.stride(0)] = loss;
            lse[row * lse.stride(0)] = row_lse;
        }
    }
}

#[cube(launch_unchecked)]
fn cross_entropy_grad_kernel<F: Float, N: Size>(
    logits: &Tensor<Vector<F, N>>,
    targets: &Tensor<i32>,
    lse: &Tensor<f32>,
    coefficients: &Tensor<f32>,
    grad_logits: &mut Tensor<Vector<F, N>>,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row < logits.shape(0) {
        let width = logits.vector_size();
        let vocab = logits.shape(1);
        let (z_row, z_col) = (row * logits.stride(0), logits.stride(1) * width);
        let (g_row, g_col) = (row * grad_logits.stride(0), grad_logits.stride(1) * width);
        let row_lse = Vector::<f32, N>::new(lse[row * lse.stride(0)]);
        let coefficient = Vector::<f32, N>::new(coefficients[row * coefficients.stride(0)]);
        let target = targets[row * targets.stride(0)];
        let mut c = UNIT_POS_X as usize;
        while c < vocab / width {
            let z = Vector::<f32, N>::cast_from(logits[(z_row + c * z_col) / width]);
            let mut p = (z - row_lse).exp();
            #[unroll]
            for k in 0..width {
                if i32::cast_from(c * width + k) == target {
                    p[k] -= 1.0;
                }
            }
            grad_logits[(g_row + c * g_col) / width] = Vector::<F, N>::cast_from(coefficient * p);
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
    let width = vector_size(&[&logits]);
    let (client, dtype) = (logits.client.clone(), logits.dtype);
    // SAFETY: cubes past the last row do nothing; columns stay below `vocab`, and a target is
    // read only after it is checked to be one of them; `width` divides `vocab` and the rows.
    unsafe {
        cross_entropy_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
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
    let width = vector_size(&[&logits, &grad]);
    let (client, dtype) = (logits.client.clone(), logits.dtype);
    // SAFETY: cubes past the last row do nothing; columns stay below `vocab`, which `width`
    // divides (as it does the rows).
    unsafe {
        cross_entropy_grad_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
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
