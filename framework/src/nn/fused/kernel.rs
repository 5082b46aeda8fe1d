//! The CubeCL flash-attention kernels of `strata-kernels` (kernels/), called on Burn tensors of
//! the GPU backends: wgpu and CUDA without kernel fusion (Burn's fusion backend wraps tensors in
//! its own stream, which these kernels do not join; with `fusion` on, attention takes the tensor
//! ops).
//!
//! They are opt-in: `STRATA_FLASH_KERNEL=1` in the environment turns them on. Measured on an
//! H200 (benches/results/flash_attention_gpu.csv) they keep no n×n scores (peak device memory
//! 1.9 GB against 15.9 GB at 16k tokens), but are slower than the tensor ops they replace: the
//! forward pass is even at head size 64 and the backward pass 2× slower; at head size 128 each
//! unit's rows spill out of registers and they are 3–20× slower. Until they use the tensor
//! cores and fit their registers, they are for runs whose scores do not fit in memory.

use std::any::TypeId;

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use strata_kernels::attention::{self as flash, MAX_HEAD_DIM};
use strata_kernels::{BoolElement, CubeBackend, CubeRuntime, CubeTensor, FloatElement, IntElement};

pub use strata_kernels::attention::Pattern;

use super::same;
use crate::nn::coord3d::Bms;

impl From<Bms> for Pattern {
    fn from(bms: Bms) -> Self {
        Pattern::Bms {
            block_len: bms.block_len,
            window: bms.window,
            multiscale: bms.multiscale,
        }
    }
}

/// A Burn backend whose float tensors are CubeCL tensors of `Runtime`.
pub trait OnCube: Backend<FloatTensorPrimitive = CubeTensor<Self::Runtime>> {
    type Runtime: CubeRuntime;
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> OnCube
    for CubeBackend<R, F, I, BT>
{
    type Runtime = R;
}

/// An op to run on whichever [`OnCube`] backend `B` turns out to be.
trait CubeOp {
    type Output;
    fn run<C: OnCube>(self) -> Self::Output;
}

fn is<B: Backend, C: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<C>()
}

/// Whether the environment turns the kernels on (`STRATA_FLASH_KERNEL=1`).
pub fn enabled() -> bool {
    std::env::var("STRATA_FLASH_KERNEL").is_ok_and(|v| v == "1")
}

/// Whether `B` is a backend the kernels run on.
fn kernel_backend<B: Backend>() -> bool {
    struct Probe;
    impl CubeOp for Probe {
        type Output = ();
        fn run<C: OnCube>(self) {}
    }
    run_on_cube::<B, _>(Probe).is_some()
}

/// `op` run on `B` when `B` is one of the [`OnCube`] backends compiled in.
fn run_on_cube<B: Backend, Op: CubeOp>(op: Op) -> Option<Op::Output> {
    #[cfg(feature = "wgpu")]
    if is::<B, strata_kernels::Wgpu>() {
        return Some(op.run::<strata_kernels::Wgpu>());
    }
    #[cfg(feature = "cuda")]
    {
        use burn::tensor::{bf16, f16};
        use strata_kernels::Cuda;
        if is::<B, Cuda<f32>>() {
            return Some(op.run::<Cuda<f32>>());
        }
        if is::<B, Cuda<f16>>() {
            return Some(op.run::<Cuda<f16>>());
        }
        if is::<B, Cuda<bf16>>() {
            return Some(op.run::<Cuda<bf16>>());
        }
    }
    None
}

/// Whether the kernels can compute attention of queries of shape `q` (`[batch, heads, q_len,
/// head_dim]`) over keys of shape `k` with this pattern on backend `B`.
pub fn applies<B: Backend>(q: [usize; 4], k: [usize; 4], pattern: Pattern) -> bool {
    let [_, heads, q_len, head_dim] = q;
    let [_, kv_heads, kv_len, _] = k;
    kernel_backend::<B>()
        && heads == kv_heads
        && head_dim <= MAX_HEAD_DIM
        && pattern.fits(q_len, kv_len)
}

/// Whether the model's attention takes the kernels here: [`enabled`] and [`applies`].
pub fn chosen<B: Backend>(q: [usize; 4], k: [usize; 4], pattern: Pattern) -> bool {
    enabled() && applies::<B>(q, k, pattern)
}

fn cube<C: OnCube, B: Backend, const D: usize>(t: Tensor<B, D>) -> CubeTensor<C::Runtime> {
    same::<_, Tensor<C, D>>(t).into_primitive().tensor()
}

fn burn<C: OnCube, B: Backend, const D: usize>(t: CubeTensor<C::Runtime>) -> Tensor<B, D> {
    same(Tensor::<C, D>::from_primitive(TensorPrimitive::Float(t)))
}

struct Forward<B: Backend>(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Pattern);

impl<B: Backend> CubeOp for Forward<B> {
    type Output = (Tensor<B, 4>, Tensor<B, 3>);
    fn run<C: OnCube>(self) -> Self::Output {
        let Forward(q, k, v, pattern) = self;
        let (out, lse) = flash::forward(
            cube::<C, B, 4>(q),
            cube::<C, B, 4>(k),
            cube::<C, B, 4>(v),
            pattern,
        );
        (burn::<C, B, 4>(out), burn::<C, B, 3>(lse))
    }
}

struct Backward<B: Backend> {
    qkv: [Tensor<B, 4>; 3],
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    grad_out: Tensor<B, 4>,
    pattern: Pattern,
}

impl<B: Backend> CubeOp for Backward<B> {
    type Output = [Tensor<B, 4>; 3];
    fn run<C: OnCube>(self) -> Self::Output {
        let [q, k, v] = self.qkv;
        let (dq, dk, dv) = flash::backward(
            cube::<C, B, 4>(q),
            cube::<C, B, 4>(k),
            cube::<C, B, 4>(v),
            cube::<C, B, 4>(self.out),
            cube::<C, B, 3>(self.lse),
            cube::<C, B, 4>(self.grad_out),
            self.pattern,
        );
        [dq, dk, dv].map(burn::<C, B, 4>)
    }
}

/// Output and row log-sum-exp (f32); call only where [`applies`] holds.
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    pattern: Pattern,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    run_on_cube::<B, _>(Forward(q, k, v, pattern)).expect("called where `applies` holds")
}

/// Gradients of q, k and v; call only where [`applies`] holds.
pub fn backward<B: Backend>(
    qkv: [Tensor<B, 4>; 3],
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    grad_out: Tensor<B, 4>,
    pattern: Pattern,
) -> [Tensor<B, 4>; 3] {
    run_on_cube::<B, _>(Backward {
        qkv,
        out,
        lse,
        grad_out,
        pattern,
    })
    .expect("called where `applies` holds")
}
