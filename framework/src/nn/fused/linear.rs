//! `y = x·W` with its own backward pass, for two backends:
//!
//! - the Flex CPU backend: every product reads its operands where they lie, transposed ones
//!   through their strides, and writes into a buffer it allocates once. Burn's linear on Flex
//!   allocates each output zeroed and then copies it to realign it, and its backward transposes
//!   the weight into a copy first: together about a tenth of the default model's training step,
//!   all on one thread.
//! - the GPU backends, where a matmul kernel is chosen (`STRATA_MATMUL`, or cuBLAS by default on
//!   CUDA; `nn::fused::kernel`): the three products run through that kernel instead of the one
//!   Burn picks.
//!
//! ```text
//! y = x·W      dx = dy·Wᵀ      dW = xᵀ·dy       (x: [rows, d_in], W: [d_in, d_out])
//! ```

use std::any::TypeId;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;

#[cfg(any(feature = "wgpu", feature = "cuda"))]
use super::kernel;
use super::{AutodiffOp, Inner, Strided, from_host, matmul_new, run_on_autodiff, same};
use crate::backend::Flex;

/// `x·W` for `x: [rows, d_in]` and `W: [d_in, d_out]`, through this op when `B` is autodiff
/// over Flex in f32 or over a GPU backend with a chosen matmul kernel, through Burn's `linear`
/// otherwise.
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    linear_on(x, weight, true)
}

/// `a·b` for `a: [m, k]` and `b: [k, n]` where `b` may be a transposed view (the tied LM head),
/// through the chosen GPU matmul kernel where there is one and Burn's product otherwise (the
/// Flex op would copy a transposed `b` first).
pub fn matmul_rows<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    linear_on(a, b, false)
}

fn linear_on<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, flex: bool) -> Tensor<B, 2> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if kernel::matmul_chosen::<B>() {
        return kernel::matmul(x, weight);
    }
    match run_on_autodiff(LinearOp(x, weight, flex), Inner::Any) {
        Ok(y) => y,
        Err(LinearOp(x, weight, _)) => x.matmul(weight),
    }
}

/// x, W, and whether the Flex op may run.
struct LinearOp<B: Backend>(Tensor<B, 2>, Tensor<B, 2>, bool);

impl<B: Backend> AutodiffOp<B> for LinearOp<B> {
    type Output = Tensor<B, 2>;

    fn run<I: Backend>(self) -> Tensor<B, 2> {
        let (x, weight): (Tensor<Autodiff<I>, 2>, Tensor<Autodiff<I>, 2>) =
            (same(self.0), same(self.1));
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        if kernel::matmul_chosen::<I>() {
            return same(cube::linear_autodiff::<I>(x, weight));
        }
        let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
        if TypeId::of::<I>() != TypeId::of::<Flex>() || !f32s || !self.2 {
            return same(x.matmul(weight));
        }
        same(linear_autodiff::<I>(x, weight))
    }
}

/// A Flex tensor's values as a row-major matrix, copied only if its layout is not contiguous.
fn rows_of<B: Backend>(t: FloatTensor<B>) -> FlexTensor {
    let t: FlexTensor = same(t);
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// The `[m, n]` product of `a` (`[m, k]`) and `b` (`[k, n]`) as a Flex tensor, on every core.
fn product(m: usize, n: usize, k: usize, a: Strided, b: Strided) -> Tensor<Flex, 2> {
    let out = matmul_new([m, n, k], a, b, true);
    from_host::<Flex, 2>(out, [m, n], &Default::default())
}

#[derive(Debug)]
struct LinearBackward;

impl<B: Backend> Backward<B, 2> for LinearBackward {
    /// x and W.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = rows_of::<B>(grads.consume::<B>(&ops.node));
        let (x, weight) = ops.state;
        let (x, weight) = (rows_of::<B>(x), rows_of::<B>(weight));
        let [rows, d_out] = [dy.layout().shape()[0], dy.layout().shape()[1]];
        let d_in = weight.layout().shape()[0];
        let [parent_x, parent_weight] = ops.parents;
        if let Some(node) = parent_x {
            let dy = Strided::rows(values(&dy), d_out);
            let dx = product(
                rows,
                d_in,
                d_out,
                dy,
                Strided::columns(values(&weight), d_out),
            );
            grads.register::<B>(node.id, same(dx.into_primitive().tensor()));
        }
        if let Some(node) = parent_weight {
            let x = Strided::columns(values(&x), d_in);
            let dw = product(d_in, d_out, rows, x, Strided::rows(values(&dy), d_out));
            grads.register::<B>(node.id, same(dw.into_primitive().tensor()));
        }
    }
}

fn linear_autodiff<I: Backend>(
    x: Tensor<Autodiff<I>, 2>,
    weight: Tensor<Autodiff<I>, 2>,
) -> Tensor<Autodiff<I>, 2> {
    let [rows, d_in] = x.dims();
    let d_out = weight.dims()[1];
    let (x, weight) = (
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let nodes = [x.node.clone(), weight.node.clone()];
    let (xs, ws) = (rows_of::<I>(x.primitive), rows_of::<I>(weight.primitive));
    let x_rows = Strided::rows(values(&xs), d_in);
    let y = product(rows, d_out, d_in, x_rows, Strided::rows(values(&ws), d_out));
    let y: FloatTensor<I> = same(y.into_primitive().tensor());
    let y = match LinearBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((same(xs), same(ws)), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// The op on a GPU backend `I`, its three products through the chosen matmul kernel.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube {
    use super::*;

    fn tensor<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    #[derive(Debug)]
    struct CubeLinearBackward;

    impl<B: Backend> Backward<B, 2> for CubeLinearBackward {
        /// x and W.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dy = tensor::<B>(grads.consume::<B>(&ops.node));
            let (x, weight) = (tensor::<B>(ops.state.0), tensor::<B>(ops.state.1));
            let [parent_x, parent_weight] = ops.parents;
            // The transposes are views: the kernels read them through their strides.
            if let Some(node) = parent_x {
                let dx = kernel::matmul(dy.clone(), weight.transpose());
                grads.register::<B>(node.id, dx.into_primitive().tensor());
            }
            if let Some(node) = parent_weight {
                let dw = kernel::matmul(x.transpose(), dy);
                grads.register::<B>(node.id, dw.into_primitive().tensor());
            }
        }
    }

    pub(super) fn linear_autodiff<I: Backend>(
        x: Tensor<Autodiff<I>, 2>,
        weight: Tensor<Autodiff<I>, 2>,
    ) -> Tensor<Autodiff<I>, 2> {
        let (x, weight) = (
            x.into_primitive().tensor(),
            weight.into_primitive().tensor(),
        );
        let nodes = [x.node.clone(), weight.node.clone()];
        let (xs, ws) = (x.primitive, weight.primitive);
        let y = kernel::matmul(tensor::<I>(xs.clone()), tensor::<I>(ws.clone()));
        let y = y.into_primitive().tensor();
        let y = match CubeLinearBackward
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xs, ws), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}
