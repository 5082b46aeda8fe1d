//! The CubeCL kernels of `strata-kernels` (kernels/), called on Burn tensors of the GPU
//! backends: wgpu and CUDA without kernel fusion (Burn's fusion backend wraps tensors in its own
//! stream, which these kernels do not join; with `fusion` on, the ops take the tensor ops).
//!
//! - Attention's causal softmax and its gradient ([`causal_softmax`], [`causal_softmax_grad`];
//!   on unless `STRATA_SOFTMAX_KERNEL=0`), RMSNorm, the SwiGLU gate, the rotary embedding and
//!   the cross-entropy loss ([`rms_norm`], [`swiglu`], [`rope`], [`cross_entropy`] and their
//!   gradients; on unless `STRATA_ELEMENTWISE_KERNELS=0`): one kernel each way where the tensor
//!   ops take one launch and one pass over memory each.
//! - Matrix products through a named kernel or cuBLAS ([`matmul`]), AdamW ([`adamw`]).
//! - Flash attention ([`forward`], [`backward`]), which keeps no n×n scores.
//! - Flash attention on the tensor cores ([`mma_forward`], [`mma_backward`]; CUDA, f16 and
//!   bf16, opt-in with `STRATA_MMA_ATTENTION=1`), for training's causal attention where its
//!   shapes fit ([`mma_chosen`]).
//!
//! The flash kernels are opt-in: `STRATA_FLASH_KERNEL=1` in the environment turns them on. Measured on an
//! H200 (benches/results/flash_attention_gpu.csv) they keep no n×n scores (peak device memory
//! 1.9 GB against 15.9 GB at 16k tokens), but are slower than the tensor ops they replace: the
//! forward pass is even at head size 64 and the backward pass 2× slower; at head size 128 each
//! unit's rows spill out of registers and they are 3–20× slower. Until they use the tensor
//! cores and fit their registers, they are for runs whose scores do not fit in memory.

use std::any::TypeId;
use std::sync::Mutex;

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use strata_kernels::attention::{self as flash, MAX_HEAD_DIM};
use strata_kernels::matmul as cube_matmul;

pub use strata_kernels::matmul::{CUBLAS, KERNELS as MATMUL_KERNELS};
use strata_kernels::{BoolElement, CubeBackend, CubeRuntime, CubeTensor, FloatElement, IntElement};

pub use strata_kernels::attention::Pattern;
/// The GPU's kernel timeline (CUPTI) on the CUDA backend.
#[cfg(feature = "cuda")]
pub use strata_kernels::trace as kernel_trace;

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
pub trait OnCube:
    Backend<
        FloatTensorPrimitive = CubeTensor<Self::Runtime>,
        IntTensorPrimitive = CubeTensor<Self::Runtime>,
    >
{
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

/// Whether causal attention of `q` over `k` (`[batch, heads, len, head_dim]`) runs on the
/// tensor-core flash kernels: `STRATA_MMA_ATTENTION=1` (opt-in until they are measured on a
/// GPU: `benches/results/gpu_notes.md`, entry 10) and
/// `strata_kernels::flash_mma::applies` (CUDA, f16 or bf16, one length for both, a multiple of
/// 64, head size 32 or 64).
#[cfg(feature = "cuda")]
pub fn mma_chosen<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> bool {
    mma_enabled() && mma_applies(q, k)
}

/// Whether the environment turns the tensor-core flash kernels on (`STRATA_MMA_ATTENTION=1`).
pub fn mma_enabled() -> bool {
    std::env::var("STRATA_MMA_ATTENTION").is_ok_and(|v| v == "1")
}

#[cfg(feature = "cuda")]
fn mma_applies<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> bool {
    struct Applies([usize; 4], [usize; 4], DType);
    impl CubeOp for Applies {
        type Output = bool;
        fn run<C: OnCube>(self) -> bool {
            strata_kernels::flash_mma::applies::<C::Runtime>(self.0, self.1, self.2)
        }
    }
    run_on_cube::<B, _>(Applies(q.dims(), k.dims(), q.dtype())).unwrap_or(false)
}

/// Causal attention's output and row log-sum-exp (f32) through the tensor-core kernels; call
/// only where [`mma_chosen`] holds.
#[cfg(feature = "cuda")]
pub fn mma_forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    struct Op<B: Backend>(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);
    impl<B: Backend> CubeOp for Op<B> {
        type Output = (Tensor<B, 4>, Tensor<B, 3>);
        fn run<C: OnCube>(self) -> Self::Output {
            let (out, lse) = strata_kernels::flash_mma::forward(
                cube::<C, B, 4>(self.0),
                cube::<C, B, 4>(self.1),
                cube::<C, B, 4>(self.2),
            );
            (burn::<C, B, 4>(out), burn::<C, B, 3>(lse))
        }
    }
    run_on_cube::<B, _>(Op(q, k, v)).expect("called where `mma_chosen` holds")
}

