//! RMSNorm (Zhang & Sennrich, arXiv 1910.07467) forward and backward, one kernel each, a cube
//! per row of `[rows, d]`; and the shared-memory reductions that row kernels use.
//!
//! Composed of tensor ops, RMSNorm is six launches forward (square, mean, add, root, divide,
//! scale) and about twice as many backward, each a pass over the activations. With
//! `r = 1/√(mean(x²) + ε)` per row and `g = dy ∘ γ`:
//!
//! ```text
//! y = x·r·γ
//! dx = r·g − x·r³·(g·x)/d      dγ = Σ_rows dy ∘ x·r
//! ```
//!
//! The backward kernel writes `dy ∘ x·r` per row as f32 and [`column_sums`] adds the rows up
//! (a reduction over rows is not a row kernel). Arithmetic is f32 whatever the tensors' type.
//! `y` (and so `dy`) may have another type than `x` and `γ`: under mixed precision the norm
//! reads the f32 residual stream and writes the bf16 input of the next product, which saves a
//! cast each way.

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::{cubes, empty, vector_size};

/// Units per cube, one cube per row. A power of two (the reductions halve it).
pub const UNITS: usize = 256;

/// The maximum (`take_max`) or the sum of every unit's `value`, returned to all of them. Every
/// unit of the cube must call it (it synchronises the cube); the cube's size must be a power of
/// two.
#[cube]
pub fn cube_reduce(value: f32, shared: &mut SharedMemory<f32>, #[comptime] take_max: bool) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    // The cube's size read at run time: a value from a constant is a compile-time one, which
    // the loop could not halve.
    let mut width = CUBE_DIM_X as usize / 2;
    while width > 0 {
        if unit < width {
            if take_max {
                shared[unit] = max(shared[unit], shared[unit + width]);
            } else {
                shared[unit] += shared[unit + width];
            }
        }
        sync_cube();
        width /= 2;
    }
    let total = shared[0];
    // Every unit has read the total before the memory is used again.
    sync_cube();
    total
}

/// Below every real value a row's maximum is taken of, so a running maximum starts there
/// (finite: WGSL has no infinity literal).
pub(crate) const LOWEST: f32 = -1.0e30;

/// A unit's share of a row's log-sum-exp, read in one pass: the largest value it has seen and
/// the sum of `e^(z − max)` over its values (rescaled whenever the maximum rises).
#[derive(CubeType)]
pub struct RunningLogSumExp {
    max: f32,
    sum: f32,
}

#[cube]
impl RunningLogSumExp {
    #[allow(clippy::new_without_default)] // `new` expands inside kernels; `Default` would not
    pub fn new() -> RunningLogSumExp {
        RunningLogSumExp {
            max: f32::new(LOWEST),
            sum: 0.0f32,
        }
    }

    /// Takes in the lanes of `z`. Lanes at `LOWEST` (masked) add nothing once a real value
    /// has been seen, in `z` or before; a vector of masked lanes only would each add 1.
    pub fn add<N: Size>(&mut self, z: Vector<f32, N>) {
        let mut vector_max = f32::new(LOWEST);
        #[unroll]
        for k in 0..z.vector_size() {
            vector_max = max(vector_max, z[k]);
        }
        let new_max = max(self.max, vector_max);
        let exps = (z - Vector::<f32, N>::new(new_max)).exp();
        self.sum = self.sum * (self.max - new_max).exp() + lane_sum(exps);
        self.max = new_max;
    }

    /// `ln Σ e^z` over every unit's values, returned to all of them (every unit must call it,
    /// as [`cube_reduce`]).
    pub fn cube_total(&self, shared: &mut SharedMemory<f32>) -> f32 {
        let row_max = cube_reduce(self.max, shared, true);
        row_max + cube_reduce(self.sum * (self.max - row_max).exp(), shared, false).ln()
    }
}

/// The sum of a vector's lanes.
#[cube]
pub(crate) fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for k in 0..v.vector_size() {
        sum += v[k];
    }
    sum
}

