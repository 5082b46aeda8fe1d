//! Causal flash attention on the tensor cores (CUDA, f16 and bf16), forward and backward, for
//! `[batch, heads, len, head_dim]` queries, keys and values of one length with as many key heads
//! as query heads, the length a multiple of [`BLOCK`] and a head size of 32 or 64.
//!
//! The same algorithm as [`crate::attention`] (FlashAttention-2, arXiv 2307.08691: the output
//! and each row's log-sum-exp forward; a dQ pass and a dK/dV pass backward, no n×n tensor in
//! memory), but every product of a tile runs as 16×16×16 matrix multiply-accumulates on the
//! tensor cores (CubeCL's `cmma`, WMMA on CUDA) with f32 accumulators, where that module's
//! kernels give each unit one row and multiply in scalar f32. A cube is four planes (warps) of
//! 32 units and takes [`BLOCK`] rows: each plane owns 16 of them. Per tile of keys (forward):
//!
//! 1. the cube copies the tile's keys and values into shared memory;
//! 2. each plane multiplies its queries (kept in fragments) by the keys, `S = Q Kᵀ`, and stores
//!    the 16 × [`BLOCK`] scores in shared memory;
//! 3. its units take the scores a column each (two of the 64), row by row: mask, the row's
//!    running maximum and sum (online softmax; the row's maximum and sum of the tile are plane
//!    reductions), and the probabilities `P` in the inputs' type;
//! 4. the plane multiplies `P V` into fresh accumulators, stores them, and its units add them
//!    to the output they keep in registers (of each row the columns `lane + 32·g`), rescaled
//!    by the change of the row maximum.
//!
//! Shared-memory rows are padded by 16 bytes, so that fragments and units reading down a
//! column spread over the memory banks.
//!
//! The output accumulates in units' registers because a WMMA fragment's element-to-row map is
//! unspecified, so a fragment cannot be rescaled per row. Backward needs no rescaling (the
//! probabilities are exact from the saved log-sum-exp), so dQ, dK and dV accumulate in
//! fragments. Probabilities and score gradients are rounded to the inputs' type before their
//! products, as in FlashAttention's half-precision kernels; sums and the softmax are f32.

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cmma::{self, Matrix, MatrixIdent, MatrixLayout};
use cubecl::prelude::*;

use crate::{empty, vector_size};

/// Queries per cube and keys per tile (backward: keys per cube and queries per tile).
pub const BLOCK: usize = 64;

/// The largest head size: a plane's 16 output rows are staged through its 16 × [`BLOCK`]
/// score buffer, and each unit keeps `16 · head_dim / 32` output values in registers.
pub const MAX_HEAD_DIM: usize = BLOCK;

/// Rows per plane, and the fragments' side (m = n = k = 16).
const FRAG: usize = 16;

/// Planes per cube; units per plane (CUDA's warp).
const PLANES: usize = BLOCK / FRAG;
const LANES: usize = 32;
const UNITS: usize = PLANES * LANES;

/// A masked score, far below any real one so that its exponential is 0.
const MASKED: f32 = -1.0e30;

/// Whether the kernels take these inputs: the CUDA runtime, f16 or bf16, one length for
/// queries and keys that is a multiple of [`BLOCK`], as many key heads as query heads, and a
/// head size of 32 or 64 (a multiple of the plane's 32 units, at most [`MAX_HEAD_DIM`]).
pub fn applies<R: CubeRuntime>(q: [usize; 4], k: [usize; 4], dtype: DType) -> bool {
    let [_, heads, q_len, head_dim] = q;
    let [_, kv_heads, kv_len, _] = k;
    crate::is_cuda::<R>()
        && matches!(dtype, DType::F16 | DType::BF16)
        && heads == kv_heads
        && q_len == kv_len
        && q_len.is_multiple_of(BLOCK)
        && q_len > 0
        && head_dim.is_multiple_of(LANES)
        && (LANES..=MAX_HEAD_DIM).contains(&head_dim)
}

/// Row stride in shared memory of a tile of rows of `width` values of 2 bytes: padded by 16
/// bytes so that the 16 rows a fragment reads start in different banks (unpadded, rows 128
/// bytes apart share banks four ways).
fn padded(width: usize) -> usize {
    width + 8
}

/// Row stride of the f32 score buffers: 16 bytes of padding, so that the units of a plane,
/// each reading one column of one row, and the fragments' stores of 16 rows, spread over the
/// banks.
const SCORE_STRIDE: usize = BLOCK + 4;

