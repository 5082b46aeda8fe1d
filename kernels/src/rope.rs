//! Rotary embedding in the rotate-half layout, one element-wise kernel each way (composed of
//! tensor ops it is a product with the rotate-half matrix, two broadcast products and a sum,
//! and the backward of each). Pair `(j, j + half)` of each head turns by the angle whose cos
//! and sin the tables hold at `j` (and `j + half`); the backward pass turns by minus it:
//!
//! ```text
//! forward   out[j] = x[j]·c[j] − x[j+h]·s[j]        out[j+h] = x[j+h]·c[j+h] + x[j]·s[j+h]
//! backward  dx[j]  = g[j]·c[j] + g[j+h]·s[j+h]      dx[j+h]  = g[j+h]·c[j+h] − g[j]·s[j]
//! ```
//!
//! `x` is `[batch, seq, heads, head_dim]` (any strides), the tables `[batch or 1, seq, 1,
//! head_dim]` of `x`'s type; the output is a new tensor of `x`'s shape. Arithmetic is f32.

use burn_backend::TensorMetadata;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::{cubes, empty};

const UNITS: usize = 256;

#[cube(launch_unchecked)]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    back: u32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let (seq, heads, d) = (x.shape(1), x.shape(2), x.shape(3));
        let half = d / 2;
        let j = i % d;
        let head = (i / d) % heads;
        let t = (i / (d * heads)) % seq;
        let b = i / (d * heads * seq);
        let row = b * x.stride(0) + t * x.stride(1) + head * x.stride(2);
        let table_b = select(cos.shape(0) > 1, b, 0);
        let table = table_b * cos.stride(0) + t * cos.stride(1);
        let first = j < half;
        let partner = select(first, j + half, j - half);
        let (value, other) = (
            f32::cast_from(x[row + j * x.stride(3)]),
            f32::cast_from(x[row + partner * x.stride(3)]),
        );
        let c = f32::cast_from(cos[table + j * cos.stride(3)]);
        // Forward reads the sine at `j`, backward at the partner; the sign is minus on the
        // first half forward and on the second half backward.
        let sine_at = select(back == 1, partner, j);
        let s = f32::cast_from(sin[table + sine_at * sin.stride(3)]);
        let sign = select(first == (back == 1), 1.0f32, -1.0f32);
        let o = b * out.stride(0) + t * out.stride(1) + head * out.stride(2) + j * out.stride(3);
        out[o] = F::cast_from(value * c + sign * other * s);
    }
}

/// `x` turned by the tables' angles (`back`: by minus them, the backward pass).
pub fn rope<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    back: bool,
) -> CubeTensor<R> {
    let [b, seq, _, d] = x.shape().dims::<4>();
    for table in [&cos, &sin] {
        let [tb, ts, th, td] = table.shape().dims::<4>();
        assert!(
            (tb == 1 || tb == b) && ts == seq && th == 1 && td == d && table.dtype == x.dtype,
            "rope: tables must be [batch or 1, seq, 1, head_dim] of x's type"
        );
    }
    assert!(d % 2 == 0, "rope: head_dim {d} must be even");
    let out = empty(&x, x.shape().to_vec(), x.dtype);
    let (count, dim) = cubes(&x, x.shape().num_elements().div_ceil(UNITS), UNITS);
    let (client, dtype) = (x.client.clone(), x.dtype);
    // SAFETY: units past the last element do nothing; indices follow the checked shapes.
    unsafe {
        rope_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            u32::from(back),
            dtype.into(),
        );
    }
    out
}
