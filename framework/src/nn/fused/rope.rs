//! Rotary embedding with its own backward pass: the gradient is the input's gradient turned
//! back by the same angles. Composed of tensor ops, the rotation is a tiny matmul and two
//! broadcast products (strided passes on the CPU) plus the backward of each; here it is one
//! pass each way, on every core on the CPU backends and one kernel on the GPU backends
//! (`strata_kernels::rope`).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::ops::FloatTensor;
use rayon::prelude::*;

use super::{AutodiffOp, HostValues, Inner, from_host, on_host, run_on_autodiff, same};

type Rotation<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// `x: [batch, seq, heads, head_dim]` rotated by `cos`, `sin: [batch or 1, seq, 1, head_dim]`
/// in the rotate-half layout, through this op when `B` is autodiff over a CPU backend (tables
/// of `x`'s type) or a GPU backend the kernel runs on (tables of any float type; the output
/// keeps `x`'s); `Err` gives the inputs back otherwise.
pub fn rotate_trained<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Rotation<B>> {
    match run_on_autodiff(RopeOp(x, cos, sin), Inner::Any) {
        Ok(result) => result,
        Err(op) => Err((op.0, op.1, op.2)),
    }
}

struct RopeOp<B: Backend>(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

impl<B: Backend> AutodiffOp<B> for RopeOp<B> {
    type Output = Result<Tensor<B, 4>, Rotation<B>>;

    fn run<I: Backend>(self) -> Self::Output {
        // The host loops take tables of the activations' type; the kernel any.
        let host = on_host::<I>() && self.0.dtype() == self.1.dtype();
        if !host && !gpu_kernel::<I>() {
            return Err((self.0, self.1, self.2));
        }
        let (x, cos, sin): Rotation<Autodiff<I>> = (same(self.0), same(self.1), same(self.2));
        Ok(same(rope_autodiff::<I>(x, cos.inner(), sin.inner())))
    }
}

/// Whether `B` is a GPU backend the kernel runs on, and it is chosen.
// Without the GPU features the answer does not depend on `B`.
#[cfg_attr(
    not(any(feature = "wgpu", feature = "cuda")),
    allow(clippy::extra_unused_type_parameters)
)]
fn gpu_kernel<B: Backend>() -> bool {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    return super::kernel::elementwise_chosen::<B>();
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    false
}

#[derive(Debug)]
struct RopeBackward;

impl<B: Backend> Backward<B, 1> for RopeBackward {
    /// The cos and sin tables.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let (cos, sin) = ops.state;
        let wrap = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
        let dx = rotate(wrap(grad), wrap(cos), wrap(sin), true);
        grads.register::<B>(node.id, dx.into_primitive().tensor());
    }
}

fn rope_autodiff<I: Backend>(
    x: Tensor<Autodiff<I>, 4>,
    cos: Tensor<I, 4>,
    sin: Tensor<I, 4>,
) -> Tensor<Autodiff<I>, 4> {
    let x = x.into_primitive().tensor();
    let node = x.node.clone();
    let xi = Tensor::<I, 4>::from_primitive(TensorPrimitive::Float(x.primitive));
    let out = rotate(xi, cos.clone(), sin.clone(), false)
        .into_primitive()
        .tensor();
    let out = match RopeBackward
        .prepare::<NoCheckpointing>([node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (cos.into_primitive().tensor(), sin.into_primitive().tensor()),
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Pair (j, j + half) turned by the angle whose cos and sin the tables hold at j (and j + half);
/// `back` turns by minus that angle, which is the transpose the backward pass needs. On a GPU
/// backend, through its kernel.
pub fn rotate<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    back: bool,
) -> Tensor<B, 4> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if !on_host::<B>() {
        return super::kernel::rope(x, cos, sin, back);
    }
    let [b, seq, heads, d] = x.dims();
    let tables_per_batch = cos.dims()[0] != 1;
    let device = x.device();
    let half = d / 2;
    let (x, cos, sin) = (HostValues::of(x), HostValues::of(cos), HostValues::of(sin));
    let (x, cos, sin): (&[f32], &[f32], &[f32]) = (&x, &cos, &sin);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(heads * d)
        .zip(x.par_chunks(heads * d))
        .enumerate()
        .for_each(|(bt, (out, x))| {
            let (bb, t) = (bt / seq, bt % seq);
            let at = (if tables_per_batch { bb * seq + t } else { t }) * d;
            let (c, s) = (&cos[at..][..d], &sin[at..][..d]);
            for (out, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                for j in 0..half {
                    let (x1, x2) = (x[j], x[j + half]);
                    if back {
                        out[j] = x1 * c[j] + x2 * s[j + half];
                        out[j + half] = x2 * c[j + half] - x1 * s[j];
                    } else {
                        out[j] = x1 * c[j] - x2 * s[j];
                        out[j + half] = x2 * c[j + half] + x1 * s[j + half];
                    }
                }
            }
        });
    from_host(out, [b, seq, heads, d], &device)
}
