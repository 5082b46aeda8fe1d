//! The SwiGLU gate `silu(gate) · up` (Shazeer, arXiv 2002.05202) with its own backward pass,
//! on the CPU backends. Composed of tensor ops it is a sigmoid (exp, add, reciprocal), two
//! products, and twice as many passes backward, each on one thread; here it is one pass each
//! way on every core:
//!
//! ```text
//! σ = 1 / (1 + e^(−g))     out = g·σ·u
//! du = dout · g·σ          dg = dout · u · σ·(1 + g·(1 − σ))
//! ```

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{DType, TensorPrimitive};
use rayon::prelude::*;

use super::{AutodiffOp, CHUNK, HostValues, Inner, exp, from_host, run_on_autodiff, same};

/// `silu(gate) · up`, through this op when `B` is autodiff over a CPU backend in f32, or
/// through the GPU kernels when it is autodiff over a GPU backend they run on.
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let (gate, up) = match run_on_autodiff(gpu::SwigluOp(gate, up), Inner::Any) {
        Ok(Ok(out)) => return out,
        Ok(Err((gate, up))) | Err(gpu::SwigluOp(gate, up)) => (gate, up),
    };
    if gate.dtype() != DType::F32 {
        return silu(gate) * up;
    }
    match run_on_autodiff(SwigluOp(gate, up), Inner::Host) {
        Ok(out) => out,
        Err(SwigluOp(gate, up)) => silu(gate) * up,
    }
}

struct SwigluOp<B: Backend>(Tensor<B, 3>, Tensor<B, 3>);

impl<B: Backend> AutodiffOp<B> for SwigluOp<B> {
    type Output = Tensor<B, 3>;

    fn run<I: Backend>(self) -> Tensor<B, 3> {
        same(swiglu_autodiff::<I>(same(self.0), same(self.1)))
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: Backend> Backward<B, 2> for SwigluBackward {
    /// The gate and up values.
    type State = (HostValues, HostValues, [usize; 3]);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad =
            Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let device = grad.device();
        let grad = HostValues::of(grad);
        let (gate, up, shape) = ops.state;
        let (mut d_gate, mut d_up) = (vec![0.0f32; gate.len()], vec![0.0f32; gate.len()]);
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(((dg, du), dout), (g, u))| gate_backward((dg, du, dout, g, u)));
        let [parent_gate, parent_up] = ops.parents;
        for (parent, grad) in [(parent_gate, d_gate), (parent_up, d_up)] {
            if let Some(node) = parent {
                let grad = from_host::<B, 3>(grad, shape, &device);
                grads.register::<B>(node.id, grad.into_primitive().tensor());
            }
        }
    }
}

fn swiglu_autodiff<I: Backend>(
    gate: Tensor<Autodiff<I>, 3>,
    up: Tensor<Autodiff<I>, 3>,
) -> Tensor<Autodiff<I>, 3> {
    let shape = gate.dims();
    let device = gate.device();
    let (gate, up) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let nodes = [gate.node.clone(), up.node.clone()];
    // Moved, not cloned, out of the autodiff tensors: a buffer nothing else holds converts
    // to a vector without a copy.
    let values = |p| HostValues::of(Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(p)));
    let (g, u) = (values(gate.primitive), values(up.primitive));
    let mut out = vec![0.0f32; g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(out, (g, u))| gate_forward((out, g, u)));
    let out = from_host::<I, 3>(out, shape, &device)
        .into_primitive()
        .tensor();
    let out = match SwigluBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((g, u, shape), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

simd_kernel! {
    fn gate_forward((out, gate, up): (&mut [f32], &[f32], &[f32])) {
        for ((out, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *out = g / (1.0 + exp(-g)) * u;
        }
    }
}

/// `d_gate` and `d_up` (written), then `d_out`, `gate` and `up`.
type BackwardChunk<'a> = (
    &'a mut [f32],
    &'a mut [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

simd_kernel! {
    fn gate_backward((d_gate, d_up, d_out, gate, up): BackwardChunk) {
        let elements = d_gate.iter_mut().zip(d_up).zip(d_out).zip(gate).zip(up);
        for ((((dg, du), &dout), &g), &u) in elements {
            let sigmoid = 1.0 / (1.0 + exp(-g));
            *du = dout * g * sigmoid;
            *dg = dout * u * sigmoid * (1.0 + g * (1.0 - sigmoid));
        }
    }
}

/// The same op through the kernels of `strata_kernels::swiglu`, saving the inputs on the
/// device.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod gpu {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::prelude::*;
    use burn::tensor::TensorPrimitive;
    use burn::tensor::ops::FloatTensor;

    use super::super::{AutodiffOp, kernel, same};

    pub(super) struct SwigluOp<B: Backend>(pub Tensor<B, 3>, pub Tensor<B, 3>);

    impl<B: Backend> AutodiffOp<B> for SwigluOp<B> {
        /// The inputs back where the kernels do not run: another backend, or inputs of
        /// different types.
        type Output = Result<Tensor<B, 3>, (Tensor<B, 3>, Tensor<B, 3>)>;

        fn run<I: Backend>(self) -> Self::Output {
            let SwigluOp(gate, up) = self;
            if !kernel::elementwise_chosen::<I>() || gate.dtype() != up.dtype() {
                return Err((gate, up));
            }
            Ok(same(forward::<I>(same(gate), same(up))))
        }
    }

    #[derive(Debug)]
    struct SwigluKernelBackward;

    impl<B: Backend> Backward<B, 2> for SwigluKernelBackward {
        /// The flat gate and up values, and their shape.
        type State = (FloatTensor<B>, FloatTensor<B>, [usize; 3]);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (gate, up, shape) = ops.state;
            let wrap = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
            let grad_out = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(
                grads.consume::<B>(&ops.node),
            ))
            .reshape([shape.iter().product::<usize>()]);
            let (grad_gate, grad_up) = kernel::swiglu_grad(wrap(gate), wrap(up), grad_out);
            let [parent_gate, parent_up] = ops.parents;
            for (parent, grad) in [(parent_gate, grad_gate), (parent_up, grad_up)] {
                if let Some(node) = parent {
                    grads.register::<B>(node.id, grad.reshape(shape).into_primitive().tensor());
                }
            }
        }
    }

    fn forward<I: Backend>(
        gate: Tensor<Autodiff<I>, 3>,
        up: Tensor<Autodiff<I>, 3>,
    ) -> Tensor<Autodiff<I>, 3> {
        let shape = gate.dims();
        let (gate, up) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
        let flat = |p: &FloatTensor<I>| {
            Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(p.clone()))
                .reshape([shape.iter().product::<usize>()])
        };
        let (g, u) = (flat(&gate.primitive), flat(&up.primitive));
        let out = kernel::swiglu(g.clone(), u.clone())
            .reshape(shape)
            .into_primitive()
            .tensor();
        let out = match SwigluKernelBackward
            .prepare::<NoCheckpointing>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    g.into_primitive().tensor(),
                    u.into_primitive().tensor(),
                    shape,
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