/// Gradients of q, k and v through the tensor-core kernels; call only where [`mma_chosen`]
/// holds.
#[cfg(feature = "cuda")]
pub fn mma_backward<B: Backend>(
    qkv: [Tensor<B, 4>; 3],
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    grad_out: Tensor<B, 4>,
) -> [Tensor<B, 4>; 3] {
    struct Op<B: Backend>([Tensor<B, 4>; 3], Tensor<B, 4>, Tensor<B, 3>, Tensor<B, 4>);
    impl<B: Backend> CubeOp for Op<B> {
        type Output = [Tensor<B, 4>; 3];
        fn run<C: OnCube>(self) -> Self::Output {
            let Op(qkv, out, lse, grad_out) = self;
            strata_kernels::flash_mma::backward(
                qkv.map(cube::<C, B, 4>),
                cube::<C, B, 4>(out),
                cube::<C, B, 3>(lse),
                cube::<C, B, 4>(grad_out),
            )
            .map(burn::<C, B, 4>)
        }
    }
    run_on_cube::<B, _>(Op(qkv, out, lse, grad_out)).expect("called where `mma_chosen` holds")
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

/// The environment variable that names the matmul kernel of the linear layers on the GPU
/// backends (see [`matmul_kernel_for`]).
pub const MATMUL_VAR: &str = "STRATA_MATMUL";

/// The kernel of every product on CUDA when [`MATMUL_VAR`] is unset: cuBLAS, 5–6× the
/// fastest CubeCL kernel on an H100 (benches/results/gpu_notes.md, entries 5 and 6). Products on
/// wgpu keep Burn's (`burn`).
pub const CUDA_MATMUL: &str = CUBLAS;

/// The matmul kernel [`MATMUL_VAR`] names (one of `strata_kernels::matmul::KERNELS`), `None`
/// when it is unset; an error naming the variable and the kernels when it names none of them.
pub fn matmul_kernel() -> Result<Option<&'static str>, String> {
    let Ok(name) = std::env::var(MATMUL_VAR) else {
        return Ok(None);
    };
    cube_matmul::KERNELS
        .iter()
        .find(|kernel| **kernel == name)
        .map(|kernel| Some(*kernel))
        .ok_or_else(|| {
            format!(
                "{MATMUL_VAR}={name:?}: not a matmul kernel; expected one of {}",
                cube_matmul::KERNELS.join(", ")
            )
        })
}

/// The kernel that products on backend `B` take: [`MATMUL_VAR`]'s, else [`CUDA_MATMUL`] on
/// CUDA, else `burn` (Burn's own product, which the tensor ops already call). Read at each
/// product: a lookup beside a kernel launch, and tests can switch kernels. An unknown name
/// counts as `burn` (the CLI reports it at start).
pub fn matmul_kernel_for<B: Backend>() -> &'static str {
    match matmul_kernel() {
        Ok(Some(name)) => name,
        Err(_) => "burn",
        Ok(None) if on_cuda::<B>() => CUDA_MATMUL,
        Ok(None) => "burn",
    }
}

/// Whether `B` is one of the CUDA backends the kernels run on.
fn on_cuda<B: Backend>() -> bool {
    struct IsCuda;
    impl CubeOp for IsCuda {
        type Output = bool;
        fn run<C: OnCube>(self) -> bool {
            strata_kernels::is_cuda::<C::Runtime>()
        }
    }
    run_on_cube::<B, _>(IsCuda).unwrap_or(false)
}

