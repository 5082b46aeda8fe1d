//! Ops with their own backward pass, for training: causal attention ([`attention`]) and rotary
//! embeddings ([`rope`]).
//!
//! Burn 0.21's autodiff records every tensor op a layer is made of, keeps what each one's
//! backward needs and replays them one by one; on the CPU backends each of those is a pass over
//! memory, many through strided views. These ops record one node each, save only their inputs
//! (and, for attention, one number per query row) and compute their gradients in one pass.
//!
//! Rust has no specialisation, and Burn's backend-extension pattern would put a trait bound on
//! every model type. Instead an op is a small struct implementing [`AutodiffOp`], and
//! [`run_on_autodiff`] runs it when the model's backend is `Autodiff<I>` for one of the
//! backends `I` this build compiles in, recognised by type; any other backend gets the op back
//! and uses the composed tensor ops.

pub mod attention;
pub mod rope;

use std::any::{Any, TypeId};

use burn::backend::Autodiff;
use burn::prelude::*;

/// An op for `B` = `Autodiff<I>`, generic over the backend `I` inside.
pub trait AutodiffOp<B: Backend>: Sized {
    type Output;
    /// Runs the op; called only when `B` is `Autodiff<I>` (see [`same`]).
    fn run<I: Backend>(self) -> Self::Output;
}

/// Which inner backends an op supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// The CPU backends (flex, ndarray).
    Host,
    /// Every backend compiled in.
    Any,
}

/// `Ok(op.run::<I>())` when `B` is `Autodiff<I>` for a backend `I` of `inner`; `Err(op)` otherwise.
pub fn run_on_autodiff<B: Backend, Op: AutodiffOp<B>>(
    op: Op,
    inner: Inner,
) -> Result<Op::Output, Op> {
    fn is<B: 'static, I: Backend>() -> bool {
        TypeId::of::<B>() == TypeId::of::<Autodiff<I>>()
    }
    if is::<B, crate::backend::Flex>() {
        return Ok(op.run::<crate::backend::Flex>());
    }
    if is::<B, crate::backend::NdArray>() {
        return Ok(op.run::<crate::backend::NdArray>());
    }
    if inner == Inner::Host {
        return Err(op);
    }
    #[cfg(feature = "wgpu")]
    if is::<B, crate::backend::Wgpu>() {
        return Ok(op.run::<crate::backend::Wgpu>());
    }
    #[cfg(feature = "cuda")]
    {
        use crate::backend::Cuda;
        use burn::tensor::{bf16, f16};
        if is::<B, Cuda<f32>>() {
            return Ok(op.run::<Cuda<f32>>());
        }
        if is::<B, Cuda<f16>>() {
            return Ok(op.run::<Cuda<f16>>());
        }
        if is::<B, Cuda<bf16>>() {
            return Ok(op.run::<Cuda<bf16>>());
        }
    }
    Err(op)
}

/// `value` as `U`, which [`run_on_autodiff`] has checked is its own type.
pub fn same<T: 'static, U: 'static>(value: T) -> U {
    let mut slot = Some(value);
    (&mut slot as &mut dyn Any)
        .downcast_mut::<Option<U>>()
        .and_then(Option::take)
        .expect("run_on_autodiff checked the backend type")
}

/// Whether `B` keeps its tensors in host memory, where the fused loops run.
pub fn on_host<B: Backend>() -> bool {
    let id = TypeId::of::<B>();
    id == TypeId::of::<crate::backend::Flex>() || id == TypeId::of::<crate::backend::NdArray>()
}

/// A tensor's values in logical order, as f32.
pub(crate) fn host_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

pub(crate) fn from_host<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
