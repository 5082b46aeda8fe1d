//! Flash attention on the GPU, forward and backward (Dao et al., FlashAttention, arXiv 2205.14135;
//! the backward split into a dQ pass and a dK/dV pass as in FlashAttention-2, arXiv 2307.08691),
//! for `[batch, heads, len, head_dim]` queries, keys and values with as many key heads as query
//! heads.
//!
//! Queries sit at the last `q_len` of `kv_len` positions and read keys at or before their own
//! position ([`Pattern::Causal`]), or, further, only the key blocks the block multi-scale rule
//! keeps ([`Pattern::Bms`]; see `strata::nn::coord3d`). The n×n scores never exist in memory:
//!
//! - forward: each cube takes [`TILE`] query rows, one unit each, and walks the key tiles the
//!   pattern keeps, loading each tile of keys and values into shared memory once for all its
//!   rows, with the online softmax (running max and sum). It writes the output and each row's
//!   log-sum-exp `lse`, all that backward needs besides the inputs.
//! - backward, dQ pass: the same walk; per key, `p = exp(q·k·s − lse)`, `dp = dO·v`,
//!   `dS = p·(dp − D)` with `D = dO·O` per row, `dQ += dS·k·s`. It also writes `D` for the next pass.
//! - backward, dK/dV pass: each cube takes [`TILE`] key rows and walks the query tiles that read
//!   them: `dV += p·dO`, `dK += dS·q·s`. Each unit owns its key row's sums, so no atomics.
//!
//! The BMS pattern is decided per tile: every row of a query tile and every key of a key tile
//! lie in one block when the block length and the query offset are multiples of [`TILE`]
//! (checked by [`Pattern::fits`]), so a cube skips a whole key tile or reads all of it, and
//! attention costs O(n log n) like the pattern.
//!
//! Arithmetic is f32 whatever the tensors' type (f32, f16, bf16): values are widened as they
//! are loaded, and `lse` and `D` are f32 tensors.

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use crate::empty;

/// Rows per cube (one unit each) and keys per shared-memory tile. Loops over the head size are
/// unrolled (the rows they index stay in registers); loops over a tile's keys are not:
/// unrolled too, each kernel was TILE times longer and Mesa's software Vulkan spent over a
/// quarter of an hour compiling one.
pub const TILE: usize = 32;

/// The largest head size the kernels take: each unit keeps two or three head-sized rows in
/// registers.
pub const MAX_HEAD_DIM: usize = 128;

/// A masked score: finite, since WGSL has no infinity literal, and far below any real score so
/// that `exp(masked − max)` is 0. (In a kernel a bare negative literal is folded into a
/// compile-time constant; `f32::new` makes a runtime value.)
const MASKED: f32 = -1.0e30;

/// Which keys a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Every key at or before the query's position.
    Causal,
    /// Causal, and only the key blocks that query block `I` keeps: `D = I − J < window`, or,
    /// with `multiscale`, `window·2^(k−1) ≤ D < window·2^k` and `J ≡ 0 (mod 2^k)`.
    Bms {
        block_len: usize,
        window: usize,
        multiscale: bool,
    },
}

impl Pattern {
    /// Whether the kernels can run this pattern for queries at offset `kv_len − q_len`: a BMS
    /// block must hold whole tiles, so that a tile is kept or dropped as one.
    pub fn fits(&self, q_len: usize, kv_len: usize) -> bool {
        match *self {
            Pattern::Causal => q_len <= kv_len,
            Pattern::Bms {
                block_len, window, ..
            } => {
                q_len <= kv_len
                    && window > 0
                    && block_len.is_multiple_of(TILE)
                    && (kv_len - q_len).is_multiple_of(TILE)
            }
        }
    }

    /// `(kind, block_len, window)` as the kernels take them: kind 0 causal, 1 sliding window of
    /// blocks, 2 block multi-scale.
    fn args(&self) -> (u32, u32, u32) {
        match *self {
            Pattern::Causal => (0, 1, 1),
            Pattern::Bms {
                block_len,
                window,
                multiscale,
            } => (
                if multiscale { 2 } else { 1 },
                block_len as u32,
                window as u32,
            ),
        }
    }
}