/// Whether products on backend `B` take [`matmul`]: `B` is a GPU backend and its kernel is not
/// Burn's.
pub fn matmul_chosen<B: Backend>() -> bool {
    kernel_backend::<B>() && matmul_kernel_for::<B>() != "burn"
}

/// How cuBLAS products are ordered against CubeCL's stream (`STRATA_CUBLAS_WAIT`): `device`
/// (the default: the streams wait for each other on the GPU) or `host`.
#[cfg(feature = "cuda")]
pub fn cublas_wait() -> &'static str {
    match strata_kernels::cublas::wait() {
        strata_kernels::cublas::Wait::Host => "host",
        strata_kernels::cublas::Wait::Device => "device",
    }
}

/// Whether attention's batched products on backend `B` take [`matmul`]: only when the chosen
/// kernel is cuBLAS. Through `double_cyclic_mma` the attention op's CUDA check came out wrong
/// (gpu_notes.md, entry 5) and the cause is not found, so the CubeCL kernels stay off them.
pub fn attention_matmul_chosen<B: Backend>() -> bool {
    kernel_backend::<B>() && matmul_kernel_for::<B>() == CUBLAS
}

/// Says once per product shape that the chosen kernel cannot run it, so that a benchmark does
/// not silently time Burn's product instead.
fn warn_fallback(name: &str, a: Vec<usize>, b: Vec<usize>, reason: &str) {
    static SEEN: Mutex<Vec<(Vec<usize>, Vec<usize>)>> = Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.contains(&(a.clone(), b.clone())) {
        eprintln!("warning: matmul kernel {name} cannot run {a:?}·{b:?} ({reason}); using Burn's");
        seen.push((a, b));
    }
}

/// `a·b` (`[..., m, k]·[..., k, n]`, equal leading sizes; either may be a transposed view)
/// through the chosen kernel; call only where [`matmul_chosen`] holds. A product the kernel
/// cannot run takes Burn's.
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let name = matmul_kernel_for::<B>();
    // Sizes off the ground a kernel was checked on (`strata_kernels::matmul::takes`): Burn's
    // product, without a warning, since that is its rule.
    if !cube_matmul::takes(name, a.dims()[D - 1], b.dims()[D - 1]) {
        return a.matmul(b);
    }
    match matmul_with(a.clone(), b.clone(), name) {
        Ok(product) => product,
        Err(reason) => {
            warn_fallback(name, a.dims().to_vec(), b.dims().to_vec(), &reason);
            a.matmul(b)
        }
    }
}

struct NamedProduct<'a, B: Backend, const D: usize>(Tensor<B, D>, Tensor<B, D>, &'a str);

impl<B: Backend, const D: usize> CubeOp for NamedProduct<'_, B, D> {
    type Output = Result<Tensor<B, D>, String>;
    fn run<C: OnCube>(self) -> Self::Output {
        let NamedProduct(a, b, name) = self;
        cube_matmul::matmul_named(cube::<C, B, D>(a), cube::<C, B, D>(b), name).map(burn::<C, B, D>)
    }
}

/// `a·b` through the kernel `name` of `strata_kernels::matmul::KERNELS`, without a fallback: an
/// error when `B` is not a GPU backend, the name is unknown or the kernel cannot run the product.
/// For `strata bench-matmul`.
pub fn matmul_with<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    name: &str,
) -> Result<Tensor<B, D>, String> {
    run_on_cube::<B, _>(NamedProduct(a, b, name)).unwrap_or_else(|| Err("not a GPU backend".into()))
}

#[cfg(feature = "cuda")]
struct HeadsLastProduct<B: Backend>(Tensor<B, 4>, Tensor<B, 4>);

#[cfg(feature = "cuda")]
impl<B: Backend> CubeOp for HeadsLastProduct<B> {
    type Output = Result<Tensor<B, 4>, String>;
    fn run<C: OnCube>(self) -> Self::Output {
        let HeadsLastProduct(a, b) = self;
        strata_kernels::cublas::matmul_on(cube::<C, B, 4>(a), cube::<C, B, 4>(b), true)
            .map(burn::<C, B, 4>)
    }
}