/// Copies rows `first..first + BLOCK` of the `[batch, head]` matrix of `x` (unit stride along
/// the head axis) into `tile` (rows [`padded`]), in vectors of `x`'s width.
#[cube]
fn load_tile<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    tile: &mut SharedMemory<F>,
    batch: usize,
    head: usize,
    first: usize,
    #[comptime] head_dim: usize,
) {
    let width = x.vector_size();
    // Computed at expansion time: an unrolled loop needs a constant end.
    let per_row = comptime!(head_dim / width);
    let loads = comptime!(BLOCK * per_row / UNITS);
    let stride = comptime!(padded(head_dim));
    let base = batch * x.stride(0) + head * x.stride(1) + first * x.stride(2);
    #[unroll]
    for i in 0..loads {
        let e = i * UNITS + UNIT_POS as usize;
        let r = e / per_row;
        let c = (e % per_row) * width;
        let vector = x[(base + r * x.stride(2) + c) / width];
        #[unroll]
        for l in 0..width {
            tile[r * stride + c + l] = vector[l];
        }
    }
}

/// Rows `first..first + BLOCK` of a `[batch, heads, len]` f32 tensor into `tile`.
#[cube]
fn load_column(
    x: &Tensor<f32>,
    tile: &mut SharedMemory<f32>,
    batch: usize,
    head: usize,
    first: usize,
) {
    let r = UNIT_POS as usize;
    if r < BLOCK {
        tile[r] = x[batch * x.stride(0) + head * x.stride(1) + (first + r) * x.stride(2)];
    }
}

/// A fragment of `tile` (rows of `stride`) starting at `start`, as operand `ident` of a
/// 16×16×16 product, read in `layout`.
#[cube]
fn fragment<F: Float>(
    tile: &SharedMemory<F>,
    start: usize,
    #[comptime] stride: usize,
    #[comptime] ident: MatrixIdent,
    #[comptime] layout: MatrixLayout,
) -> Matrix<F> {
    Matrix::<F>::from_slice(
        ident,
        FRAG,
        FRAG,
        FRAG,
        layout,
        &tile.slice(start, start + (FRAG - 1) * stride + FRAG),
        stride as u32,
    )
}

/// A 16×16 f32 accumulator holding zeros.
#[cube]
fn accumulator() -> Matrix<f32> {
    Matrix::<f32>::from_value(
        MatrixIdent::Accumulator,
        FRAG,
        FRAG,
        FRAG,
        MatrixLayout::Undefined,
        0.0f32,
    )
}

#[cube]
fn accumulators(#[comptime] head_dim: usize) -> Sequence<Matrix<f32>> {
    let mut acc = Sequence::<Matrix<f32>>::new();
    #[unroll]
    for _ in 0..head_dim / FRAG {
        acc.push(accumulator());
    }
    acc
}

/// The plane's 16 rows of a tile (from row `first_row`) as A fragments, one per 16 columns.
#[cube]
fn row_fragments<F: Float>(
    tile: &SharedMemory<F>,
    first_row: usize,
    #[comptime] head_dim: usize,
) -> Sequence<Matrix<F>> {
    let stride = comptime!(padded(head_dim));
    let mut fragments = Sequence::<Matrix<F>>::new();
    #[unroll]
    for c in 0..head_dim / FRAG {
        fragments.push(fragment::<F>(
            tile,
            first_row * stride + c * FRAG,
            stride,
            MatrixIdent::A,
            MatrixLayout::RowMajor,
        ));
    }
    fragments
}

/// `rows · tileᵀ` for the plane: its 16 rows (A fragments over the head axis) against the
/// [`BLOCK`] rows of `tile`, stored as 16 × [`BLOCK`] f32 at `out[start..]` (rows of
/// [`SCORE_STRIDE`]).
#[cube]
fn products_with_rows<F: Float>(
    rows: &Sequence<Matrix<F>>,
    tile: &SharedMemory<F>,
    out: &mut SharedMemory<f32>,
    start: usize,
    #[comptime] head_dim: usize,
) {
    let stride = comptime!(padded(head_dim));
    #[unroll]
    for j in 0..BLOCK / FRAG {
        let acc = accumulator();
        #[unroll]
        for c in 0..head_dim / FRAG {
            // B = rows j·16.. of the tile, transposed: read column-major, B[d][key] = tile[key][d].
            let b = fragment::<F>(
                tile,
                j * FRAG * stride + c * FRAG,
                stride,
                MatrixIdent::B,
                MatrixLayout::ColMajor,
            );
            cmma::execute::<F, F, f32, f32>(rows.index(c), &b, &acc, &acc);
        }
        let at = start + j * FRAG;
        cmma::store(
            &mut out.slice_mut(at, at + (FRAG - 1) * SCORE_STRIDE + FRAG),
            &acc,
            SCORE_STRIDE as u32,
            MatrixLayout::RowMajor,
        );
    }
}

