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

use crate::{cubes, empty, vector_size};

const UNITS: usize = 256;

/// A unit per pair of vectors: `N` consecutive `j` of a head's first half and the same `j +
/// half` of its second (a unit per element read each value twice and did the index arithmetic
/// twice; a unit per single pair read 2-byte values, far below the memory's bandwidth).
/// Offsets are in elements; with `N > 1` the last axis has unit stride and every other stride
/// is a multiple of `N`, so each offset over `N` is the vector's index.
#[cube(launch_unchecked)]
fn rope_kernel<F: Float, T: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    cos: &Tensor<Vector<T, N>>,
    sin: &Tensor<Vector<T, N>>,
    out: &mut Tensor<Vector<F, N>>,
    pair_vectors: usize,
    back: u32,
    #[define(F, T)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    if i < pair_vectors {
        let width = x.vector_size();
        let (seq, heads, d) = (x.shape(1), x.shape(2), x.shape(3));
        let half = d / 2;
        let per_head = half / width;
        let j = (i % per_head) * width;
        let row_index = i / per_head;
        let head = row_index % heads;
        let t = (row_index / heads) % seq;
        let b = row_index / (heads * seq);
        let row = b * x.stride(0) + t * x.stride(1) + head * x.stride(2);
        let table_b = select(cos.shape(0) > 1, b, 0);
        let table = table_b * cos.stride(0) + t * cos.stride(1);
        let (x1, x2) = (
            Vector::<f32, N>::cast_from(x[(row + j * x.stride(3)) / width]),
            Vector::<f32, N>::cast_from(x[(row + (j + half) * x.stride(3)) / width]),
        );
        let (c1, c2) = (
            Vector::<f32, N>::cast_from(cos[(table + j * cos.stride(3)) / width]),
            Vector::<f32, N>::cast_from(cos[(table + (j + half) * cos.stride(3)) / width]),
        );
        let table_s = table_b * sin.stride(0) + t * sin.stride(1);
        let (s1, s2) = (
            Vector::<f32, N>::cast_from(sin[(table_s + j * sin.stride(3)) / width]),
            Vector::<f32, N>::cast_from(sin[(table_s + (j + half) * sin.stride(3)) / width]),
        );
        let o = b * out.stride(0) + t * out.stride(1) + head * out.stride(2);
        let first = (o + j * out.stride(3)) / width;
        let second = (o + (j + half) * out.stride(3)) / width;
        if back == 1 {
            out[first] = Vector::<F, N>::cast_from(x1 * c1 + x2 * s2);
            out[second] = Vector::<F, N>::cast_from(x2 * c2 - x1 * s1);
        } else {
            out[first] = Vector::<F, N>::cast_from(x1 * c1 - x2 * s1);
            out[second] = Vector::<F, N>::cast_from(x2 * c2 + x1 * s2);
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
    // A vector must also divide the half head, so that it never straddles the two halves.
    let mut width = vector_size(&[&x, &cos, &sin, &out]);
    while (d / 2) % width != 0 {
        width /= 2;
    }
    let pair_vectors = x.shape().num_elements() / 2 / width;
    let (count, dim) = cubes(&x, pair_vectors.div_ceil(UNITS), UNITS);
    let (client, dtypes) = (x.client.clone(), [x.dtype.into(), cos.dtype.into()]);
    // SAFETY: units past the last pair of vectors do nothing; indices follow the checked
    // shapes, and `width` divides the half head and every stride it is read along.
    unsafe {
        rope_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            pair_vectors,
            u32::from(back),
            dtypes,
        );
    }
    out
}