/// `a·b` of `[b, h, m, k] · [b, h, k, n]` as a `[b, h, m, n]` view of a `[b, m, h, n]` tensor
/// through cuBLAS, where [`attention_matmul_chosen`] holds: attention's outputs (and `dV`)
/// come out with the heads beside each other, so that the output projection (and the value
/// projection's backward) read them without a copy. Elsewhere [`matmul`].
pub fn matmul_heads_last<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "cuda")]
    if attention_matmul_chosen::<B>()
        && let Some(Ok(product)) = run_on_cube::<B, _>(HeadsLastProduct(a.clone(), b.clone()))
    {
        return product;
    }
    matmul(a, b)
}

pub use strata_kernels::adamw::AdamWStep;

/// Whether AdamW updates each parameter with one kernel on the GPU backends: yes unless
/// `STRATA_FUSED_ADAMW=0` (the tensor-op update, kept to compare).
pub fn fused_adamw_enabled() -> bool {
    on_unless_zero("STRATA_FUSED_ADAMW")
}

/// The kernel switches of the environment, each `0` (off) or `1` (on); all but
/// `STRATA_MMA_ATTENTION` are on unless set to `0`, which is off unless set to `1`.
pub const SWITCH_VARS: [&str; 4] = [
    "STRATA_FUSED_ADAMW",
    "STRATA_SOFTMAX_KERNEL",
    "STRATA_ELEMENTWISE_KERNELS",
    "STRATA_MMA_ATTENTION",
];

/// A kernel switch of the environment: on unless `var` is `0`. (The CLI refuses any value but
/// `0` and `1` at start: [`check_environment`].)
fn on_unless_zero(var: &str) -> bool {
    std::env::var(var).map_or(true, |v| v != "0")
}

/// The kernel settings of the environment checked: `STRATA_MATMUL` names a kernel, each of
/// [`SWITCH_VARS`] is `0` or `1`, `STRATA_ATTENTION_PASSES` is a whole number from 1. An error
/// names the variable, its value and what it takes.
pub fn check_environment() -> Result<(), String> {
    matmul_kernel()?;
    for var in SWITCH_VARS {
        if let Ok(value) = std::env::var(var)
            && value != "0"
            && value != "1"
        {
            return Err(format!(
                "{var}={value:?}: expected 0 (off) or 1 (on, the default)"
            ));
        }
    }
    attention_passes()?;
    Ok(())
}

struct AdamWOp<B: Backend>([Tensor<B, 1>; 4], AdamWStep);

impl<B: Backend> CubeOp for AdamWOp<B> {
    type Output = Result<[Tensor<B, 1>; 3], [Tensor<B, 1>; 4]>;
    fn run<C: OnCube>(self) -> Self::Output {
        let AdamWOp(inputs, step) = self;
        let [p, g, m, v] = inputs.clone().map(cube::<C, B, 1>);
        match strata_kernels::adamw::adamw(p, g, m, v, step) {
            Ok(updated) => Ok(updated.map(burn::<C, B, 1>)),
            Err(_) => Err(inputs),
        }
    }
}

/// The updated parameter and moments `[p, m, v]` from `[p, grad, m, v]` (flattened), in one
/// kernel on a GPU backend where [`fused_adamw_enabled`]; the inputs back otherwise (another
/// backend, or tensors of different types), for the tensor-op update.
pub fn adamw<B: Backend>(
    inputs: [Tensor<B, 1>; 4],
    step: AdamWStep,
) -> Result<[Tensor<B, 1>; 3], [Tensor<B, 1>; 4]> {
    if !fused_adamw_enabled() || !kernel_backend::<B>() {
        return Err(inputs);
    }
    run_on_cube::<B, _>(AdamWOp(inputs, step)).expect("checked: a GPU backend")
}

/// How many passes of queries causal attention in matrix form takes where the score kernels
/// run (`STRATA_ATTENTION_PASSES`, default 1): with `n` passes each reads only the keys up to its
/// last query, so the products and score kernels cover about `(n + 1)/(2n)` of the n×n square,
/// at the price of more, smaller launches. On an H100 two passes were 4 % faster at 2048 tokens
/// and 6 % slower at 1024 (gpu_notes entry 8), so the default stays one.
pub fn causal_passes() -> usize {
    attention_passes().unwrap_or(1)
}