/// `acc[c] += a · tile` for the plane: `a` its 16 × [`BLOCK`] rows in `weights` (from
/// `start`, rows [`padded`]), `tile` [`BLOCK`] rows of `head_dim`.
#[cube]
fn accumulate_products<F: Float>(
    acc: &Sequence<Matrix<f32>>,
    weights: &SharedMemory<F>,
    start: usize,
    tile: &SharedMemory<F>,
    #[comptime] head_dim: usize,
) {
    let weight_stride = comptime!(padded(BLOCK));
    let stride = comptime!(padded(head_dim));
    #[unroll]
    for j in 0..BLOCK / FRAG {
        let a = fragment::<F>(
            weights,
            start + j * FRAG,
            weight_stride,
            MatrixIdent::A,
            MatrixLayout::RowMajor,
        );
        #[unroll]
        for c in 0..head_dim / FRAG {
            let b = fragment::<F>(
                tile,
                j * FRAG * stride + c * FRAG,
                stride,
                MatrixIdent::B,
                MatrixLayout::RowMajor,
            );
            cmma::execute::<F, F, f32, f32>(&a, &b, acc.index(c), acc.index(c));
        }
    }
}

/// Stores the plane's accumulators (16 × `head_dim`) at `out[start..]`, rows of
/// [`SCORE_STRIDE`].
#[cube]
fn store_accumulators(
    acc: &Sequence<Matrix<f32>>,
    out: &mut SharedMemory<f32>,
    start: usize,
    #[comptime] head_dim: usize,
) {
    #[unroll]
    for c in 0..head_dim / FRAG {
        let at = start + c * FRAG;
        cmma::store(
            &mut out.slice_mut(at, at + (FRAG - 1) * SCORE_STRIDE + FRAG),
            acc.index(c),
            SCORE_STRIDE as u32,
            MatrixLayout::RowMajor,
        );
    }
}

/// Writes the plane's 16 rows (`first_row..`) of `x` from the f32 buffer `rows` (from
/// `start`, rows of [`SCORE_STRIDE`]), scaled: each unit one column in every 32.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_rows<F: Float>(
    x: &mut Tensor<F>,
    rows: &SharedMemory<f32>,
    start: usize,
    scale: f32,
    batch: usize,
    head: usize,
    first_row: usize,
    #[comptime] head_dim: usize,
) {
    let lane = UNIT_POS_X as usize;
    let base = batch * x.stride(0) + head * x.stride(1);
    #[unroll]
    for r in 0..FRAG {
        #[unroll]
        for g in 0..head_dim / LANES {
            let c = g * LANES + lane;
            x[base + (first_row + r) * x.stride(2) + c * x.stride(3)] =
                F::cast_from(rows[start + r * SCORE_STRIDE + c] * scale);
        }
    }
}

