//! Matrix products of Burn's GPU tensors through one chosen kernel of cubek-matmul, CubeCL's
//! matmul library (the one Burn's GPU backends call).
//!
//! Without its `autotune` feature Burn launches cubek's `Auto` strategy for every product: the
//! simple cyclic tensor-core kernel with default tiles. On an H100 that ran a GPT-2-small
//! training step's products at 34 TFLOP/s in bf16, about as fast as in f32, where cuBLAS ran
//! them at 464 (benches/results/gpu_notes.md, entry 3). The `autotune` feature tries a set of
//! kernels per product shape on first use instead, which takes minutes per model. Here the
//! caller names the kernel: [`KERNELS`] lists the tensor-core ones Burn's autotuner tries, by a
//! short name, and `strata bench-matmul` times each of them on a model's products.

use burn_backend::{DType, Shape, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubek::matmul::components::tile::TileMatmulKind;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{Strategy, launch_ref};
use cubek::matmul::routines::BlueprintStrategy;
use cubek::matmul::routines::double_buffering::DoubleBufferingArgs;
use cubek::matmul::routines::ordered_double_buffering::OrderedSelectionArgs;
use cubek::matmul::routines::simple::SimpleArgs;
use cubek::std::InputBinding;

/// The kernels by name, in the order `strata bench-matmul` tries them. `cmma` kernels use the
/// portable warp-matrix instructions, `mma` ones the PTX `mma` instructions; `double` ones
/// double-buffer shared memory;
/// `specialized` ones give loading and computing to different warps; the `unit` ones use no
/// tensor cores (each unit computes its own small tile), and run where those are missing.
///
/// Left out: the kernels that load tiles with Hopper's tensor-memory accelerator (`tma`). On an
/// H100 in bf16 the first of them failed inside the launch ("Tile shape must be non-zero and
/// <= 256") after returning, which left the CUDA client unusable for every later product.
pub const KERNELS: &[&str] = &[
    "burn",
    CUBLAS,
    "simple_cyclic_cmma",
    "simple_cyclic_mma",
    "simple_cyclic_mma_multi_rows",
    "ordered_double_cmma",
    "ordered_double_mma",
    "ordered_double_mma_8_rows",
    "double_cyclic_cmma",
    "double_cyclic_mma",
    "double_cyclic_mma_specialized",
    "specialized_cyclic_cmma",
    "specialized_cyclic_mma",
    "simple_unit",
    "double_unit",
];

/// The name of cuBLAS in [`KERNELS`]: not a cubek kernel, and CUDA only.
pub const CUBLAS: &str = "cublas";

/// The cubek strategy of a kernel of [`KERNELS`] (`burn`: Burn's default, `Auto`); `None` for
/// [`CUBLAS`] and unknown names.
pub fn strategy(name: &str) -> Option<Strategy> {
    use BlueprintStrategy::Inferred;
    use TileMatmulKind::{Cmma, Mma};
    let simple = |tile_matmul, multi_rows| SimpleArgs {
        tile_matmul,
        multi_rows,
    };
    let double = |tile_matmul, specialized| DoubleBufferingArgs {
        tile_matmul,
        specialized,
    };
    let ordered = |tile_matmul, row_count| OrderedSelectionArgs {
        tile_matmul,
        partition_k: Some(2),
        row_count: Some(row_count),
        rows_per_plane: Some(2),
    };
    Some(match name {
        "burn" => Strategy::Auto,
        "simple_cyclic_cmma" => Strategy::SimpleCyclicCmma(Inferred(simple(Cmma, false))),
        "simple_cyclic_mma" => Strategy::SimpleCyclicMma(Inferred(simple(Mma, false))),
        "simple_cyclic_mma_multi_rows" => Strategy::SimpleCyclicMma(Inferred(simple(Mma, true))),
        "ordered_double_cmma" => Strategy::OrderedDoubleCmma(Inferred(ordered(Cmma, 4))),
        "ordered_double_mma" => Strategy::OrderedDoubleMma(Inferred(ordered(Mma, 4))),
        "ordered_double_mma_8_rows" => Strategy::OrderedDoubleMma(Inferred(ordered(Mma, 8))),
        "double_cyclic_cmma" => Strategy::DoubleCyclicCmma(Inferred(double(Cmma, false))),
        "double_cyclic_mma" => Strategy::DoubleCyclicMma(Inferred(double(Mma, false))),
        "double_cyclic_mma_specialized" => Strategy::DoubleCyclicMma(Inferred(double(Mma, true))),
        "specialized_cyclic_cmma" => Strategy::SpecializedCyclicCmma(Inferred(().into())),
        "specialized_cyclic_mma" => Strategy::SpecializedCyclicMma(Inferred(().into())),
        "simple_unit" => Strategy::SimpleUnit(Inferred(Default::default())),
        "double_unit" => Strategy::DoubleUnit(Inferred(Default::default())),
        _ => return None,
    })
}

/// The kernels take products whose inner size `k` is a multiple of [`K_MULTIPLE`] and whose
/// column count `n` is a multiple of [`N_MULTIPLE`]: the ground they were checked on. On an H100
/// every kernel matched a naive product at 70 × 48 × 36 and 70 × 64 × 36, in the three layouts
/// and batched; through `double_cyclic_mma` the fused attention op's products (inner size 32, 5
/// or 77 rows, 77 columns) came out wrong by 0.4 at scale 1, not yet explained (a column count
/// that no vector width divides is one difference). Every projection of the GPT-2 and Llama
/// shapes is on that ground; a vocabulary of odd size is not, and its LM head takes Burn's
/// kernel. Attention does not use these kernels (it takes cuBLAS where that is chosen).
pub const K_MULTIPLE: usize = 32;
pub const N_MULTIPLE: usize = 4;

/// Whether `kernel` takes a product of inner size `k` and `n` columns: cuBLAS takes every size.
pub fn takes(kernel: &str, k: usize, n: usize) -> bool {
    kernel == CUBLAS || on_checked_ground(k, n)
}

fn on_checked_ground(k: usize, n: usize) -> bool {
    k.is_multiple_of(K_MULTIPLE) && n.is_multiple_of(N_MULTIPLE)
}

/// `lhs · rhs` (as [`matmul`]) through the kernel `name` of [`KERNELS`]: an error for an unknown
/// name, cuBLAS off CUDA, or a product the kernel cannot run.
pub fn matmul_named<R: CubeRuntime>(
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
    name: &str,
) -> Result<CubeTensor<R>, String> {
    if name == CUBLAS {
        #[cfg(feature = "cuda")]
        return crate::cublas::matmul_on(lhs, rhs, false);
        #[cfg(not(feature = "cuda"))]
        return Err("cuBLAS runs on the CUDA backend only".into());
    }
    let strategy = strategy(name).ok_or_else(|| format!("no matmul kernel {name}"))?;
    matmul(lhs, rhs, &strategy)
}

/// `lhs · rhs` for `lhs: [..., m, k]` and `rhs: [..., k, n]` with the same leading (batch)
/// sizes (either may be a transposed or sliced view: the kernels read operands through their
/// strides), into a new `[..., m, n]` tensor of `lhs`'s type, accumulated in f32. An error when
/// the kernel cannot run this product (a tile shape that does not divide it, an instruction the
/// device lacks): the caller falls back to another kernel.
pub fn matmul<R: CubeRuntime>(
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
    strategy: &Strategy,
) -> Result<CubeTensor<R>, String> {
    let (a, b) = (lhs.shape().to_vec(), rhs.shape().to_vec());
    let rank = a.len();
    let [_, k, n] = crate::strided::product_sizes(&a, &b)
        .ok_or_else(|| format!("matmul: {a:?} · {b:?}: shapes do not multiply"))?;
    if !on_checked_ground(k, n) {
        return Err(format!(
            "matmul: inner size {k} and {n} columns: the kernels take multiples of \
             {K_MULTIPLE} and {N_MULTIPLE}"
        ));
    }
    let dtype: DType = lhs.dtype;
    if rhs.dtype != dtype {
        return Err(format!("matmul: {dtype:?} · {:?}: types differ", rhs.dtype));
    }
    let mut shape = a.clone();
    shape[rank - 1] = b[rank - 1];
    let out = empty_device_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::from(shape),
        dtype,
    );
    let client = out.client.clone();
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype.into(),
        rhs: dtype.into(),
        out: dtype.into(),
    });
    launch_ref(
        strategy,
        &client,
        InputBinding::new(lhs.binding(), dtype.into()),
        InputBinding::new(rhs.binding(), dtype.into()),
        out.clone().binding(),
        &mut dtypes,
    )
    .map_err(|err| format!("{err:?}"))?;
    Ok(out)
}
