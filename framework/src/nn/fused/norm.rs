//! RMSNorm (Zhang & Sennrich, arXiv 1910.07467) with its own backward pass, on the CPU
//! backends: one pass over the rows each way on every core, instead of Burn's square, mean,
//! add, sqrt, divide and scale and their backward ops one by one. With `r = 1/√(mean(x²) + ε)`
//! per row and `g = dy ∘ γ`:
//!
//! ```text
//! y = x·r·γ
//! dx = r·g − x·r³·(g·x)/d      dγ = Σ_rows dy ∘ x·r
//! ```

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use rayon::prelude::*;

use super::{AutodiffOp, CHUNK, HostValues, Inner, dot, from_host, run_on_autodiff, same};

/// `norm.forward(x)`, through this op when `B` is autodiff over a CPU backend in f32, or
/// through the GPU kernels when it is autodiff over a GPU backend they run on.
pub fn rms_norm<B: Backend>(norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let dtype = x.dtype();
    rms_norm_as(norm, x, dtype)
}

/// [`rms_norm`] given in `dtype`: under mixed precision the f32 residual stream normed into
/// the compute type. The GPU kernels write (and read the gradient in) `dtype` directly; the
/// other paths norm in `x`'s type and cast.
pub fn rms_norm_as<B: Backend>(norm: &RmsNorm<B>, x: Tensor<B, 3>, dtype: DType) -> Tensor<B, 3> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match run_on_autodiff(
        gpu::RmsNormOp(x, norm.gamma.val(), norm.epsilon, dtype),
        Inner::Any,
    ) {
        Ok(Ok(y)) => return y,
        Ok(Err(x)) | Err(gpu::RmsNormOp(x, ..)) => x,
    };
    crate::nn::cast_to(rms_norm_in_input_type(norm, x), dtype)
}

/// [`rms_norm`] off the GPU kernels: the host op for f32, Burn's module otherwise.
fn rms_norm_in_input_type<B: Backend>(norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    if x.dtype() != DType::F32 {
        return norm.forward(x);
    }
    match run_on_autodiff(RmsNormOp(x, norm.gamma.val(), norm.epsilon), Inner::Host) {
        Ok(y) => y,
        Err(RmsNormOp(x, _, _)) => norm.forward(x),
    }
}

struct RmsNormOp<B: Backend>(Tensor<B, 3>, Tensor<B, 1>, f64);

impl<B: Backend> AutodiffOp<B> for RmsNormOp<B> {
    type Output = Tensor<B, 3>;

    fn run<I: Backend>(self) -> Tensor<B, 3> {
        same(rms_norm_autodiff::<I>(same(self.0), same(self.1), self.2))
    }
}

/// Saved for backward: the input, γ and each row's `r`.
#[derive(Debug, Clone)]
struct Saved {
    x: HostValues,
    gamma: HostValues,
    inv_rms: Vec<f32>,
    shape: [usize; 3],
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Backend> Backward<B, 2> for RmsNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad =
            Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let device = grad.device();
        let dy = HostValues::of(grad);
        let Saved {
            x,
            gamma,
            inv_rms,
            shape,
        } = ops.state;
        let d = gamma.len();
        let rows_per_task = (CHUNK / d).max(1);
        let mut dx = vec![0.0f32; x.len()];
        let d_gamma = dx
            .par_chunks_mut(rows_per_task * d)
            .zip(dy.par_chunks(rows_per_task * d))
            .zip(x.par_chunks(rows_per_task * d))
            .zip(inv_rms.par_chunks(rows_per_task))
            .map(|(((dx, dy), x), r)| norm_backward((dx, dy, x, r, &gamma[..])))
            .reduce(
                || vec![0.0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        let [parent_x, parent_gamma] = ops.parents;
        if let Some(node) = parent_x {
            let dx = from_host::<B, 3>(dx, shape, &device);
            grads.register::<B>(node.id, dx.into_primitive().tensor());
        }
        if let Some(node) = parent_gamma {
            let d_gamma = from_host::<B, 1>(d_gamma, [d], &device);
            grads.register::<B>(node.id, d_gamma.into_primitive().tensor());
        }
    }
}

fn rms_norm_autodiff<I: Backend>(
    x: Tensor<Autodiff<I>, 3>,
    gamma: Tensor<Autodiff<I>, 1>,
    epsilon: f64,
) -> Tensor<Autodiff<I>, 3> {
    let shape = x.dims();
    let device = x.device();
    let (x, gamma) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
    let xs = HostValues::of(Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(
        x.primitive.clone(),
    )));
    let gs = HostValues::of(Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(
        gamma.primitive.clone(),
    )));
    let d = shape[2];
    let rows_per_task = (CHUNK / d).max(1);
    let mut y = vec![0.0f32; xs.len()];
    let mut inv_rms = vec![0.0f32; xs.len() / d];
    y.par_chunks_mut(rows_per_task * d)
        .zip(inv_rms.par_chunks_mut(rows_per_task))
        .zip(xs.par_chunks(rows_per_task * d))
        .for_each(|((y, r), x)| norm_forward((y, r, x, &gs[..], epsilon as f32)));
    let y = from_host::<I, 3>(y, shape, &device)
        .into_primitive()
        .tensor();
    let y = match RmsNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                x: xs,
                gamma: gs,
                inv_rms,
                shape,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// `y` and each row's `r` (written), then `x`, `γ` and ε.