/// A cube per row, each unit taking every `UNITS`-th vector of `N` columns. Offsets are in
/// elements; with `N > 1` columns have unit stride and rows a multiple of `N`, so an offset
/// over `N` is the vector's index.
#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float, Y: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    y: &mut Tensor<Vector<Y, N>>,
    inv_rms: &mut Tensor<f32>,
    epsilon: f32,
    #[define(F, Y)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    // The same for every unit of the cube, so the barriers inside are reached by all.
    if row < x.shape(0) {
        let width = x.vector_size();
        let d = x.shape(1);
        let (x_row, x_col) = (row * x.stride(0), x.stride(1) * width);
        let mut shared = SharedMemory::<f32>::new(UNITS);
        let mut squares = 0.0f32;
        let mut c = UNIT_POS_X as usize;
        while c < d / width {
            let value = Vector::<f32, N>::cast_from(x[(x_row + c * x_col) / width]);
            squares += lane_sum(value * value);
            c += UNITS;
        }
        let r = (cube_reduce(squares, &mut shared, false) / d as f32 + epsilon)
            .sqrt()
            .recip();
        let (y_row, y_col) = (row * y.stride(0), y.stride(1) * width);
        let g_col = gamma.stride(0) * width;
        let mut c = UNIT_POS_X as usize;
        while c < d / width {
            let value = Vector::<f32, N>::cast_from(x[(x_row + c * x_col) / width])
                * Vector::<f32, N>::new(r);
            let g = Vector::<f32, N>::cast_from(gamma[c * g_col / width]);
            y[(y_row + c * y_col) / width] = Vector::<Y, N>::cast_from(value * g);
            c += UNITS;
        }
        if UNIT_POS_X == 0 {
            inv_rms[row * inv_rms.stride(0)] = r;
        }
    }
}

#[cube(launch_unchecked)]
fn rms_norm_grad_kernel<F: Float, Y: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    inv_rms: &Tensor<f32>,
    grad_y: &Tensor<Vector<Y, N>>,
    grad_x: &mut Tensor<Vector<F, N>>,
    grad_gamma_rows: &mut Tensor<Vector<f32, N>>,
    #[define(F, Y)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row < x.shape(0) {
        let width = x.vector_size();
        let d = x.shape(1);
        let (x_row, x_col) = (row * x.stride(0), x.stride(1) * width);
        let (g_row, g_col) = (row * grad_y.stride(0), grad_y.stride(1) * width);
        let gamma_col = gamma.stride(0) * width;
        let r = inv_rms[row * inv_rms.stride(0)];
        let mut shared = SharedMemory::<f32>::new(UNITS);
        let mut gx = 0.0f32;
        let mut c = UNIT_POS_X as usize;
        while c < d / width {
            let g = Vector::<f32, N>::cast_from(grad_y[(g_row + c * g_col) / width])
                * Vector::<f32, N>::cast_from(gamma[c * gamma_col / width]);
            gx += lane_sum(g * Vector::<f32, N>::cast_from(x[(x_row + c * x_col) / width]));
            c += UNITS;
        }
        let coefficient = r * r * r * cube_reduce(gx, &mut shared, false) / d as f32;
        let (r, coefficient) = (Vector::<f32, N>::new(r), Vector::<f32, N>::new(coefficient));
        let (dx_row, dx_col) = (row * grad_x.stride(0), grad_x.stride(1) * width);
        let (dg_row, dg_col) = (
            row * grad_gamma_rows.stride(0),
            grad_gamma_rows.stride(1) * width,
        );
        let mut c = UNIT_POS_X as usize;
        while c < d / width {
            let dy = Vector::<f32, N>::cast_from(grad_y[(g_row + c * g_col) / width]);
            let value = Vector::<f32, N>::cast_from(x[(x_row + c * x_col) / width]);
            let g = dy * Vector::<f32, N>::cast_from(gamma[c * gamma_col / width]);
            grad_x[(dx_row + c * dx_col) / width] =
                Vector::<F, N>::cast_from(r * g - value * coefficient);
            grad_gamma_rows[(dg_row + c * dg_col) / width] = dy * value * r;
            c += UNITS;
        }
    }
}

/// Rows summed per launch of [`column_sums_kernel`] in its first pass.
const ROWS_PER_CUBE: usize = 64;

/// Each unit sums one column over `rows_per_cube` rows of `input` (consecutive units read
/// consecutive columns: coalesced) and writes the sum to its row block's row of `output`.
#[cube(launch_unchecked)]
fn column_sums_kernel(input: &Tensor<f32>, output: &mut Tensor<f32>, rows_per_cube: u32) {
    let column = CUBE_POS_X as usize * UNITS + UNIT_POS_X as usize;
    let block = CUBE_POS_Y as usize;
    let (rows, d) = (input.shape(0), input.shape(1));
    if column < d {
        let first = block * rows_per_cube as usize;
        let last = min(first + rows_per_cube as usize, rows);
        let mut sum = 0.0f32;
        let mut row = first;
        while row < last {
            sum += input[row * input.stride(0) + column * input.stride(1)];
            row += 1;
        }
        output[block * output.stride(0) + column * output.stride(1)] = sum;
    }
}