/// `STRATA_ATTENTION_PASSES` (1 when unset), or an error naming its value when it is not a
/// whole number from 1 (the CLI reports it at start; [`causal_passes`] then takes 1).
fn attention_passes() -> Result<usize, String> {
    let Ok(value) = std::env::var("STRATA_ATTENTION_PASSES") else {
        return Ok(1);
    };
    value
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!(
                "STRATA_ATTENTION_PASSES={value:?}: expected a whole number of passes, 1 or more"
            )
        })
}

/// Whether attention in matrix form computes its softmax and the softmax's gradient with one
/// kernel each ([`causal_softmax`], [`causal_softmax_grad`]) on backend `B`: a GPU backend, and
/// `STRATA_SOFTMAX_KERNEL` is not `0` (the tensor ops, kept to compare).
pub fn softmax_chosen<B: Backend>() -> bool {
    on_unless_zero("STRATA_SOFTMAX_KERNEL") && kernel_backend::<B>()
}

struct SoftmaxOp<B: Backend>(Tensor<B, 4>, f32, usize);

impl<B: Backend> CubeOp for SoftmaxOp<B> {
    type Output = (Tensor<B, 4>, Tensor<B, 3>);
    fn run<C: OnCube>(self) -> Self::Output {
        let SoftmaxOp(scores, scale, first) = self;
        let (probs, lse) =
            strata_kernels::softmax::causal_softmax(cube::<C, B, 4>(scores), scale, first);
        (burn::<C, B, 4>(probs), burn::<C, B, 3>(lse))
    }
}

/// Probabilities and f32 row log-sum-exp of the causal softmax of `scores·scale`, the raw
/// products `[batch, heads, rows, kv_len]` of queries at positions `first..first + rows`; call
/// only where [`softmax_chosen`] holds.
pub fn causal_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f32,
    first: usize,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    run_on_cube::<B, _>(SoftmaxOp(scores, scale, first))
        .expect("called where `softmax_chosen` holds")
}

struct SoftmaxGradOp<B: Backend>(Tensor<B, 4>, Tensor<B, 3>, Tensor<B, 4>, f32, usize);

impl<B: Backend> CubeOp for SoftmaxGradOp<B> {
    type Output = (Tensor<B, 4>, Tensor<B, 4>);
    fn run<C: OnCube>(self) -> Self::Output {
        let SoftmaxGradOp(scores, lse, grad_probs, scale, first) = self;
        let (probs, grad_scores) = strata_kernels::softmax::causal_softmax_grad(
            cube::<C, B, 4>(scores),
            cube::<C, B, 3>(lse),
            cube::<C, B, 4>(grad_probs),
            scale,
            first,
        );
        (burn::<C, B, 4>(probs), burn::<C, B, 4>(grad_scores))
    }
}

/// The probabilities again and the gradient of the raw `scores`, given the forward pass's
/// `lse` and the probabilities' gradient (see [`causal_softmax`]); call only where
/// [`softmax_chosen`] holds.
pub fn causal_softmax_grad<B: Backend>(
    scores: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    grad_probs: Tensor<B, 4>,
    scale: f32,
    first: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let lse = lse.cast(burn::tensor::DType::F32);
    run_on_cube::<B, _>(SoftmaxGradOp(scores, lse, grad_probs, scale, first))
        .expect("called where `softmax_chosen` holds")
}

/// Whether RMSNorm, the SwiGLU gate, the rotary embedding and the cross-entropy loss run as
/// one kernel each way, and the embedding's gradient as one kernel, on backend `B`
/// (`strata_kernels::{rows, swiglu, rope, cross_entropy, embedding}`):
/// a GPU backend, and `STRATA_ELEMENTWISE_KERNELS` is not `0` (the tensor ops, kept to compare).
pub fn elementwise_chosen<B: Backend>() -> bool {
    on_unless_zero("STRATA_ELEMENTWISE_KERNELS") && kernel_backend::<B>()
}

struct RmsNormOp<B: Backend>(Tensor<B, 2>, Tensor<B, 1>, f32, DType);