type ForwardRows<'a> = (&'a mut [f32], &'a mut [f32], &'a [f32], &'a [f32], f32);

simd_kernel! {
    fn norm_forward((y, inv_rms, x, gamma, epsilon): ForwardRows) {
        let d = gamma.len();
        for ((y, r), x) in y.chunks_exact_mut(d).zip(inv_rms).zip(x.chunks_exact(d)) {
            let mean_square = dot(x, x) / d as f32;
            *r = 1.0 / (mean_square + epsilon).sqrt();
            for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
                *y = x * *r * g;
            }
        }
    }
}

/// `dx` (written), then `dy`, `x`, each row's `r`, and `γ`.
type BackwardRows<'a> = (&'a mut [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

simd_kernel! {
    /// Writes `dx` for the rows given and returns their part of `dγ`.
    fn norm_backward((dx, dy, x, inv_rms, gamma): BackwardRows) -> Vec<f32> {
        let d = gamma.len();
        let mut d_gamma = vec![0.0f32; d];
        for (((dx, dy), x), &r) in dx
            .chunks_exact_mut(d)
            .zip(dy.chunks_exact(d))
            .zip(x.chunks_exact(d))
            .zip(inv_rms)
        {
            let gx = dot3(dy, gamma, x);
            let c = r * r * r * gx / d as f32;
            let elements = dx.iter_mut().zip(dy).zip(x).zip(gamma).zip(&mut d_gamma);
            for ((((dx, &dy), &x), &g), dg) in elements {
                *dx = r * dy * g - x * c;
                *dg += dy * x * r;
            }
        }
        d_gamma
    }
}

/// `Σ a·b·c` in eight lanes.
#[inline(always)]
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for ((a, b), c) in a.chunks(8).zip(b.chunks(8)).zip(c.chunks(8)) {
        for (((lane, a), b), c) in lanes.iter_mut().zip(a).zip(b).zip(c) {
            *lane += a * b * c;
        }
    }
    lanes.iter().sum()
}

/// The same op through the kernels of `strata_kernels::rows`, saving `x`, `γ` and each row's
/// `r` on the device.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod gpu {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::prelude::*;
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, TensorPrimitive};

    use super::super::{AutodiffOp, kernel, same};

    /// x, γ, ε and the output's type.
    pub(super) struct RmsNormOp<B: Backend>(pub Tensor<B, 3>, pub Tensor<B, 1>, pub f64, pub DType);

    impl<B: Backend> AutodiffOp<B> for RmsNormOp<B> {
        /// `Err(x)` where the kernels do not run: another backend, or `γ` of another type.
        type Output = Result<Tensor<B, 3>, Tensor<B, 3>>;

        fn run<I: Backend>(self) -> Self::Output {
            let RmsNormOp(x, gamma, epsilon, y_dtype) = self;
            if !kernel::elementwise_chosen::<I>() || x.dtype() != gamma.dtype() {
                return Err(x);
            }
            Ok(same(forward::<I>(
                same(x),
                same(gamma),
                epsilon as f32,
                y_dtype,
            )))
        }
    }

    #[derive(Debug)]
    struct RmsNormKernelBackward;

    impl<B: Backend> Backward<B, 2> for RmsNormKernelBackward {
        /// `x` as `[rows, d]`, `γ`, each row's `r`, and `x`'s shape.
        type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, [usize; 3]);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, gamma, inv_rms, shape) = ops.state;
            let wrap2 = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
            let wrap1 = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
            let (x, gamma, inv_rms) = (wrap2(x), wrap1(gamma), wrap1(inv_rms));
            let grad_y = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(
                grads.consume::<B>(&ops.node),
            ))
            .reshape(x.dims());
            let dtype = gamma.dtype();
            let (grad_x, grad_gamma) = kernel::rms_norm_grad(x, gamma, inv_rms, grad_y);
            let [parent_x, parent_gamma] = ops.parents;
            if let Some(node) = parent_x {
                grads.register::<B>(node.id, grad_x.reshape(shape).into_primitive().tensor());
            }
            if let Some(node) = parent_gamma {
                let grad_gamma = grad_gamma.cast(dtype);
                grads.register::<B>(node.id, grad_gamma.into_primitive().tensor());
            }
        }
    }

    fn forward<I: Backend>(
        x: Tensor<Autodiff<I>, 3>,
        gamma: Tensor<Autodiff<I>, 1>,
        epsilon: f32,
        y_dtype: DType,
    ) -> Tensor<Autodiff<I>, 3> {
        let shape = x.dims();
        let (x, gamma) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
        let rows = Tensor::<I, 3>::from_primitive(TensorPrimitive::Float(x.primitive.clone()))
            .reshape([shape[0] * shape[1], shape[2]]);
        let g = Tensor::<I, 1>::from_primitive(TensorPrimitive::Float(gamma.primitive.clone()));
        let (y, inv_rms) = kernel::rms_norm(rows.clone(), g.clone(), epsilon, y_dtype);
        let y = y.reshape(shape).into_primitive().tensor();
        let y = match RmsNormKernelBackward
            .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    rows.into_primitive().tensor(),
                    g.into_primitive().tensor(),
                    inv_rms.into_primitive().tensor(),
                    shape,
                );
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}
