//! GPU kernels for Strata, written in CubeCL so that one source runs on CUDA and on wgpu
//! (Vulkan, Metal, DX12).
//!
//! - [`attention`]: flash attention, forward and backward, causal, with an optional block
//!   multi-scale (BMS) pattern that skips whole key tiles: the trainable attention of the
//!   `dense` and `coord3d` attention kinds on the GPU backends.
//! - [`flash_mma`]: causal flash attention on the tensor cores (CUDA, f16 and bf16), forward
//!   and backward: the trainable attention of the `dense` kind where its shapes fit.
//! - [`adamw`]: one AdamW update of a parameter in one launch.
//! - [`matmul`]: matrix products through one named kernel of CubeCL's matmul library, for the
//!   linear layers on the GPU backends.
//! - [`rows`]: RMSNorm forward and backward, a cube per row. [`swiglu`] and [`rope`]: the
//!   SwiGLU gate and the rotary embedding, forward and backward, one element-wise kernel each.
//! - [`cross_entropy`]: cross-entropy over the vocabulary and its gradient, a cube per row.
//! - [`embedding`]: a token embedding's gradient, a cube per token row (atomic f32 adds).
//! - [`softmax`]: the causal softmax of attention scores and its gradient, one kernel each,
//!   for attention computed as matrix products.
//! - [`cublas`]: matrix products through cuBLAS on the CUDA backend.
//! - [`trace`]: the kernels that ran on the GPU and when (CUPTI), for profiling a step.
//!
//! The element-wise and row kernels read and write vectors of up to 16 bytes where strides and
//! lengths allow (`vector_size`).
//!
//! The kernels take and return Burn's GPU tensors ([`CubeTensor`]); the backend types below
//! are the ones they run on. The crate is empty without its `wgpu` or `cuda` feature (`strata`'s
//! features of the same names turn them on).

#[cfg(feature = "gpu")]
pub mod adamw;
#[cfg(feature = "gpu")]
pub mod attention;
#[cfg(feature = "gpu")]
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "gpu")]
pub mod embedding;
#[cfg(feature = "cuda")]
pub mod flash_mma;
#[cfg(feature = "gpu")]
pub mod matmul;
#[cfg(feature = "gpu")]
pub mod rope;
#[cfg(feature = "gpu")]
pub mod rows;
#[cfg(feature = "gpu")]
pub mod softmax;
pub mod strided;
#[cfg(feature = "gpu")]
pub mod swiglu;
#[cfg(feature = "cuda")]
pub mod trace;

#[cfg(feature = "gpu")]
pub use cubek;

#[cfg(feature = "gpu")]
pub use burn_cubecl::{
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement, tensor::CubeTensor,
};

/// A new row-major tensor of `shape` and `dtype` on `like`'s device, its contents undefined.
/// Contiguous, not CubeCL's "optimized" layout, which pads rows to the memory alignment: a
/// padded `[rows, vocab]` tensor (GPT-2's 50 304 bf16 logits) cannot be reshaped without a copy,
/// and two such copies of the logits took 32 ms of a batch-64 GPT-2 step on an H100.
#[cfg(feature = "gpu")]
pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Vec<usize>,
    dtype: burn_backend::DType,
) -> CubeTensor<R> {
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        burn_backend::Shape::from(shape),
        dtype,
    )
}

/// The widest vector (elements per load and store, at most the device's load width: 8 bf16 or
/// 4 f32 values in 16 bytes on CUDA) that every tensor in `tensors` can be read in along its
/// last axis: unit stride there and every other stride and that axis's size multiples of it. A
/// unit reading one 2-byte value at a time leaves the memory system far below its bandwidth
/// (entry 9 of `benches/results/gpu_notes.md`).
#[cfg(feature = "gpu")]
pub(crate) fn vector_size<R: CubeRuntime>(tensors: &[&CubeTensor<R>]) -> usize {
    tensors
        .iter()
        .map(|t| {
            cubecl::tensor_vector_size_parallel(
                t.client.io_optimized_vector_sizes(t.dtype.size()),
                t.meta.shape(),
                t.meta.strides(),
                t.meta.num_dims() - 1,
            )
        })
        .min()
        .unwrap_or(1)
}

/// The launch of `count` cubes of `units` units each on `like`'s client, spread over the grid's
/// axes where one axis cannot hold them; kernels find theirs as `CUBE_POS` and skip positions
/// past `count`.
#[cfg(feature = "gpu")]
pub(crate) fn cubes<R: CubeRuntime>(
    like: &CubeTensor<R>,
    count: usize,
    units: usize,
) -> (cubecl::prelude::CubeCount, cubecl::prelude::CubeDim) {
    let dim = cubecl::prelude::CubeDim::new_1d(units as u32);
    let count = cubecl::calculate_cube_count_elemwise(&like.client, count * units, dim);
    (count, dim)
}

/// Whether `R` is CubeCL's CUDA runtime (always false without the `cuda` feature).
#[cfg(feature = "gpu")]
pub fn is_cuda<R: CubeRuntime>() -> bool {
    #[cfg(feature = "cuda")]
    return std::any::TypeId::of::<R>() == std::any::TypeId::of::<cubecl::cuda::CudaRuntime>();
    #[cfg(not(feature = "cuda"))]
    false
}

/// Burn's wgpu backend without kernel fusion (`burn::backend::Wgpu` when `fusion` is off).
#[cfg(feature = "wgpu")]
pub type Wgpu = CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// Burn's CUDA backend without kernel fusion (`burn::backend::Cuda<F>` when `fusion` is off).
#[cfg(feature = "cuda")]
pub type Cuda<F = f32> = CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;