impl<B: Backend> CubeOp for RmsNormOp<B> {
    type Output = (Tensor<B, 2>, Tensor<B, 1>);
    fn run<C: OnCube>(self) -> Self::Output {
        let RmsNormOp(x, gamma, epsilon, y_dtype) = self;
        let (x, gamma) = (cube::<C, B, 2>(x), cube::<C, B, 1>(gamma));
        let (y, inv_rms) = strata_kernels::rows::rms_norm(x, gamma, epsilon, y_dtype);
        (burn::<C, B, 2>(y), burn::<C, B, 1>(inv_rms))
    }
}

/// RMSNorm of the rows of `x: [rows, d]`, in `y_dtype`, and each row's `1/rms` (f32); call
/// only where [`elementwise_chosen`] holds, with `gamma` of `x`'s type.
pub fn rms_norm<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    epsilon: f32,
    y_dtype: DType,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    run_on_cube::<B, _>(RmsNormOp(x, gamma, epsilon, y_dtype))
        .expect("called where `elementwise_chosen` holds")
}

struct RmsNormGradOp<B: Backend>([Tensor<B, 2>; 2], Tensor<B, 1>, Tensor<B, 1>);

impl<B: Backend> CubeOp for RmsNormGradOp<B> {
    type Output = (Tensor<B, 2>, Tensor<B, 1>);
    fn run<C: OnCube>(self) -> Self::Output {
        let RmsNormGradOp([x, grad_y], gamma, inv_rms) = self;
        let (grad_x, grad_gamma) = strata_kernels::rows::rms_norm_grad(
            cube::<C, B, 2>(x),
            cube::<C, B, 1>(gamma),
            cube::<C, B, 1>(inv_rms),
            cube::<C, B, 2>(grad_y),
        );
        (burn::<C, B, 2>(grad_x), burn::<C, B, 1>(grad_gamma))
    }
}

/// `dx` (`x`'s type) and `dγ` (f32) of [`rms_norm`], from `dy` of the output's type.
pub fn rms_norm_grad<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    inv_rms: Tensor<B, 1>,
    grad_y: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    run_on_cube::<B, _>(RmsNormGradOp([x, grad_y], gamma, inv_rms))
        .expect("called where `elementwise_chosen` holds")
}

struct SwigluOp<B: Backend>(Tensor<B, 1>, Tensor<B, 1>);

impl<B: Backend> CubeOp for SwigluOp<B> {
    type Output = Tensor<B, 1>;
    fn run<C: OnCube>(self) -> Self::Output {
        let SwigluOp(gate, up) = self;
        burn::<C, B, 1>(strata_kernels::swiglu::swiglu(
            cube::<C, B, 1>(gate),
            cube::<C, B, 1>(up),
        ))
    }
}

/// `silu(gate) · up` of flat tensors of one type; call only where [`elementwise_chosen`] holds.
pub fn swiglu<B: Backend>(gate: Tensor<B, 1>, up: Tensor<B, 1>) -> Tensor<B, 1> {
    run_on_cube::<B, _>(SwigluOp(gate, up)).expect("called where `elementwise_chosen` holds")
}

struct SwigluGradOp<B: Backend>([Tensor<B, 1>; 3]);

impl<B: Backend> CubeOp for SwigluGradOp<B> {
    type Output = (Tensor<B, 1>, Tensor<B, 1>);
    fn run<C: OnCube>(self) -> Self::Output {
        let [gate, up, grad_out] = self.0.map(cube::<C, B, 1>);
        let (grad_gate, grad_up) = strata_kernels::swiglu::swiglu_grad(gate, up, grad_out);
        (burn::<C, B, 1>(grad_gate), burn::<C, B, 1>(grad_up))
    }
}

/// The gradients of `gate` and `up` in [`swiglu`], given the output's.
pub fn swiglu_grad<B: Backend>(
    gate: Tensor<B, 1>,
    up: Tensor<B, 1>,
    grad_out: Tensor<B, 1>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    run_on_cube::<B, _>(SwigluGradOp([gate, up, grad_out]))
        .expect("called where `elementwise_chosen` holds")
}

struct RopeOp<B: Backend>([Tensor<B, 4>; 3], bool);

impl<B: Backend> CubeOp for RopeOp<B> {
    type Output = Tensor<B, 4>;
    fn run<C: OnCube>(self) -> Self::Output {
        let [x, cos, sin] = self.0.map(cube::<C, B, 4>);
        burn::<C, B, 4>(strata_kernels::rope::rope(x, cos, sin, self.1))
    }
}

