//! One AdamW update of one parameter in one kernel launch. Written with tensor ops the update is
//! about fifteen element-wise launches per parameter (scale the gradient, two moment updates,
//! two bias corrections, the square root, the division, weight decay, ...), each a pass over
//! memory: on an H100, 13 ms of a GPT-2-small training step against PyTorch's 5.5
//! (benches/results/gpu_notes.md, entry 3). Here each unit reads the parameter, its gradient and
//! both moments once and writes the new three, with the arithmetic in f32 whatever the tensors'
//! type.
//!
//! ```text
//! g = grad · grad_scale
//! m = β1·m + (1 − β1)·g            v = β2·v + (1 − β2)·g²
//! p = p·(1 − lr·decay) − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + ε)
//! ```

use burn_backend::{DType, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Units per cube; cubes are capped at [`MAX_CUBES`] and each unit strides over the elements,
/// since wgpu allows at most 65 535 workgroups along one axis (an embedding has tens of millions
/// of entries).
const CUBE_SIZE: u32 = 256;
const MAX_CUBES: u32 = 65_535;

/// The scalars of one update.
#[derive(CubeType, CubeLaunch, Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// The decoupled weight decay of this parameter (0 for those not decayed).
    pub weight_decay: f32,
    /// Multiplies the gradient first (the global-norm clipping factor).
    pub grad_scale: f32,
    /// `1 − β1^t` and `1 − β2^t` for the step number `t` (from 1).
    pub bias_correction1: f32,
    pub bias_correction2: f32,
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    m: &Tensor<F>,
    v: &Tensor<F>,
    new_param: &mut Tensor<F>,
    new_m: &mut Tensor<F>,
    new_v: &mut Tensor<F>,
    step: AdamWStep,
    #[define(F)] _dtype: StorageType,
) {
    let len = param.len();
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < len {
        let g = f32::cast_from(grad[i]) * step.grad_scale;
        let m_i = step.beta1 * f32::cast_from(m[i]) + (1.0 - step.beta1) * g;
        let v_i = step.beta2 * f32::cast_from(v[i]) + (1.0 - step.beta2) * g * g;
        let m_hat = m_i / step.bias_correction1;
        let v_hat = v_i / step.bias_correction2;
        let p = f32::cast_from(param[i]) * (1.0 - step.lr * step.weight_decay)
            - step.lr * m_hat / (v_hat.sqrt() + step.eps);
        new_param[i] = F::cast_from(p);
        new_m[i] = F::cast_from(m_i);
        new_v[i] = F::cast_from(v_i);
        i += stride;
    }
}

/// The updated parameter, first moment and second moment, as new tensors. All four inputs must
/// be contiguous, of one type and one length; the error says which is not.
pub fn adamw<R: CubeRuntime>(
    param: CubeTensor<R>,
    grad: CubeTensor<R>,
    m: CubeTensor<R>,
    v: CubeTensor<R>,
    step: AdamWStep,
) -> Result<[CubeTensor<R>; 3], String> {
    let len = param.shape().num_elements();
    for (name, t) in [("grad", &grad), ("m", &m), ("v", &v), ("param", &param)] {
        if t.shape().num_elements() != len || t.dtype != param.dtype || !t.is_contiguous() {
            return Err(format!(
                "adamw: {name} must be a contiguous {:?} tensor of {len} elements",
                param.dtype
            ));
        }
    }
    let dtype: DType = param.dtype;
    // Contiguous like the inputs (the kernel indexes every tensor by its linear position).
    let new = || crate::empty(&param, param.shape().to_vec(), dtype);
    let (new_param, new_m, new_v) = (new(), new(), new());
    let cubes = (len as u32).div_ceil(CUBE_SIZE).clamp(1, MAX_CUBES);
    let client = param.client.clone();
    // SAFETY: every index the kernel reads or writes is below `len`, the length of all seven
    // tensors, which are contiguous (checked above).
    unsafe {
        adamw_kernel::launch_unchecked::<R>(
            &client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(CUBE_SIZE),
            param.into_tensor_arg(),
            grad.into_tensor_arg(),
            m.into_tensor_arg(),
            v.into_tensor_arg(),
            new_param.clone().into_tensor_arg(),
            new_m.clone().into_tensor_arg(),
            new_v.clone().into_tensor_arg(),
            AdamWStepLaunch::new(
                step.lr,
                step.beta1,
                step.beta2,
                step.eps,
                step.weight_decay,
                step.grad_scale,
                step.bias_correction1,
                step.bias_correction2,
            ),
            dtype.into(),
        );
    }
    Ok([new_param, new_m, new_v])
}