/// Grid: x the query block (`blocks` of them, the last, heaviest, first), y the head, z the
/// batch entry. Block 2D: x the lane, y the plane. Each unit takes, of each of the plane's 16
/// rows, the columns `lane` and `lane + 32` of a score tile and those of the output in every
/// 32; row maxima and sums are plane reductions.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    blocks: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let block = blocks as usize - 1 - CUBE_POS_X as usize;
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let first_row = block * BLOCK + plane * FRAG;
    let plane_scores = plane * FRAG * SCORE_STRIDE;
    let plane_probs = plane * FRAG * comptime!(padded(BLOCK));

    let mut keys = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(head_dim)), 128usize);
    let mut values = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(head_dim)), 128usize);
    let mut scores = SharedMemory::<f32>::new_aligned(BLOCK * SCORE_STRIDE, 128usize);
    let mut probs = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(BLOCK)), 128usize);

    load_tile::<F, N>(q, &mut keys, batch, head, block * BLOCK, head_dim);
    sync_cube();
    let query = row_fragments::<F>(&keys, plane * FRAG, head_dim);

    let groups = comptime!(head_dim / LANES);
    let mut acc = Array::<f32>::new(FRAG * groups);
    let mut row_max = Array::<f32>::new(FRAG);
    let mut row_sum = Array::<f32>::new(FRAG);
    let mut correction = Array::<f32>::new(FRAG);
    #[unroll]
    for r in 0..FRAG {
        row_max[r] = f32::new(MASKED);
        row_sum[r] = 0.0f32;
        #[unroll]
        for g in 0..groups {
            acc[r * groups + g] = 0.0f32;
        }
    }

    for t in 0..block + 1 {
        // Every plane is done with the previous tile (and the queries) before it is replaced.
        sync_cube();
        load_tile::<F, N>(k, &mut keys, batch, head, t * BLOCK, head_dim);
        load_tile::<F, N>(v, &mut values, batch, head, t * BLOCK, head_dim);
        sync_cube();

        products_with_rows::<F>(&query, &keys, &mut scores, plane_scores, head_dim);
        sync_plane();

        let key = t * BLOCK + lane;
        #[unroll]
        for r in 0..FRAG {
            let at = plane_scores + r * SCORE_STRIDE + lane;
            let mut z0 = scores[at] * scale;
            let mut z1 = scores[at + LANES] * scale;
            if key > first_row + r {
                z0 = f32::new(MASKED);
            }
            if key + LANES > first_row + r {
                z1 = f32::new(MASKED);
            }
            // Key t·BLOCK is at or before every row of the cube: the maximum is a real score.
            let new_max = max(row_max[r], plane_max(max(z0, z1)));
            let p0 = (z0 - new_max).exp();
            let p1 = (z1 - new_max).exp();
            let p_at = plane_probs + r * comptime!(padded(BLOCK)) + lane;
            probs[p_at] = F::cast_from(p0);
            probs[p_at + LANES] = F::cast_from(p1);
            let fix = (row_max[r] - new_max).exp();
            correction[r] = fix;
            row_sum[r] = row_sum[r] * fix + plane_sum(p0 + p1);
            row_max[r] = new_max;
        }
        sync_plane();

        let pv = accumulators(head_dim);
        accumulate_products::<F>(&pv, &probs, plane_probs, &values, head_dim);
        store_accumulators(&pv, &mut scores, plane_scores, head_dim);
        sync_plane();
        #[unroll]
        for r in 0..FRAG {
            #[unroll]
            for g in 0..groups {
                let i = r * groups + g;
                acc[i] = acc[i] * correction[r]
                    + scores[plane_scores + r * SCORE_STRIDE + g * LANES + lane];
            }
        }
    }

    let base = batch * out.stride(0) + head * out.stride(1);
    #[unroll]
    for r in 0..FRAG {
        let inverse = 1.0f32 / row_sum[r];
        #[unroll]
        for g in 0..groups {
            let c = g * LANES + lane;
            out[base + (first_row + r) * out.stride(2) + c * out.stride(3)] =
                F::cast_from(acc[r * groups + g] * inverse);
        }
        if lane == r {
            lse[batch * lse.stride(0) + head * lse.stride(1) + (first_row + r) * lse.stride(2)] =
                row_max[r] + row_sum[r].ln();
        }
    }
}

