//! Mean cross-entropy with its own backward pass, on the CPU backends. Composed, it is a
//! log-softmax (max, subtract, exp, sum, log, subtract), a gather and a mean, each a pass on one
//! thread and each with its backward op; here the forward pass is one loop over the rows on every
//! core, and the gradient is the softmax it already computed minus the targets' one-hot rows:
//!
//! ```text
//! loss = Σₙ wₙ·(lseₙ − zₙ[tₙ])      dz = dloss · wₙ·(softmax(zₙ) − onehot(tₙ))
//! ```
//!
//! with `wₙ = 1/N`, or `maskₙ / Σ mask` for a masked loss.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use rayon::prelude::*;

use super::{
    AutodiffOp, CHUNK, HostValues, Inner, from_host, host_vec, run_on_autodiff, same, softmax,
};

/// Logits `[rows, vocab]`, target ids `[rows]` and an optional 0/1 mask `[rows]`.
pub type LossInputs<B> = (Tensor<B, 2>, Tensor<B, 1, Int>, Option<Tensor<B, 1>>);

/// Mean of −log softmax(logits)[target] over the rows (those where `mask` is 1, if given; 0
/// when none is), an f32 loss whatever the logits' type: through the GPU kernels when `B` is
/// autodiff over a GPU backend they run on (they read the logits in their type, in f32
/// arithmetic, and give their gradient in it), else through this op when `B` is autodiff over
/// a CPU backend (on the logits widened to f32); `Err` gives the inputs back otherwise (f32
/// logits).
pub fn cross_entropy_trained<B: Backend>(
    (logits, targets, mask): LossInputs<B>,
) -> Result<Tensor<B, 1>, LossInputs<B>> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let (logits, targets, mask) =
        match run_on_autodiff(gpu::LossOp(logits, targets, mask), Inner::Any) {
            Ok(Ok(loss)) => return Ok(loss),
            Ok(Err(inputs)) => inputs,
            Err(gpu::LossOp(logits, targets, mask)) => (logits, targets, mask),
        };
    // Widening is exact, and the cast's backward rounds the f32 gradient back, so this is the
    // arithmetic of the kernels above.
    let logits = crate::nn::cast_to(logits, DType::F32);
    run_on_autodiff(LossOp(logits, targets, mask), Inner::Host).map_err(|op| (op.0, op.1, op.2))
}

struct LossOp<B: Backend>(Tensor<B, 2>, Tensor<B, 1, Int>, Option<Tensor<B, 1>>);

impl<B: Backend> AutodiffOp<B> for LossOp<B> {
    type Output = Tensor<B, 1>;

    fn run<I: Backend>(self) -> Tensor<B, 1> {
        let targets: Vec<i64> = self.1.into_data().convert::<i64>().into_vec().expect("i64");
        let mask = self.2.map(host_vec);
        same(cross_entropy_autodiff::<I>(same(self.0), targets, mask))
    }
}

/// Saved for backward: each row's softmax and weight, and the targets.
#[derive(Debug, Clone)]
struct Saved {
    probs: HostValues,
    weights: Vec<f32>,
    targets: Vec<i64>,
    shape: [usize; 2],
}

#[derive(Debug)]
struct LossBackward;

impl<B: Backend> Backward<B, 1> for LossBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad =
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let device = grad.device();
        let d_loss = host_vec(grad)[0];
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let Saved {
            mut probs,
            weights,
            targets,
            shape,
        } = ops.state;
        let vocab = shape[1];
        let rows_per_task = (CHUNK / vocab).max(1);
        probs
            .par_chunks_mut(rows_per_task * vocab)
            .zip(weights.par_chunks(rows_per_task))
            .zip(targets.par_chunks(rows_per_task))
            .for_each(|((rows, weights), targets)| {
                for ((row, &w), &t) in rows.chunks_exact_mut(vocab).zip(weights).zip(targets) {
                    let scale = d_loss * w;
                    row.iter_mut().for_each(|p| *p *= scale);
                    row[t as usize] -= scale;
                }
            });
        let d_logits = probs.into_tensor::<B, 2>(&device);
        grads.register::<B>(node.id, d_logits.into_primitive().tensor());
    }
}

