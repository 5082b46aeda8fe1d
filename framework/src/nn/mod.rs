//! Small reusable modules the models are built from.

pub mod attention;
pub mod attnres;
pub mod coord3d;
pub mod fused;
pub mod lora;
pub mod rope;
pub mod seq_block;

use burn::prelude::*;
use burn::tensor::DType;

/// `x` in `dtype`; a no-op (no copy and no autodiff node) when it already is. Mixed precision
/// (`train.mixed_precision`) moves activations between the parameters' type and the compute
/// type with it, and every module casts a parameter to its input's type where it meets it.
pub fn cast_to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}