/// The dQ pass (grid and block as forward); also writes `D = rowsum(dO ∘ O)` for the dK/dV
/// pass.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn backward_dq_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &Tensor<Vector<F, N>>,
    grad_out: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    delta: &mut Tensor<f32>,
    grad_q: &mut Tensor<F>,
    scale: f32,
    blocks: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let block = blocks as usize - 1 - CUBE_POS_X as usize;
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let first_row = block * BLOCK + plane * FRAG;
    let plane_scores = plane * FRAG * SCORE_STRIDE;
    let plane_grads = plane * FRAG * comptime!(padded(BLOCK));
    let stride = comptime!(padded(head_dim));

    let mut keys = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(head_dim)), 128usize);
    let mut values = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(head_dim)), 128usize);
    let mut scores = SharedMemory::<f32>::new_aligned(BLOCK * SCORE_STRIDE, 128usize);
    let mut grads = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(BLOCK)), 128usize);

    // Queries, output gradients and outputs through the three buffers of the inputs' type.
    load_tile::<F, N>(q, &mut keys, batch, head, block * BLOCK, head_dim);
    load_tile::<F, N>(grad_out, &mut values, batch, head, block * BLOCK, head_dim);
    load_tile::<F, N>(out, &mut grads, batch, head, block * BLOCK, head_dim);
    sync_cube();
    let query = row_fragments::<F>(&keys, plane * FRAG, head_dim);
    let d_out = row_fragments::<F>(&values, plane * FRAG, head_dim);
    let mut row_lse = Array::<f32>::new(FRAG);
    let mut row_delta = Array::<f32>::new(FRAG);
    #[unroll]
    for r in 0..FRAG {
        let row = plane * FRAG + r;
        let mut dot = 0.0f32;
        #[unroll]
        for g in 0..head_dim / LANES {
            let at = row * stride + g * LANES + lane;
            dot += f32::cast_from(values[at]) * f32::cast_from(grads[at]);
        }
        row_delta[r] = plane_sum(dot);
        let at = batch * lse.stride(0) + head * lse.stride(1) + (first_row + r) * lse.stride(2);
        row_lse[r] = lse[at];
        if lane == r {
            delta[batch * delta.stride(0)
                + head * delta.stride(1)
                + (first_row + r) * delta.stride(2)] = row_delta[r];
        }
    }

    let grad = accumulators(head_dim);
    let mut p = Array::<f32>::new(2 * FRAG);
    for t in 0..block + 1 {
        sync_cube();
        load_tile::<F, N>(k, &mut keys, batch, head, t * BLOCK, head_dim);
        load_tile::<F, N>(v, &mut values, batch, head, t * BLOCK, head_dim);
        sync_cube();

        products_with_rows::<F>(&query, &keys, &mut scores, plane_scores, head_dim);
        sync_plane();
        let key = t * BLOCK + lane;
        #[unroll]
        for r in 0..FRAG {
            let at = plane_scores + r * SCORE_STRIDE + lane;
            let mut p0 = (scores[at] * scale - row_lse[r]).exp();
            let mut p1 = (scores[at + LANES] * scale - row_lse[r]).exp();
            if key > first_row + r {
                p0 = 0.0f32;
            }
            if key + LANES > first_row + r {
                p1 = 0.0f32;
            }
            p[2 * r] = p0;
            p[2 * r + 1] = p1;
        }
        sync_plane();

        // dP = dO Vᵀ, over the scores just read.
        products_with_rows::<F>(&d_out, &values, &mut scores, plane_scores, head_dim);
        sync_plane();
        #[unroll]
        for r in 0..FRAG {
            let at = plane_scores + r * SCORE_STRIDE + lane;
            let g_at = plane_grads + r * comptime!(padded(BLOCK)) + lane;
            grads[g_at] = F::cast_from(p[2 * r] * (scores[at] - row_delta[r]));
            grads[g_at + LANES] = F::cast_from(p[2 * r + 1] * (scores[at + LANES] - row_delta[r]));
        }
        sync_plane();

        accumulate_products::<F>(&grad, &grads, plane_grads, &keys, head_dim);
    }

    sync_plane();
    store_accumulators(&grad, &mut scores, plane_scores, head_dim);
    sync_plane();
    store_rows::<F>(
        grad_q,
        &scores,
        plane_scores,
        scale,
        batch,
        head,
        first_row,
        head_dim,
    );
}

