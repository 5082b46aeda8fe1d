//! The gradient of a token embedding: `dW[t_n] += dy_n` for every token row `n`, as f32.
//!
//! Burn's `select_assign` (the embedding's default backward) gives each of the `d` columns one
//! unit that walks all the rows in turn: 768 units for a GPT-2-small step, latency-bound at
//! 3.3 ms for 8 × 1024 tokens on an H100. Here a cube per token row adds its row with atomic
//! f32 adds (rows of one token may meet in any order, so the f32 sums may differ in their last
//! bits from run to run); [`supported`] says whether the device has them.

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::features::AtomicUsage;
use cubecl::ir::{ElemType, FloatKind, StorageType, Type};
use cubecl::prelude::*;

use crate::cubes;

/// Units per cube, one cube per token row.
const UNITS: usize = 256;

#[cube(launch_unchecked)]
fn embedding_grad_kernel<F: Float>(
    tokens: &Tensor<i32>,
    grad: &Tensor<F>,
    sums: &mut Tensor<Atomic<f32>>,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row < grad.shape(0) {
        let d = grad.shape(1);
        let token = tokens[row * tokens.stride(0)];
        let (g_row, g_col) = (row * grad.stride(0), grad.stride(1));
        let s_row = usize::cast_from(token) * sums.stride(0);
        let mut c = UNIT_POS_X as usize;
        // A token outside the vocabulary adds nothing (the lookup forward refused it already).
        if token < 0 || usize::cast_from(token) >= sums.shape(0) {
            c = d;
        }
        while c < d {
            sums[s_row + c * sums.stride(1)].fetch_add(f32::cast_from(grad[g_row + c * g_col]));
            c += UNITS;
        }
    }
}

/// Whether `like`'s device adds f32 atomically (CUDA does; wgpu where the adapter has
/// `SHADER_FLOAT32_ATOMIC`).
pub fn supported<R: CubeRuntime>(like: &CubeTensor<R>) -> bool {
    let atomic = Type::new(StorageType::Atomic(ElemType::Float(FloatKind::F32)));
    like.client
        .properties()
        .atomic_type_usage(atomic)
        .contains(AtomicUsage::Add)
}

/// `dW` (`[vocab, d]`, f32) of an embedding looked up at `tokens` (`[rows]`, i32, each below
/// `vocab`; others add nothing), from the rows' gradients `grad` (`[rows, d]`). Check [`supported`] first.
pub fn embedding_grad<R: CubeRuntime>(
    tokens: CubeTensor<R>,
    grad: CubeTensor<R>,
    vocab: usize,
) -> CubeTensor<R> {
    let [rows, d] = grad.shape().dims::<2>();
    assert_eq!(
        tokens.shape().dims::<1>(),
        [rows],
        "embedding grad: a token per row"
    );
    assert_eq!(tokens.dtype, DType::I32, "embedding grad: i32 tokens");
    let sums = burn_cubecl::ops::numeric::zeros_client(
        grad.client.clone(),
        grad.device.clone(),
        burn_backend::Shape::from(vec![vocab, d]),
        DType::F32,
    );
    let (count, dim) = cubes(&grad, rows, UNITS);
    let (client, dtype) = (grad.client.clone(), grad.dtype);
    // SAFETY: cubes past the last row and tokens outside the vocabulary do nothing.
    unsafe {
        embedding_grad_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            tokens.into_tensor_arg(),
            grad.into_tensor_arg(),
            sums.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    sums
}