/// The column sums (`[d]`, f32) of `x: [rows, d]` (f32), in two passes: blocks of
/// `ROWS_PER_CUBE` rows, then their partial sums. (Burn's `sum_dim(0)` over the rows of a
/// `[8192, 768]` tensor took 1 ms on an H100, 40 times what reading it costs.)
pub fn column_sums<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let [rows, d] = x.shape().dims::<2>();
    assert_eq!(x.dtype, DType::F32, "column sums: f32 input");
    let mut partial = x;
    let mut remaining = rows;
    loop {
        // Row blocks along the grid's second axis (at most 65 535 cubes there).
        let per_cube = ROWS_PER_CUBE.max(remaining.div_ceil(65_535));
        let blocks = remaining.div_ceil(per_cube).max(1);
        let sums = empty(&partial, vec![blocks, d], DType::F32);
        let count = CubeCount::Static(d.div_ceil(UNITS) as u32, blocks as u32, 1);
        // SAFETY: units past the last column do nothing; rows stop at the input's last row.
        unsafe {
            column_sums_kernel::launch_unchecked::<R>(
                &partial.client.clone(),
                count,
                CubeDim::new_1d(UNITS as u32),
                partial.into_tensor_arg(),
                sums.clone().into_tensor_arg(),
                per_cube as u32,
            );
        }
        partial = sums;
        remaining = blocks;
        if remaining == 1 {
            break;
        }
    }
    burn_cubecl::ops::reshape(partial, burn_backend::Shape::from(vec![d]))
}

/// `[rows, d]` of `x`, checked against `gamma` (`[d]`, same type).
fn norm_dims<R: CubeRuntime>(x: &CubeTensor<R>, gamma: &CubeTensor<R>) -> [usize; 2] {
    let dims = x.shape().dims::<2>();
    assert_eq!(
        gamma.shape().dims::<1>(),
        [dims[1]],
        "rms norm: gamma must have one entry per column of x"
    );
    assert_eq!(gamma.dtype, x.dtype, "rms norm: gamma must have x's type");
    dims
}

/// `y` (`[rows, d]` of type `y_dtype`) and each row's `r = 1/√(mean(x²) + ε)` (`[rows]`,
/// f32) for `x: [rows, d]`.
pub fn rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    epsilon: f32,
    y_dtype: DType,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [rows, d] = norm_dims(&x, &gamma);
    let y = empty(&x, vec![rows, d], y_dtype);
    let inv_rms = empty(&x, vec![rows], DType::F32);
    let (count, dim) = cubes(&x, rows, UNITS);
    let width = vector_size(&[&x, &gamma, &y]);
    let (client, dtypes) = (x.client.clone(), [x.dtype.into(), y_dtype.into()]);
    // SAFETY: cubes past the last row do nothing, and every column index is below `d`;
    // `width` divides `d` and the row strides.
    unsafe {
        rms_norm_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            y.clone().into_tensor_arg(),
            inv_rms.clone().into_tensor_arg(),
            epsilon,
            dtypes,
        );
    }
    (y, inv_rms)
}

/// `dx` (as `x`) and `dγ` (`[d]`, f32), from the forward pass's inputs and `r`, and `dy`
/// (of `y`'s type).
pub fn rms_norm_grad<R: CubeRuntime>(
    x: CubeTensor<R>,
    gamma: CubeTensor<R>,
    inv_rms: CubeTensor<R>,
    grad_y: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [rows, d] = norm_dims(&x, &gamma);
    assert_eq!(
        grad_y.shape().dims::<2>(),
        [rows, d],
        "rms norm: dy must match x"
    );
    assert_eq!(
        inv_rms.shape().dims::<1>(),
        [rows],
        "rms norm: one r per row"
    );
    assert_eq!(inv_rms.dtype, DType::F32, "rms norm: r must be f32");
    let grad_x = empty(&x, vec![rows, d], x.dtype);
    let grad_gamma_rows = empty(&x, vec![rows, d], DType::F32);
    let (count, dim) = cubes(&x, rows, UNITS);
    let width = vector_size(&[&x, &gamma, &grad_y, &grad_x, &grad_gamma_rows]);
    let (client, dtypes) = (x.client.clone(), [x.dtype.into(), grad_y.dtype.into()]);
    // SAFETY: as in `rms_norm`; `grad_y` and `inv_rms` were checked to match `x`.
    unsafe {
        rms_norm_grad_kernel::launch_unchecked::<R>(
            &client,
            count,
            dim,
            width,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            inv_rms.into_tensor_arg(),
            grad_y.into_tensor_arg(),
            grad_x.clone().into_tensor_arg(),
            grad_gamma_rows.clone().into_tensor_arg(),
            dtypes,
        );
    }
    (grad_x, column_sums(grad_gamma_rows))
}