/// The dK/dV pass. Grid: x the key block, y the head, z the batch entry; each plane owns 16
/// keys and walks the query tiles at or after its block, each unit the queries `lane` and
/// `lane + 32` of a tile.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn backward_dkv_kernel<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    grad_out: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    grad_k: &mut Tensor<F>,
    grad_v: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let block = CUBE_POS_X as usize;
    let blocks = CUBE_COUNT_X as usize;
    let plane = UNIT_POS_Y as usize;
    let lane = UNIT_POS_X as usize;
    let first_key = block * BLOCK + plane * FRAG;
    let plane_scores = plane * FRAG * SCORE_STRIDE;
    let plane_weights = plane * FRAG * comptime!(padded(BLOCK));

    let mut queries = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(head_dim)), 128usize);
    let mut d_outs = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(head_dim)), 128usize);
    let mut scores = SharedMemory::<f32>::new_aligned(BLOCK * SCORE_STRIDE, 128usize);
    let mut weights = SharedMemory::<F>::new_aligned(comptime!(BLOCK * padded(BLOCK)), 128usize);
    let mut tile_lse = SharedMemory::<f32>::new(BLOCK);
    let mut tile_delta = SharedMemory::<f32>::new(BLOCK);

    load_tile::<F, N>(k, &mut queries, batch, head, block * BLOCK, head_dim);
    load_tile::<F, N>(v, &mut d_outs, batch, head, block * BLOCK, head_dim);
    sync_cube();
    let keys = row_fragments::<F>(&queries, plane * FRAG, head_dim);
    let vals = row_fragments::<F>(&d_outs, plane * FRAG, head_dim);

    let grad_key = accumulators(head_dim);
    let grad_value = accumulators(head_dim);
    let mut p = Array::<f32>::new(2 * FRAG);
    for t in block..blocks {
        sync_cube();
        load_tile::<F, N>(q, &mut queries, batch, head, t * BLOCK, head_dim);
        load_tile::<F, N>(grad_out, &mut d_outs, batch, head, t * BLOCK, head_dim);
        load_column(lse, &mut tile_lse, batch, head, t * BLOCK);
        load_column(delta, &mut tile_delta, batch, head, t * BLOCK);
        sync_cube();

        // Sᵀ = K Qᵀ: the plane's keys against the tile's queries.
        products_with_rows::<F>(&keys, &queries, &mut scores, plane_scores, head_dim);
        sync_plane();
        let lse0 = tile_lse[lane];
        let lse1 = tile_lse[lane + LANES];
        let query = t * BLOCK + lane;
        #[unroll]
        for r in 0..FRAG {
            let at = plane_scores + r * SCORE_STRIDE + lane;
            let mut p0 = (scores[at] * scale - lse0).exp();
            let mut p1 = (scores[at + LANES] * scale - lse1).exp();
            if query < first_key + r {
                p0 = 0.0f32;
            }
            if query + LANES < first_key + r {
                p1 = 0.0f32;
            }
            p[2 * r] = p0;
            p[2 * r + 1] = p1;
            let w_at = plane_weights + r * comptime!(padded(BLOCK)) + lane;
            weights[w_at] = F::cast_from(p0);
            weights[w_at + LANES] = F::cast_from(p1);
        }
        sync_plane();

        // dV += Pᵀ dO; dPᵀ = V dOᵀ over the scores.
        accumulate_products::<F>(&grad_value, &weights, plane_weights, &d_outs, head_dim);
        products_with_rows::<F>(&vals, &d_outs, &mut scores, plane_scores, head_dim);
        sync_plane();
        let delta0 = tile_delta[lane];
        let delta1 = tile_delta[lane + LANES];
        #[unroll]
        for r in 0..FRAG {
            let at = plane_scores + r * SCORE_STRIDE + lane;
            let w_at = plane_weights + r * comptime!(padded(BLOCK)) + lane;
            weights[w_at] = F::cast_from(p[2 * r] * (scores[at] - delta0));
            weights[w_at + LANES] = F::cast_from(p[2 * r + 1] * (scores[at + LANES] - delta1));
        }
        sync_plane();

        // dK += dSᵀ Q.
        accumulate_products::<F>(&grad_key, &weights, plane_weights, &queries, head_dim);
    }

    sync_plane();
    store_accumulators(&grad_value, &mut scores, plane_scores, head_dim);
    sync_plane();
    store_rows::<F>(
        grad_v,
        &scores,
        plane_scores,
        1.0f32,
        batch,
        head,
        first_key,
        head_dim,
    );
    sync_plane();
    store_accumulators(&grad_key, &mut scores, plane_scores, head_dim);
    sync_plane();
    store_rows::<F>(
        grad_k,
        &scores,
        plane_scores,
        scale,
        batch,
        head,
        first_key,
        head_dim,
    );
}

/// `x` with unit stride along its last axis (a copy only where it had another).
fn unit_last_stride<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.meta.strides()[3] == 1 {
        x
    } else {
        burn_cubecl::kernel::into_contiguous(x)
    }
}

/// Checks that [`applies`] holds for `q` and `k`, and that `v` (and `like`, if given) have
/// their shapes; returns `[batch, heads, len, head_dim]`.
fn check<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>, v: &CubeTensor<R>) -> [usize; 4] {
    let dims = |x: &CubeTensor<R>| x.shape().dims::<4>();
    assert!(
        applies::<R>(dims(q), dims(k), q.dtype),
        "tensor-core flash attention: queries {:?} and keys {:?} of {:?} are outside what it \
         takes (CUDA, f16 or bf16, equal lengths that are multiples of {BLOCK}, head size 32 or \
         {MAX_HEAD_DIM})",
        dims(q),
        dims(k),
        q.dtype
    );
    assert_eq!(
        dims(q),
        dims(k),
        "tensor-core flash attention: keys must match the queries"
    );
    assert_eq!(
        dims(v),
        dims(k),
        "tensor-core flash attention: values must match the keys"
    );
    assert!(
        k.dtype == q.dtype && v.dtype == q.dtype,
        "tensor-core flash attention: queries, keys and values must share a type"
    );
    dims(q)
}