/// `x: [batch, seq, heads, head_dim]` turned by the angles of the rotate-half tables `cos`,
/// `sin` (`[batch or 1, seq, 1, head_dim]`, `x`'s type); `back` turns by minus them. Call only
/// where [`elementwise_chosen`] holds.
pub fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    back: bool,
) -> Tensor<B, 4> {
    run_on_cube::<B, _>(RopeOp([x, cos, sin], back))
        .expect("called where `elementwise_chosen` holds")
}

fn cube_int<C: OnCube, B: Backend>(t: Tensor<B, 1, Int>) -> CubeTensor<C::Runtime> {
    same::<_, Tensor<C, 1, Int>>(t).into_primitive()
}

struct EmbeddingGradOp<B: Backend>(Tensor<B, 1, Int>, Tensor<B, 2>, usize);

impl<B: Backend> CubeOp for EmbeddingGradOp<B> {
    type Output = Option<Tensor<B, 2>>;
    fn run<C: OnCube>(self) -> Self::Output {
        let EmbeddingGradOp(tokens, grad, vocab) = self;
        let grad = cube::<C, B, 2>(grad);
        strata_kernels::embedding::supported(&grad).then(|| {
            burn::<C, B, 2>(strata_kernels::embedding::embedding_grad(
                cube_int::<C, B>(tokens),
                grad,
                vocab,
            ))
        })
    }
}

/// The gradient (`[vocab, d]`, f32) of an embedding looked up at `tokens` (`[rows]`) from the
/// rows' gradients `[rows, d]`: `None` where the kernels do not run (not a GPU backend without
/// fusion, `STRATA_ELEMENTWISE_KERNELS=0`, or no atomic f32 add on the device).
pub fn embedding_grad<B: Backend>(
    tokens: Tensor<B, 1, Int>,
    grad: Tensor<B, 2>,
    vocab: usize,
) -> Option<Tensor<B, 2>> {
    if !elementwise_chosen::<B>() {
        return None;
    }
    run_on_cube::<B, _>(EmbeddingGradOp(tokens, grad, vocab)).flatten()
}

struct CrossEntropyOp<B: Backend>(Tensor<B, 2>, Tensor<B, 1, Int>);

impl<B: Backend> CubeOp for CrossEntropyOp<B> {
    type Output = (Tensor<B, 1>, Tensor<B, 1>);
    fn run<C: OnCube>(self) -> Self::Output {
        let CrossEntropyOp(logits, targets) = self;
        let (losses, lse) = strata_kernels::cross_entropy::cross_entropy(
            cube::<C, B, 2>(logits),
            cube_int::<C, B>(targets),
        );
        (burn::<C, B, 1>(losses), burn::<C, B, 1>(lse))
    }
}

/// Each row's loss `lse − z[target]` and `lse` (f32) of logits `[rows, vocab]` and i32
/// targets `[rows]`; call only where [`elementwise_chosen`] holds.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    run_on_cube::<B, _>(CrossEntropyOp(logits, targets))
        .expect("called where `elementwise_chosen` holds")
}

struct CrossEntropyGradOp<B: Backend>(Tensor<B, 2>, Tensor<B, 1, Int>, [Tensor<B, 1>; 2]);

impl<B: Backend> CubeOp for CrossEntropyGradOp<B> {
    type Output = Tensor<B, 2>;
    fn run<C: OnCube>(self) -> Self::Output {
        let CrossEntropyGradOp(logits, targets, rows) = self;
        let [lse, coefficients] = rows.map(cube::<C, B, 1>);
        burn::<C, B, 2>(strata_kernels::cross_entropy::cross_entropy_grad(
            cube::<C, B, 2>(logits),
            cube_int::<C, B>(targets),
            lse,
            coefficients,
        ))
    }
}

/// The logits' gradient of [`cross_entropy`], row `n` scaled by `coefficients[n]` (f32).
pub fn cross_entropy_grad<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    lse: Tensor<B, 1>,
    coefficients: Tensor<B, 1>,
) -> Tensor<B, 2> {
    run_on_cube::<B, _>(CrossEntropyGradOp(logits, targets, [lse, coefficients]))
        .expect("called where `elementwise_chosen` holds")
}