/// Whether query block `i` reads key block `j` under the BMS rule; kind 0 (causal) keeps every
/// tile, and the causal test is left to each score.
#[cube]
fn keeps(i: u32, j: u32, kind: u32, window: u32) -> bool {
    let mut keep = kind == 0 || j <= i;
    if keep && kind > 0 {
        let d = i - j;
        if d >= window {
            if kind == 1 {
                keep = false;
            } else {
                // The level k is the bit length of ⌊D / W⌋; J must be a multiple of 2^k.
                let mut level = 0u32;
                let mut rest = d / window;
                while rest > 0 {
                    level += 1;
                    rest /= 2;
                }
                let multiple = (j & ((1u32 << level) - 1)) == 0;
                keep = j == 0 || multiple;
            }
        }
    }
    keep
}

/// Copies rows `first..first + TILE` of the `[batch, head]` matrix of `x` into `tile`, zeros
/// past `len`. Consecutive units read consecutive elements.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile<F: Float>(
    x: &Tensor<F>,
    tile: &mut SharedMemory<f32>,
    batch: usize,
    head: usize,
    first: usize,
    len: usize,
    #[comptime] head_dim: usize,
) {
    let base = batch * x.stride(0) + head * x.stride(1);
    let mut e = UNIT_POS_X as usize;
    while e < TILE * head_dim {
        let r = e / head_dim;
        let c = e % head_dim;
        let row = first + r;
        let mut value = 0.0f32;
        if row < len {
            value = f32::cast_from(x[base + row * x.stride(2) + c * x.stride(3)]);
        }
        tile[r * head_dim + c] = value;
        e += TILE;
    }
}

/// Copies one value per row of the `[batch, head]` vector of `x` (`[batch, heads, len]`).
#[cube]
fn load_column(
    x: &Tensor<f32>,
    tile: &mut SharedMemory<f32>,
    batch: usize,
    head: usize,
    first: usize,
    len: usize,
) {
    let r = UNIT_POS_X as usize;
    let row = first + r;
    let mut value = 0.0f32;
    if row < len {
        value = x[row_start(x, batch, head, row)];
    }
    tile[r] = value;
}