fn grid(len: usize, heads: usize, batch: usize) -> CubeCount {
    CubeCount::Static((len / BLOCK) as u32, heads as u32, batch as u32)
}

fn cube_dim() -> CubeDim {
    CubeDim::new_2d(LANES as u32, PLANES as u32)
}

/// Attention output `[batch, heads, len, head_dim]` (the inputs' type) and its rows'
/// log-sum-exp `[batch, heads, len]` (f32). Panics where [`applies`] does not hold.
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [b, h, n, d] = check(&q, &k, &v);
    let (q, k, v) = (
        unit_last_stride(q),
        unit_last_stride(k),
        unit_last_stride(v),
    );
    let out = empty(&q, vec![b, h, n, d], q.dtype);
    let lse = empty(&q, vec![b, h, n], DType::F32);
    let width = vector_size(&[&q, &k, &v, &out]);
    let (client, dtype) = (q.client.clone(), q.dtype);
    // SAFETY: the grid covers the [len / BLOCK, heads, batch] blocks of the inputs exactly and
    // every row and column a kernel touches lies inside them (length a multiple of BLOCK, head
    // size of whole vectors, checked above).
    unsafe {
        forward_kernel::launch_unchecked::<R>(
            &client,
            grid(n, h, b),
            cube_dim(),
            width,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            (d as f32).powf(-0.5),
            (n / BLOCK) as u32,
            d,
            dtype.into(),
        );
    }
    (out, lse)
}

/// Gradients of the queries, keys and values (the inputs' type), from the inputs, the forward
/// pass's output and `lse` (f32), and the output's gradient.
pub fn backward<R: CubeRuntime>(
    [q, k, v]: [CubeTensor<R>; 3],
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad_out: CubeTensor<R>,
) -> [CubeTensor<R>; 3] {
    let [b, h, n, d] = check(&q, &k, &v);
    assert_eq!(
        out.shape().dims::<4>(),
        [b, h, n, d],
        "tensor-core flash attention: output shape"
    );
    assert_eq!(
        grad_out.shape().dims::<4>(),
        [b, h, n, d],
        "tensor-core flash attention: output gradient shape"
    );
    assert_eq!(
        lse.shape().dims::<3>(),
        [b, h, n],
        "tensor-core flash attention: lse shape"
    );
    assert_eq!(
        lse.dtype,
        DType::F32,
        "tensor-core flash attention: lse must be f32"
    );
    assert!(
        out.dtype == q.dtype && grad_out.dtype == q.dtype,
        "tensor-core flash attention: the output and its gradient must have the inputs' type"
    );
    let [q, k, v, out, grad_out] = [q, k, v, out, grad_out].map(unit_last_stride);
    let dtype = q.dtype;
    let delta = empty(&q, vec![b, h, n], DType::F32);
    let [grad_q, grad_k, grad_v] = [0; 3].map(|_| empty(&q, vec![b, h, n, d], dtype));
    let width = vector_size(&[&q, &k, &v, &out, &grad_out, &grad_q]);
    let scale = (d as f32).powf(-0.5);
    let client = q.client.clone();
    // SAFETY: as in `forward`; lse, delta and the gradients were checked or made with the
    // inputs' shapes.
    unsafe {
        backward_dq_kernel::launch_unchecked::<R>(
            &client,
            grid(n, h, b),
            cube_dim(),
            width,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            grad_out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            grad_q.clone().into_tensor_arg(),
            scale,
            (n / BLOCK) as u32,
            d,
            dtype.into(),
        );
        backward_dkv_kernel::launch_unchecked::<R>(
            &client,
            grid(n, h, b),
            cube_dim(),
            width,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            grad_out.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            grad_k.clone().into_tensor_arg(),
            grad_v.clone().into_tensor_arg(),
            scale,
            d,
            dtype.into(),
        );
    }
    [grad_q, grad_k, grad_v]
}