fn cross_entropy_autodiff<I: Backend>(
    logits: Tensor<Autodiff<I>, 2>,
    targets: Vec<i64>,
    mask: Option<Vec<f32>>,
) -> Tensor<Autodiff<I>, 1> {
    let shape = logits.dims();
    let [rows, vocab] = shape;
    let device = logits.device();
    if let Some(&bad) = targets.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        panic!("target token {bad} outside the vocabulary of {vocab} tokens");
    }
    let weights = match mask {
        Some(mask) => {
            let counted = mask.iter().sum::<f32>().max(1.0);
            mask.iter().map(|m| m / counted).collect()
        }
        None => vec![1.0 / rows as f32; rows],
    };
    let logits = logits.into_primitive().tensor();
    let node = logits.node.clone();
    let mut probs = HostValues::of(Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(
        logits.primitive,
    )));
    let rows_per_task = (CHUNK / vocab).max(1);
    let loss: f64 = probs
        .par_chunks_mut(rows_per_task * vocab)
        .zip(weights.par_chunks(rows_per_task))
        .zip(targets.par_chunks(rows_per_task))
        .map(|((rows, weights), targets)| softmax_nll((rows, weights, targets)))
        .sum();
    let loss = from_host::<I, 1>(vec![loss as f32], [1], &device)
        .into_primitive()
        .tensor();
    let loss = match LossBackward
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                probs,
                weights,
                targets,
                shape,
            },
            loss,
        ),
        OpsKind::UnTracked(prep) => prep.finish(loss),
    };
    Tensor::from_primitive(TensorPrimitive::Float(loss))
}

simd_kernel! {
    /// Turns each row of logits into its softmax in place and returns `Σ w·(lse − z[target])`.
    fn softmax_nll((rows, weights, targets): (&mut [f32], &[f32], &[i64])) -> f64 {
        let vocab = rows.len() / weights.len();
        let mut loss = 0.0f64;
        for ((row, &w), &t) in rows.chunks_exact_mut(vocab).zip(weights).zip(targets) {
            let target_logit = row[t as usize];
            let log_sum_exp = softmax(row);
            loss += w as f64 * (log_sum_exp - target_logit) as f64;
        }
        loss
    }
}

/// The same op through the kernels of `strata_kernels::cross_entropy`, saving the logits, the
/// targets, each row's `lse` and weight on the device. The loss has the logits' type.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod gpu {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::prelude::*;
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn::tensor::{DType, TensorPrimitive};

    use super::super::{AutodiffOp, kernel, same};
    use super::LossInputs;

    pub(super) struct LossOp<B: Backend>(
        pub Tensor<B, 2>,
        pub Tensor<B, 1, Int>,
        pub Option<Tensor<B, 1>>,
    );

    impl<B: Backend> AutodiffOp<B> for LossOp<B> {
        /// The inputs back where the kernels do not run: another backend, or targets that are
        /// not i32.
        type Output = Result<Tensor<B, 1>, LossInputs<B>>;

        fn run<I: Backend>(self) -> Self::Output {
            let LossOp(logits, targets, mask) = self;
            if !kernel::elementwise_chosen::<I>() || targets.dtype() != DType::I32 {
                return Err((logits, targets, mask));
            }
            let targets: Tensor<Autodiff<I>, 1, Int> = same(targets);
            let mask = mask.map(|m| same::<_, Tensor<Autodiff<I>, 1>>(m).inner());
            Ok(same(forward::<I>(same(logits), targets.inner(), mask)))
        }
    }

    #[derive(Debug)]
    struct LossKernelBackward;

    impl<B: Backend> Backward<B, 1> for LossKernelBackward {
        /// The logits, the targets, each row's `lse` and weight (f32).
        type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
                grads.consume::<B>(&ops.node),
            ));
            let [parent] = ops.parents;
            let Some(node) = parent else { return };
            let (logits, targets, lse, weights) = ops.state;
            let float = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
            let weights = float(weights);
            let coefficients = grad.cast(DType::F32).expand(weights.dims()) * weights;
            let grad_logits = kernel::cross_entropy_grad(
                Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logits)),
                Tensor::<B, 1, Int>::from_primitive(targets),
                float(lse),
                coefficients,
            );
            grads.register::<B>(node.id, grad_logits.into_primitive().tensor());
        }
    }

    fn forward<I: Backend>(
        logits: Tensor<Autodiff<I>, 2>,
        targets: Tensor<I, 1, Int>,
        mask: Option<Tensor<I, 1>>,
    ) -> Tensor<Autodiff<I>, 1> {
        let [rows, _] = logits.dims();
        let device = logits.device();
        // Each row's weight: 1/rows, or its mask over the number of rows counted.
        let weights = match mask {
            Some(mask) => {
                let mask = mask.cast(DType::F32);
                let counted = mask.clone().sum().clamp_min(1.0).expand([rows]);
                mask / counted
            }
            None => Tensor::<I, 1>::ones([rows], &device)
                .cast(DType::F32)
                .div_scalar(rows as f64),
        };
        let logits = logits.into_primitive().tensor();
        let node = logits.node.clone();
        let z = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(logits.primitive));
        let (losses, lse) = kernel::cross_entropy(z.clone(), targets.clone());
        let loss = (losses * weights.clone()).sum().into_primitive().tensor();
        let loss = match LossKernelBackward
            .prepare::<NoCheckpointing>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    z.into_primitive().tensor(),
                    targets.into_primitive(),
                    lse.into_primitive().tensor(),
                    weights.into_primitive().tensor(),
                );
                prep.finish(state, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(loss),
        };
        Tensor::from_primitive(TensorPrimitive::Float(loss))
    }
}