/// Index of row `row` of the `[batch, head]` matrix of `x`; element `c` is at `+ c·x.stride(3)`.
/// For a `[batch, heads, len]` tensor (lse, D) it is the index of the row's one value.
#[cube]
fn row_start<F: Float>(x: &Tensor<F>, batch: usize, head: usize, row: usize) -> usize {
    batch * x.stride(0) + head * x.stride(1) + row * x.stride(2)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    kind: u32,
    block_len: u32,
    window: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let first = CUBE_POS_X as usize * TILE;
    let row = first + UNIT_POS_X as usize;
    let q_len = q.shape(2);
    let kv_len = k.shape(2);
    let offset = kv_len - q_len;
    let live = row < q_len;
    let pos = offset + row;
    let last_pos = offset + min(first + TILE, q_len) - 1;

    let mut query = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    // A unit past the last row reads row 0 and writes nothing: no branch per element.
    let q_row = row_start(q, batch, head, select(live, row, 0));
    #[unroll]
    for c in 0..head_dim {
        query[c] = f32::cast_from(q[q_row + c * q.stride(3)]) * scale;
        acc[c] = 0.0f32;
    }
    let mut keys = SharedMemory::<f32>::new(TILE * head_dim);
    let mut values = SharedMemory::<f32>::new(TILE * head_dim);
    let mut scores = Array::<f32>::new(TILE);
    let mut row_max = f32::new(MASKED);
    let mut sum = 0.0f32;
    let query_block = ((offset + first) / block_len as usize) as u32;

    let tiles = last_pos / TILE + 1;
    for t in 0..tiles {
        let j0 = t * TILE;
        // The same for every unit of the cube, so the barriers inside are reached by all.
        if keeps(query_block, (j0 / block_len as usize) as u32, kind, window) {
            load_tile::<F>(k, &mut keys, batch, head, j0, kv_len, head_dim);
            load_tile::<F>(v, &mut values, batch, head, j0, kv_len, head_dim);
            sync_cube();
            let mut tile_max = f32::new(MASKED);
            for r in 0..TILE {
                let mut s = 0.0f32;
                #[unroll]
                for c in 0..head_dim {
                    s += query[c] * keys[r * head_dim + c];
                }
                if j0 + r > pos || j0 + r >= kv_len {
                    s = f32::new(MASKED);
                }
                scores[r] = s;
                tile_max = max(tile_max, s);
            }
            let new_max = max(row_max, tile_max);
            let correction = (row_max - new_max).exp();
            sum *= correction;
            #[unroll]
            for c in 0..head_dim {
                acc[c] *= correction;
            }
            for r in 0..TILE {
                let mut p = 0.0f32;
                if scores[r] > f32::new(MASKED) {
                    p = (scores[r] - new_max).exp();
                }
                sum += p;
                #[unroll]
                for c in 0..head_dim {
                    acc[c] += p * values[r * head_dim + c];
                }
            }
            row_max = new_max;
            sync_cube();
        }
    }

    if live {
        let out_row = row_start(out, batch, head, row);
        #[unroll]
        for c in 0..head_dim {
            out[out_row + c * out.stride(3)] = F::cast_from(acc[c] / sum);
        }
        lse[row_start(lse, batch, head, row)] = row_max + sum.ln();
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn backward_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    grad_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &mut Tensor<f32>,
    grad_q: &mut Tensor<F>,
    scale: f32,
    kind: u32,
    block_len: u32,
    window: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let first = CUBE_POS_X as usize * TILE;
    let row = first + UNIT_POS_X as usize;
    let q_len = q.shape(2);
    let kv_len = k.shape(2);
    let offset = kv_len - q_len;
    let live = row < q_len;
    let pos = offset + row;
    let last_pos = offset + min(first + TILE, q_len) - 1;

    let mut query = Array::<f32>::new(head_dim);
    let mut d_out = Array::<f32>::new(head_dim);
    let mut d_query = Array::<f32>::new(head_dim);
    let mut row_delta = 0.0f32;
    let mut row_lse = 0.0f32;
    let safe_row = select(live, row, 0);
    let q_row = row_start(q, batch, head, safe_row);
    let dy_row = row_start(grad_out, batch, head, safe_row);
    let y_row = row_start(out, batch, head, safe_row);
    #[unroll]
    for c in 0..head_dim {
        let dy = f32::cast_from(grad_out[dy_row + c * grad_out.stride(3)]);
        query[c] = f32::cast_from(q[q_row + c * q.stride(3)]) * scale;
        d_out[c] = dy;
        d_query[c] = 0.0f32;
        row_delta += dy * f32::cast_from(out[y_row + c * out.stride(3)]);
    }
    if live {
        row_lse = lse[row_start(lse, batch, head, row)];
        delta[row_start(delta, batch, head, row)] = row_delta;
    }
    let mut keys = SharedMemory::<f32>::new(TILE * head_dim);
    let mut values = SharedMemory::<f32>::new(TILE * head_dim);
    let query_block = ((offset + first) / block_len as usize) as u32;

    let tiles = last_pos / TILE + 1;
    for t in 0..tiles {
        let j0 = t * TILE;
        if keeps(query_block, (j0 / block_len as usize) as u32, kind, window) {
            load_tile::<F>(k, &mut keys, batch, head, j0, kv_len, head_dim);
            load_tile::<F>(v, &mut values, batch, head, j0, kv_len, head_dim);
            sync_cube();
            for r in 0..TILE {
                let mut s = 0.0f32;
                let mut dp = 0.0f32;
                #[unroll]
                for c in 0..head_dim {
                    s += query[c] * keys[r * head_dim + c];
                    dp += d_out[c] * values[r * head_dim + c];
                }
                let mut ds = 0.0f32;
                if j0 + r <= pos && j0 + r < kv_len {
                    ds = (s - row_lse).exp() * (dp - row_delta);
                }
                #[unroll]
                for c in 0..head_dim {
                    d_query[c] += ds * keys[r * head_dim + c];
                }
            }
            sync_cube();
        }
    }

    if live {
        let dq_row = row_start(grad_q, batch, head, row);
        #[unroll]
        for c in 0..head_dim {
            grad_q[dq_row + c * grad_q.stride(3)] = F::cast_from(d_query[c] * scale);
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn backward_dkv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    grad_out: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    grad_k: &mut Tensor<F>,
    grad_v: &mut Tensor<F>,
    scale: f32,
    kind: u32,
    block_len: u32,
    window: u32,
    #[comptime] head_dim: usize,
    #[define(F)] _dtype: StorageType,
) {
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let first = CUBE_POS_X as usize * TILE;
    let key = first + UNIT_POS_X as usize;
    let q_len = q.shape(2);
    let kv_len = k.shape(2);
    let offset = kv_len - q_len;
    let live = key < kv_len;

    // This unit's key and value rows and its sums stay in registers (spilling to local memory
    // for large heads); shared memory holds one tile of queries and output gradients, 32 KiB at
    // the largest head size, within every backend's limit.
    let mut own_key = Array::<f32>::new(head_dim);
    let mut own_value = Array::<f32>::new(head_dim);
    let safe_key = select(live, key, 0);
    let k_row = row_start(k, batch, head, safe_key);
    let v_row = row_start(v, batch, head, safe_key);
    #[unroll]
    for c in 0..head_dim {
        own_key[c] = f32::cast_from(k[k_row + c * k.stride(3)]);
        own_value[c] = f32::cast_from(v[v_row + c * v.stride(3)]);
    }
    let mut d_key = Array::<f32>::new(head_dim);
    let mut d_value = Array::<f32>::new(head_dim);
    #[unroll]
    for c in 0..head_dim {
        d_key[c] = 0.0f32;
        d_value[c] = 0.0f32;
    }
    let mut queries = SharedMemory::<f32>::new(TILE * head_dim);
    let mut d_outs = SharedMemory::<f32>::new(TILE * head_dim);
    let mut lses = SharedMemory::<f32>::new(TILE);
    let mut deltas = SharedMemory::<f32>::new(TILE);
    let key_block = (first / block_len as usize) as u32;

    // Query rows at positions ≥ `first` read this tile: rows from `first − offset` on.
    let mut first_row = 0;
    if first > offset {
        first_row = first - offset;
    }
    let tiles = q_len.div_ceil(TILE);
    for t in first_row / TILE..tiles {
        let i0 = t * TILE;
        if keeps(
            ((offset + i0) / block_len as usize) as u32,
            key_block,
            kind,
            window,
        ) {
            load_tile::<F>(q, &mut queries, batch, head, i0, q_len, head_dim);
            load_tile::<F>(grad_out, &mut d_outs, batch, head, i0, q_len, head_dim);
            load_column(lse, &mut lses, batch, head, i0, q_len);
            load_column(delta, &mut deltas, batch, head, i0, q_len);
            sync_cube();
            for r in 0..TILE {
                let mut s = 0.0f32;
                let mut dp = 0.0f32;
                #[unroll]
                for c in 0..head_dim {
                    s += queries[r * head_dim + c] * own_key[c];
                    dp += d_outs[r * head_dim + c] * own_value[c];
                }
                let mut p = 0.0f32;
                if live && i0 + r < q_len && offset + i0 + r >= key {
                    p = (s * scale - lses[r]).exp();
                }
                let ds = p * (dp - deltas[r]);
                #[unroll]
                for c in 0..head_dim {
                    d_value[c] += p * d_outs[r * head_dim + c];
                    d_key[c] += ds * queries[r * head_dim + c];
                }
            }
            sync_cube();
        }
    }

    if live {
        let dk_row = row_start(grad_k, batch, head, key);
        let dv_row = row_start(grad_v, batch, head, key);
        #[unroll]
        for c in 0..head_dim {
            grad_k[dk_row + c * grad_k.stride(3)] = F::cast_from(d_key[c] * scale);
            grad_v[dv_row + c * grad_v.stride(3)] = F::cast_from(d_value[c]);
        }
    }
}

fn dims(x: &CubeTensor<impl CubeRuntime>) -> [usize; 4] {
    x.shape().dims::<4>()
}

/// Checks shapes and pattern; returns `[batch, heads, q_len, kv_len, head_dim]`.
fn check<R: CubeRuntime>(
    q: &CubeTensor<R>,
    k: &CubeTensor<R>,
    v: &CubeTensor<R>,
    pattern: Pattern,
) -> [usize; 5] {
    let [b, h, q_len, d] = dims(q);
    let [bk, hk, kv_len, dk] = dims(k);
    assert_eq!(
        (bk, hk, dk),
        (b, h, d),
        "flash attention: keys must be [batch, heads, len, head_dim] like the queries"
    );
    assert_eq!(
        dims(v),
        dims(k),
        "flash attention: values must match the keys"
    );
    assert!(
        (1..=MAX_HEAD_DIM).contains(&d),
        "flash attention: head_dim {d} outside 1..={MAX_HEAD_DIM}"
    );
    assert!(
        pattern.fits(q_len, kv_len),
        "flash attention: {pattern:?} does not fit q_len {q_len}, kv_len {kv_len} (tile {TILE})"
    );
    [b, h, q_len, kv_len, d]
}

fn grid(rows: usize, heads: usize, batch: usize) -> CubeCount {
    CubeCount::Static(rows.div_ceil(TILE) as u32, heads as u32, batch as u32)
}

/// Attention output `[batch, heads, q_len, head_dim]` and its rows' log-sum-exp
/// `[batch, heads, q_len]` (f32).
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    pattern: Pattern,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [b, h, q_len, _, d] = check(&q, &k, &v, pattern);
    let out = empty(&q, vec![b, h, q_len, d], q.dtype);
    let lse = empty(&q, vec![b, h, q_len], DType::F32);
    let (kind, block_len, window) = pattern.args();
    let dtype = q.dtype;
    let client = q.client.clone();
    // SAFETY: every index is inside its tensor: rows are checked against their lengths
    // and the grid covers exactly the [batch, heads] of the inputs.
    unsafe {
        forward_kernel::launch_unchecked::<R>(
            &client,
            grid(q_len, h, b),
            CubeDim::new_1d(TILE as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            (d as f32).powf(-0.5),
            kind,
            block_len,
            window,
            d,
            dtype.into(),
        );
    }
    (out, lse)
}

/// Gradients of the queries, keys and values, from the inputs, the forward pass's output and
/// `lse`, and the output's gradient.
#[allow(clippy::too_many_arguments)]
pub fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    grad_out: CubeTensor<R>,
    pattern: Pattern,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let [b, h, q_len, kv_len, d] = check(&q, &k, &v, pattern);
    assert_eq!(
        dims(&out),
        dims(&q),
        "flash attention: output must match the queries"
    );
    assert_eq!(
        dims(&grad_out),
        dims(&q),
        "flash attention: output gradient must match"
    );
    assert_eq!(lse.dtype, DType::F32, "flash attention: lse must be f32");
    let dtype = q.dtype;
    let client = q.client.clone();
    let delta = empty(&q, vec![b, h, q_len], DType::F32);
    let grad_q = empty(&q, vec![b, h, q_len, d], dtype);
    let grad_k = empty(&q, vec![b, h, kv_len, d], dtype);
    let grad_v = empty(&q, vec![b, h, kv_len, d], dtype);
    let (kind, block_len, window) = pattern.args();
    let scale = (d as f32).powf(-0.5);
    // SAFETY: every index is inside its tensor: rows are checked against their lengths
    // and the grid covers exactly the [batch, heads] of the inputs.
    unsafe {
        backward_dq_kernel::launch_unchecked::<R>(
            &client,
            grid(q_len, h, b),
            CubeDim::new_1d(TILE as u32),
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            out.into_tensor_arg(),
            grad_out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            grad_q.clone().into_tensor_arg(),
            scale,
            kind,
            block_len,
            window,
            d,
            dtype.into(),
        );
    }
    // SAFETY: every index is inside its tensor: rows are checked against their lengths
    // and the grid covers exactly the [batch, heads] of the inputs.
    unsafe {
        backward_dkv_kernel::launch_unchecked::<R>(
            &client,
            grid(kv_len, h, b),
            CubeDim::new_1d(TILE as u32),
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            grad_out.into_tensor_arg(),
            lse.into_tensor_arg(),
            delta.into_tensor_arg(),
            grad_k.clone().into_tensor_arg(),
            grad_v.clone().into_tensor_arg(),
            scale,
            kind,
            block_len,
            window,
            d,
            dtype.into(),
        );
    }
    (grad_q, grad_k, grad_v)
}
