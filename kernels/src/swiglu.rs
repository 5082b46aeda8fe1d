//! The SwiGLU gate `silu(g) · u` (Shazeer, arXiv 2002.05202) forward and backward, one
//! element-wise kernel each (composed of tensor ops: three launches forward, about eight
//! backward). With `σ = 1 / (1 + e^(−g))`:
//!
//! ```text
//! out = g·σ·u
//! du = dout · g·σ          dg = dout · u · σ·(1 + g·(1 − σ))
//! ```
//!
//! Tensors are flat and contiguous (`[n]`), read and written in vectors of up to 16 bytes;
//! arithmetic is f32 whatever their type.

use burn_backend::{Shape, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::{cubes, empty, vector_size};

const UNITS: usize = 256;

#[cube]
fn sigmoid<N: Size>(g: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(1.0f32);
    // `e^(0 − g)`: CubeCL's CUDA code has no unary minus for vector types.
    one / (one + (Vector::<f32, N>::new(0.0f32) - g).exp())
}

/// A unit per vector of `N` elements (`vectors` of them).
#[cube(launch_unchecked)]
fn swiglu_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < vectors {
        let g = Vector::<f32, N>::cast_from(gate[i]);
        let u = Vector::<f32, N>::cast_from(up[i]);
        out[i] = Vector::<F, N>::cast_from(g * sigmoid(g) * u);
    }
}

#[cube(launch_unchecked)]
fn swiglu_grad_kernel<F: Float, N: Size>(
    gate: &Tensor<Vector<F, N>>,
    up: &Tensor<Vector<F, N>>,
    grad_out: &Tensor<Vector<F, N>>,
    grad_gate: &mut Tensor<Vector<F, N>>,
    grad_up: &mut Tensor<Vector<F, N>>,
    vectors: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < vectors {
        let (g, u, dout) = (
            Vector::<f32, N>::cast_from(gate[i]),
            Vector::<f32, N>::cast_from(up[i]),
            Vector::<f32, N>::cast_from(grad_out[i]),
        );
        let one = Vector::<f32, N>::new(1.0f32);
        let s = sigmoid(g);
        grad_up[i] = Vector::<F, N>::cast_from(dout * g * s);
        grad_gate[i] = Vector::<F, N>::cast_from(dout * u * s * (one + g * (one - s)));
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
    let width = vector_size(&[&gate, &up, &out]);
    let vectors = n / width;
    let (count, dim) = cubes(&gate, vectors.div_ceil(UNITS), UNITS);
    let (client, dtype) = (gate.client.clone(), gate.dtype);
    // SAFETY: every unit past the last vector does nothing; `width` divides `n`.
    unsafe {
        swiglu_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            vectors,
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
    let width = vector_size(&[&gate, &up, &grad_out, &grad_gate, &grad_up]);
    let vectors = n / width;
    let (count, dim) = cubes(&gate, vectors.div_ceil(UNITS), UNITS);
    let (client, dtype) = (gate.client.clone(), gate.dtype);
    // SAFETY: every unit past the last vector does nothing; `width` divides `n`.
    unsafe {
        swiglu_grad_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            grad_out.into_tensor_arg(),
            grad_gate.clone().into_tensor_arg(),
            grad_up.clone().into_tensor_arg(),
            vectors,
            dtype.into(),
        );
    }
    (grad_gate, grad_up)
}
