//! The SwiGLU gate `silu(g) · u` (Shazeer, arXiv 2002.05202) forward and backward, one
//! element-wise kernel each (composed of tensor ops: three launches forward, about eight
//! backward). With `σ = 1 / (1 + e^(−g))`:
//!
//! ```text
//! out = g·σ·u
//! du = dout · g·σ          dg = dout · u · σ·(1 + g·(1 − σ))
//! ```
//!
//! Tensors are flat and contiguous (`[n]`); arithmetic is f32 whatever their type.

use burn_backend::{Shape, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::{cubes, empty};

const UNITS: usize = 256;

#[cube]
fn sigmoid(g: f32) -> f32 {
    (1.0f32 + (-g).exp()).recip()
}

#[cube(launch_unchecked)]
fn swiglu_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let g = f32::cast_from(gate[i]);
        out[i] = F::cast_from(g * sigmoid(g) * f32::cast_from(up[i]));
    }
}

#[cube(launch_unchecked)]
fn swiglu_grad_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    grad_out: &Tensor<F>,
    grad_gate: &mut Tensor<F>,
    grad_up: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < grad_up.len() {
        let (g, u, dout) = (
            f32::cast_from(gate[i]),
            f32::cast_from(up[i]),
            f32::cast_from(grad_out[i]),
        );
        let s = sigmoid(g);
        grad_up[i] = F::cast_from(dout * g * s);
        grad_gate[i] = F::cast_from(dout * u * s * (1.0f32 + g * (1.0f32 - s)));
    }
}

fn empty_like<R: CubeRuntime>(x: &CubeTensor<R>) -> CubeTensor<R> {
    empty(x, x.shape().to_vec(), x.dtype)
}

/// `[n]`, checked: every tensor flat, contiguous, of `gate`'s length and type.
fn flat_len<R: CubeRuntime>(gate: &CubeTensor<R>, others: &[&CubeTensor<R>]) -> usize {
    let n = gate.shape().num_elements();
    for x in [gate].into_iter().chain(others.iter().copied()) {
        assert!(
            x.shape() == Shape::new([n]) && x.meta.strides()[0] == 1 && x.dtype == gate.dtype,
            "swiglu: tensors must be flat, contiguous and alike ({:?} against {n})",
            x.shape()
        );
    }
    n
}

/// `silu(gate) · up`.
pub fn swiglu<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let n = flat_len(&gate, &[&up]);
    let out = empty_like(&gate);
    let (count, dim) = cubes(&gate, n.div_ceil(UNITS), UNITS);
    let (client, dtype) = (gate.client.clone(), gate.dtype);
    // SAFETY: every unit past the last element does nothing.
    unsafe {
        swiglu_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    out
}

/// The gradients of `gate` and `up` from the inputs and the output's gradient.
pub fn swiglu_grad<R: CubeRuntime>(
    gate: CubeTensor<R>,
    up: CubeTensor<R>,
    grad_out: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let n = flat_len(&gate, &[&up, &grad_out]);
    let (grad_gate, grad_up) = (empty_like(&gate), empty_like(&gate));
    let (count, dim) = cubes(&gate, n.div_ceil(UNITS), UNITS);
    let (client, dtype) = (gate.client.clone(), gate.dtype);
    // SAFETY: every unit past the last element does nothing.
    unsafe {
        swiglu_grad_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            grad_out.into_tensor_arg(),
            grad_gate.clone().into_tensor_arg(),
            grad_up.clone().into_tensor_arg(),
            dtype.into(),
        );
    }
    (grad_gate, grad_up)
}
