//! Ops with their own backward pass, for training: causal attention ([`attention`]), rotary
//! embeddings ([`rope`]), RMSNorm ([`norm`]), the SwiGLU gate ([`swiglu`]), the cross-entropy
//! loss ([`loss`]), the linear layers' product ([`linear`]) and, on the GPU backends, the token
//! embedding's gradient ([`embedding`]).
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
//!
//! On the CPU backends each elementwise tensor op runs on one thread, while matrix products use
//! every core: in a training step of the default model, the elementwise passes of the norms,
//! the MLP's gate and the loss took about as long as all the matrix products. These ops run
//! their loops on every core (rayon), and the exponentials they need in vector registers.
//!
//! On the GPU backends (wgpu and CUDA without Burn's fusion) the norm, the gate, the rotary
//! embedding, the loss and attention's softmax run as one CubeCL kernel each way
//! (`strata_kernels`, called through [`kernel`]) instead of a launch per tensor op, each pass
//! over the activations (or, for attention, the n×n scores) reading and writing all of it.

/// Defines `fn $name(args) -> ret` whose body is compiled three times — for AVX-512, for AVX2
/// with FMA, and for the default x86-64 target (SSE2) — and runs the widest copy the CPU has,
/// checked at run time. The elementwise loops of these ops (exponentials above all) are
/// arithmetic-bound, so the vector width is their speed. The body is a nested
/// `#[inline(always)]` function that each copy calls directly; passed as a value through a
/// generic `FnOnce` instead, it was inlined into the call shim and then called from the wide
/// copies, compiled for SSE2 (as the norm and attention loops were). The copies differ only in
/// width: the arithmetic is written out (Rust forms no fused multiply-adds; sums run in eight
/// fixed lanes), so each element goes through the same operations in the same order.
macro_rules! simd_kernel {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($args:tt: $ty:ty) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name(args: $ty) $(-> $ret)? {
            #[inline(always)]
            fn kernel($args: $ty) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn widest(args: $ty) $(-> $ret)? {
                    kernel(args)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide(args: $ty) $(-> $ret)? {
                    kernel(args)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU was just checked for AVX-512F, which implies AVX2 and FMA.
                    return unsafe { widest(args) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU was just checked for both features.
                    return unsafe { wide(args) };
                }
            }
            kernel(args)
        }
    };
}

pub mod attention;
pub mod embedding;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod kernel;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod rope;
pub mod swiglu;

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

/// A tensor's f32 values on the host, read as a slice. Taken from a contiguous tensor whose
/// buffer nothing else holds, it is that buffer: [`host_vec`] copies every buffer the CPU
/// backend allocated, since a `Vec<f32>` must be freed with the alignment it was made with.
#[derive(Debug, Clone)]
pub(crate) struct HostValues(TensorData);

impl HostValues {
    pub(crate) fn of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Self {
        HostValues(t.into_data().convert::<f32>())
    }

    pub(crate) fn into_tensor<B: Backend, const D: usize>(
        self,
        device: &B::Device,
    ) -> Tensor<B, D> {
        Tensor::from_data(self.0, device)
    }
}

impl std::ops::Deref for HostValues {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.0.as_slice().expect("converted to f32")
    }
}

impl std::ops::DerefMut for HostValues {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.0.as_mut_slice().expect("converted to f32")
    }
}

pub(crate) fn from_host<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// e^x to about 1e-7 relative (Cephes' expf: x = n·ln 2 + r with ln 2 split in two parts,
/// then a degree-6 polynomial in r), branch-free so that a loop over a row vectorises,
/// unlike the libm call.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5·2^23: adding it rounds to a whole number, which then sits in the low mantissa bits.
    // (A float-to-int `as` cast saturates in Rust and compiled one lane at a time, which made
    // it most of the cost of a vector of exponentials.)
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + SHIFT;
    let n = shifted - SHIFT; // round(x / ln 2), in [-126, 127]
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let poly = 1.987_569_1e-4;
    let poly = poly * r + 1.398_2e-3;
    let poly = poly * r + 8.333_452e-3;
    let poly = poly * r + 4.166_579_6e-2;
    let poly = poly * r + 1.666_666_5e-1;
    let poly = poly * r + 0.5;
    // 2^n from n's bits: `shifted` and SHIFT share an exponent, so their bit patterns differ by n.
    let biased = shifted
        .to_bits()
        .wrapping_sub(SHIFT.to_bits())
        .wrapping_add(127);
    let two_n = f32::from_bits(biased << 23);
    (poly * r * r + r + 1.0) * two_n
}

