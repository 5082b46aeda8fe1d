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
//! head_dim]` of any float type (f32 tables turn bf16 activations under mixed precision, as
//! autocast's promotion to f32 does); the output is a new tensor of `x`'s shape and type.
//! Arithmetic is f32.

use burn_backend::TensorMetadata;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::{cubes, empty};

const UNITS: usize = 256;

/// A unit per pair `(j, j + half)`: it reads both values once and writes both outputs (a unit
/// per element read each value twice and did the index arithmetic twice).
#[cube(launch_unchecked)]
fn rope_kernel<F: Float, T: Float>(
    x: &Tensor<F>,
    cos: &Tensor<T>,
    sin: &Tensor<T>,
    out: &mut Tensor<F>,
    back: u32,
    #[define(F, T)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    if i < out.len() / 2 {
        let (seq, heads, d) = (x.shape(1), x.shape(2), x.shape(3));
        let half = d / 2;
        let j = i % half;
        let row_index = i / half;
        let head = row_index % heads;
        let t = (row_index / heads) % seq;
        let b = row_index / (heads * seq);
        let row = b * x.stride(0) + t * x.stride(1) + head * x.stride(2);
        let table_b = select(cos.shape(0) > 1, b, 0);
        let table = table_b * cos.stride(0) + t * cos.stride(1);
        let (x1, x2) = (
            f32::cast_from(x[row + j * x.stride(3)]),
            f32::cast_from(x[row + (j + half) * x.stride(3)]),
        );
        let (c1, c2) = (
            f32::cast_from(cos[table + j * cos.stride(3)]),
            f32::cast_from(cos[table + (j + half) * cos.stride(3)]),
        );
        let (s1, s2) = (
            f32::cast_from(sin[table + j * sin.stride(3)]),
            f32::cast_from(sin[table + (j + half) * sin.stride(3)]),
        );
        let o = b * out.stride(0) + t * out.stride(1) + head * out.stride(2);
        let (first, second) = (o + j * out.stride(3), o + (j + half) * out.stride(3));
        if back == 1 {
            out[first] = F::cast_from(x1 * c1 + x2 * s2);
            out[second] = F::cast_from(x2 * c2 - x1 * s1);
        } else {
            out[first] = F::cast_from(x1 * c1 - x2 * s1);
            out[second] = F::cast_from(x2 * c2 + x1 * s2);
        }
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
            (tb == 1 || tb == b) && ts == seq && th == 1 && td == d,
            "rope: tables must be [batch or 1, seq, 1, head_dim]"
        );
    }
    assert_eq!(cos.dtype, sin.dtype, "rope: cos and sin tables of one type");
    assert!(d % 2 == 0, "rope: head_dim {d} must be even");
    let out = empty(&x, x.shape().to_vec(), x.dtype);
    let (count, dim) = cubes(&x, (x.shape().num_elements() / 2).div_ceil(UNITS), UNITS);
    let (client, dtypes) = (x.client.clone(), [x.dtype.into(), cos.dtype.into()]);
    // SAFETY: units past the last pair do nothing; indices follow the checked shapes.
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
            dtypes,
        );
    }
    out
}