/// A matrix inside a slice: element (r, c) at `r * row_stride + c * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    values: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Strided<'a> {
    pub(crate) fn rows(values: &'a [f32], row_stride: usize) -> Self {
        Strided {
            values,
            row_stride,
            col_stride: 1,
        }
    }
    /// The transpose of `rows(values, row_stride)`.
    pub(crate) fn columns(values: &'a [f32], row_stride: usize) -> Self {
        Strided {
            values,
            row_stride: 1,
            col_stride: row_stride,
        }
    }
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.values.len(), "matrix view out of bounds");
        }
    }
}

/// `dst[m×n]` (rows `dst_stride` apart) = `a[m×k] · b[k×n] · alpha`, added to `dst` when
/// `accumulate`; on every core when `parallel`, else on the calling thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
    alpha: f32,
    parallel: bool,
) {
    Strided::rows(dst, dst_stride).check(m, n);
    // SAFETY: `dst` holds every element the product writes (checked just above) and is
    // borrowed mutably, so it aliases neither input.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            [m, n, k],
            dst_stride,
            accumulate,
            a,
            b,
            alpha,
            parallel,
        )
    }
}

/// `a[m×k] · b[k×n] · alpha` as a new row-major `[m, n]` vector, on every core when `parallel`.
/// The product writes each element once: a zeroed buffer would cost a pass of its own (zeroing
/// the linear layers' outputs was about 3 % of a default CPU training step's samples).
pub(crate) fn matmul_new(
    [m, n, k]: [usize; 3],
    a: Strided,
    b: Strided,
    parallel: bool,
) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the buffer holds m·n elements; without `accumulate` gemm never reads the
    // destination and writes every element of it (zeros when k = 0), so all m·n are
    // initialised before the length is set. No reference to the uninitialised memory exists.
    unsafe {
        gemm_into(out.as_mut_ptr(), [m, n, k], n, false, a, b, 1.0, parallel);
        out.set_len(m * n);
    }
    out
}

/// The gemm call behind [`matmul`] and [`matmul_new`], after checking that both inputs hold
/// the elements the product reads.
///
/// # Safety
/// `dst` must be valid for writes (and reads, when `accumulate`) of the `m×n` matrix with rows
/// `dst_stride` apart, and must not overlap either input.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    dst: *mut f32,
    [m, n, k]: [usize; 3],
    dst_stride: usize,
    accumulate: bool,
    a: Strided,
    b: Strided,
    alpha: f32,
    parallel: bool,
) {
    a.check(m, k);
    b.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the two checks above keep every element the product reads inside its slice;
    // the caller vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            a.values.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.values.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            if parallel {
                gemm::Parallelism::Rayon(0)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

/// Sum in eight lanes, so that it vectorises (a single running sum must be added in order).
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a·b` in eight lanes, so that it vectorises.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest value in eight lanes, so that it vectorises (a single running maximum is taken
/// in order: `f32::max` has to keep NaN's ordering rules).
#[inline(always)]
pub(crate) fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// A row of scores turned into its softmax in place; returns the row's log-sum-exp.
#[inline(always)]
pub(crate) fn softmax(row: &mut [f32]) -> f32 {
    let max = max(row);
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let sum = sum(row);
    row.iter_mut().for_each(|x| *x /= sum);
    max + sum.ln()
}

/// Elements per task of the elementwise loops: large enough that a task costs more than
/// handing it to a thread, small enough that two cores share a layer's activations evenly.
pub(crate) const CHUNK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    #[test]
    fn polynomial_exp_is_within_2e7_of_f64() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -80.0 + 160.0 * i as f32 / 200_000.0;
            let x = x.min(88.0);
            let want = (x as f64).exp();
            let got = super::exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
    }
}
