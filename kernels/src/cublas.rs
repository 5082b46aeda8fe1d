//! Matrix products of the CUDA backend's tensors through cuBLAS, the library PyTorch's products
//! call.
//!
//! CubeCL's own matmul kernels ran a GPT-2-small training step's products at 70–90 TFLOP/s in
//! bf16 on an H100 at best, where cuBLAS ran the same products at 464
//! (benches/results/gpu_notes.md, entries 3 and 5). cuBLAS is loaded at run time from the CUDA
//! libraries (`libcublas.so`, found on the library path like NVRTC), so nothing about it is
//! needed at build time; where it is missing [`matmul`] says so and the caller takes another
//! kernel.
//!
//! cuBLAS cannot join CubeCL's stream, which CubeCL keeps to itself, so it runs on a stream of its
//! own, and each product is ordered against CubeCL's work before and after it by `Handoff`:
//! the two streams wait for each other on the GPU, and the host never waits. The whole product
//! is queued from CubeCL's device thread (the thread that launches CubeCL's kernels), where the
//! operands' device addresses can be asked for without waiting for that thread three times.
//! [`Wait::Host`] (`STRATA_CUBLAS_WAIT=host`) orders by waiting on the host instead: simpler,
//! 0.82× the training speed on an H100 (gpu_notes.md, entry 6).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::OnceLock;

use burn_backend::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::prelude::*;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as driver, sys as driver_sys};

use crate::strided::{Operand, batches, operand, product_sizes};

type Client = cubecl::client::ComputeClient<CudaRuntime>;

/// Whether the cuBLAS library can be loaded (checked once).
pub fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to open the library by its candidate names.
    *PRESENT.get_or_init(|| unsafe { blas_sys::is_culib_present() })
}

/// A cuBLAS handle bound to a stream of its own, in the device's primary context (the one
/// CubeCL's CUDA runtime uses, so that its device pointers are valid here).
struct Blas {
    device: usize,
    context: driver_sys::CUcontext,
    stream: driver_sys::CUstream,
    handle: blas_sys::cublasHandle_t,
    /// Made on the first product ordered on the device ([`Wait::Device`]).
    handoff: Option<Handoff>,
}

impl Blas {
    fn new(device: usize) -> Result<Self, String> {
        let fail = |what: &str, err: &dyn std::fmt::Debug| format!("cuBLAS {what}: {err:?}");
        driver::init().map_err(|e| fail("driver init", &e))?;
        let ordinal = i32::try_from(device).map_err(|e| fail("device index", &e))?;
        let cu_device = driver::device::get(ordinal).map_err(|e| fail("device", &e))?;
        // SAFETY: `cu_device` is a valid device; the primary context is retained for the life of
        // the thread (handles are never dropped before the process ends).
        let context =
            unsafe { driver::primary_ctx::retain(cu_device) }.map_err(|e| fail("context", &e))?;
        unsafe { driver::ctx::set_current(context) }.map_err(|e| fail("context", &e))?;
        let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking)
            .map_err(|e| fail("stream", &e))?;
        let handle = blas::create_handle().map_err(|e| fail("handle", &e))?;
        // SAFETY: both were just created and are valid.
        unsafe { blas::set_stream(handle, stream as blas_sys::cudaStream_t) }
            .map_err(|e| fail("stream", &e))?;
        Ok(Self {
            device,
            context,
            stream,
            handle,
            handoff: None,
        })
    }
}

thread_local! {
    /// One handle per device and thread: a cuBLAS handle must not be used by two threads at once.
    static HANDLES: RefCell<Vec<Blas>> = const { RefCell::new(Vec::new()) };
}

fn with_blas<T>(
    device: usize,
    run: impl FnOnce(&mut Blas) -> Result<T, String>,
) -> Result<T, String> {
    HANDLES.with_borrow_mut(|handles| {
        if !handles.iter().any(|blas| blas.device == device) {
            handles.push(Blas::new(device)?);
        }
        let blas = handles
            .iter_mut()
            .find(|blas| blas.device == device)
            .unwrap();
        // SAFETY: a context retained in `Blas::new`; CubeCL may have made another current.
        unsafe { driver::ctx::set_current(blas.context) }
            .map_err(|e| format!("cuBLAS context: {e:?}"))?;
        run(blas)
    })
}

/// How cuBLAS reads the matrices of `t` as they lie, if it can.
fn layout(t: &CubeTensor<CudaRuntime>) -> Option<Operand> {
    let (shape, strides) = (t.meta.shape(), t.meta.strides());
    let rank = shape.len();
    operand(
        shape[rank - 2],
        shape[rank - 1],
        [strides[rank - 2], strides[rank - 1]],
    )
}

/// `t` and how cuBLAS reads its matrices, copied to a contiguous tensor if it cannot read them
/// as they lie.
fn readable(t: CubeTensor<CudaRuntime>) -> (CubeTensor<CudaRuntime>, Operand) {
    if let Some(layout) = layout(&t) {
        return (t, layout);
    }
    let t = into_contiguous(t);
    let layout = layout(&t).expect("a contiguous matrix");
    (t, layout)
}

fn data_type(dtype: DType) -> Option<blas_sys::cudaDataType> {
    use blas_sys::cudaDataType::*;
    Some(match dtype {
        DType::F32 => CUDA_R_32F,
        DType::F16 => CUDA_R_16F,
        DType::BF16 => CUDA_R_16BF,
        _ => return None,
    })
}

fn int(value: usize, what: &str) -> Result<i32, String> {
    i32::try_from(value).map_err(|_| format!("cuBLAS: {what} {value} exceeds i32"))
}

fn long(value: usize) -> i64 {
    value as i64
}

/// `lhs · rhs` for `lhs: [..., m, k]` and `rhs: [..., k, n]` with the same leading (batch) sizes
/// (either may be a transposed or sliced view), into a new `[..., m, n]` tensor of their type
/// (contiguous: reshaping it needs no copy, see `crate::empty`), accumulated in f32 (no TF32
/// for f32 operands). An error when the types or sizes are not ones cuBLAS takes here, or the
/// library is missing or fails.
pub fn matmul(
    lhs: CubeTensor<CudaRuntime>,
    rhs: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, String> {
    product(lhs, rhs, false)
}

/// [`matmul`] of rank-4 `[b, h, m, k] · [b, h, k, n]` into a `[b, h, m, n]` view of a
/// `[b, m, h, n]` tensor: attention's `P·V` written with the heads beside each other, as the
/// output projection reads them (swapping the axes back is then free, not a copy).
pub fn matmul_heads_last(
    lhs: CubeTensor<CudaRuntime>,
    rhs: CubeTensor<CudaRuntime>,
) -> Result<CubeTensor<CudaRuntime>, String> {
    if lhs.shape().num_dims() != 4 {
        return Err(format!(
            "cuBLAS: heads-last product of rank {}",
            lhs.shape().num_dims()
        ));
    }
    product(lhs, rhs, true)
}

fn product(
    lhs: CubeTensor<CudaRuntime>,
    rhs: CubeTensor<CudaRuntime>,
    heads_last: bool,
) -> Result<CubeTensor<CudaRuntime>, String> {
    let (a, b) = (lhs.shape().to_vec(), rhs.shape().to_vec());
    let rank = a.len();
    let [m, k, n] = product_sizes(&a, &b)
        .ok_or_else(|| format!("cuBLAS: {a:?} · {b:?}: shapes do not multiply"))?;
    if m == 0 || n == 0 || k == 0 {
        return Err(format!("cuBLAS: empty product {a:?} · {b:?}"));
    }
    let dtype = lhs.dtype;
    let data = data_type(dtype)
        .filter(|_| rhs.dtype == dtype)
        .ok_or_else(|| format!("cuBLAS: {dtype:?} · {:?}: not f32, f16 or bf16", rhs.dtype))?;
    if !available() {
        return Err("cuBLAS: the library (libcublas.so) is not on the library path".into());
    }

    let (lhs, lhs_layout) = readable(lhs);
    let (rhs, rhs_layout) = readable(rhs);
    let mut shape = a.clone();
    shape[rank - 1] = n;
    if heads_last {
        shape.swap(1, 2);
    }
    let mut out = crate::empty(&lhs, shape, dtype);
    if heads_last {
        // A view: axes 1 and 2 swapped in the metadata only.
        out.meta.swap(1, 2);
    }
    let strides = [&lhs, &rhs, &out].map(|t| t.meta.strides()[..rank - 2].to_vec());
    let (outer, count, batch_stride) =
        batches(&a[..rank - 2], [&strides[0], &strides[1], &strides[2]]);

    let out_layout = layout(&out)
        .filter(|layout| !layout.transposed)
        .ok_or_else(|| format!("cuBLAS: output strides {:?}", out.meta.strides()))?;

    let elem = dtype.size();
    let (alpha, beta) = (1.0f32, 0.0f32);
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS gets (n, m, k) with the operands
    // swapped, and a row-major operand is already its own transpose in column-major order.
    let op = |layout: &Operand| {
        if layout.transposed {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (cm, cn, ck) = (int(n, "columns")?, int(m, "rows")?, int(k, "inner size")?);
    let (lda, ldb) = (int(rhs_layout.ld, "stride")?, int(lhs_layout.ld, "stride")?);
    let ldc = int(out_layout.ld, "stride")?;
    let batch_count = int(count, "batch count")?;
    let wait = wait();
    let client = out.client.clone();
    let device = out.device.clone();
    let tensors = [lhs.handle.clone(), rhs.handle.clone(), out.handle.clone()];
    // On CubeCL's device thread, which launches CubeCL's kernels: asking it for the operands'
    // addresses from here would wait for it three times a product.
    let task = move || -> Result<(), String> {
        let pointer = |handle: &cubecl::server::Handle| {
            client
                .get_resource(handle.clone())
                .map_err(|e| format!("cuBLAS: device memory: {e:?}"))
        };
        // Held until the product is queued: they keep the memory from being reused meanwhile.
        let resources = [
            pointer(&tensors[0])?,
            pointer(&tensors[1])?,
            pointer(&tensors[2])?,
        ];
        let base = resources.each_ref().map(|r| r.resource().ptr);
        let products = |handle: blas_sys::cublasHandle_t| -> Result<(), String> {
            for offsets in &outer {
                let at = |t: usize| (base[t] + (offsets[t] * elem) as u64) as *mut c_void;
                // SAFETY: the pointers are live allocations (held in `resources`) that the shapes,
                // strides and leading dimensions above stay inside; alpha and beta are host f32s
                // as the f32 compute type expects.
                unsafe {
                    blas::gemm_strided_batched_ex(
                        handle,
                        op(&rhs_layout),
                        op(&lhs_layout),
                        cm,
                        cn,
                        ck,
                        (&alpha as *const f32).cast(),
                        at(1),
                        data,
                        lda,
                        long(batch_stride[1]),
                        at(0),
                        data,
                        ldb,
                        long(batch_stride[0]),
                        (&beta as *const f32).cast(),
                        at(2),
                        data,
                        ldc,
                        long(batch_stride[2]),
                        batch_count,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    )
                }
                .map_err(|e| format!("cuBLAS gemm: {e:?}"))?;
            }
            Ok(())
        };
        match wait {
            Wait::Host => {
                // Everything queued on CubeCL's stream before this product (its operands) must be
                // done; then the product, and the host waits for it.
                cubecl::future::block_on(client.sync())
                    .map_err(|e| format!("cuBLAS: sync: {e:?}"))?;
                with_blas(device.index, |blas| {
                    products(blas.handle)?;
                    // SAFETY: the stream the handle was given.
                    unsafe { driver::stream::synchronize(blas.stream) }
                        .map_err(|e| format!("cuBLAS: stream sync: {e:?}"))
                })?;
            }
            Wait::Device => with_blas(device.index, |blas| {
                let (stream, handle) = (blas.stream, blas.handle);
                let handoff = match &mut blas.handoff {
                    Some(handoff) => handoff,
                    None => blas.handoff.insert(Handoff::new(&client, &device)?),
                };
                let ticket = handoff.open(&client, stream)?;
                products(handle)?;
                handoff.close(&client, stream, ticket)
            })?,
        }
        drop(resources);
        Ok(())
    };
    out.client
        .exclusive(task)
        .map_err(|e| format!("cuBLAS: device thread: {e:?}"))??;
    Ok(out)
}

/// How each product is ordered against the work CubeCL queues before and after it
/// (`STRATA_CUBLAS_WAIT`): `device` (the default) or `host`.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Wait {
    /// The host waits for CubeCL's stream before the product and for cuBLAS's after it: simple,
    /// but the GPU idles while the host queues the next launches.
    Host,
    /// The two streams wait for each other on the GPU ([`Handoff`]); the host never waits.
    Device,
}

/// The environment variable that chooses [`Wait`].
pub const WAIT_VAR: &str = "STRATA_CUBLAS_WAIT";

/// The [`Wait`] that [`WAIT_VAR`] names (`host` or `device`; unset or anything else: device).
pub fn wait() -> Wait {
    match std::env::var(WAIT_VAR).as_deref() {
        Ok("host") => Wait::Host,
        _ => Wait::Device,
    }
}

/// Two counters in device memory through which CubeCL's stream and cuBLAS's order each other
/// without the host waiting. Product number `t`:
///
/// 1. a one-unit CubeCL kernel sets `reached = t` (it runs after everything queued before it:
///    the product's operands are ready);
/// 2. on cuBLAS's stream a one-thread kernel spins until `reached ≥ t`, the product runs, and a
///    one-thread kernel sets `done = t` (after the product's kernels have finished);
/// 3. a one-unit CubeCL kernel spins until `done ≥ t`, so that nothing queued on CubeCL's
///    stream after it (readers of the output, reuse of the operands' memory) starts earlier.
///
/// (The driver's stream memory operations, `cuStreamWaitValue32`, would spare the spinning
/// kernel on cuBLAS's side, but refused CubeCL's memory with "invalid argument" on an H100:
/// its allocations come from a stream-ordered pool.) A spinning kernel holds one warp of one
/// multiprocessor while the other stream runs on the rest. It gives up after [`SPIN_LIMIT`]
/// polls and records the ticket in `timed_out`, so that a fault shows as wrong numbers (which
/// the GPU tests would catch) instead of a hung GPU.
struct Handoff {
    /// `[reached, done, timed_out]`, u32.
    flags: CubeTensor<CudaRuntime>,
    /// Device address of `flags` (the tensor keeps the memory in place).
    address: u64,
    spin: SpinKernels,
    ticket: u32,
}

/// The launch of the CubeCL side's kernels: one cube of one unit.
const ONE: CubeCount = CubeCount::Static(1, 1, 1);
const ONE_UNIT: CubeDim = CubeDim { x: 1, y: 1, z: 1 };

/// Polls before a spinning kernel gives up (an atomic read each, under a microsecond: seconds in
/// all, far beyond any product).
pub const SPIN_LIMIT: u32 = 1 << 24;

#[cube(launch_unchecked)]
fn reach_kernel(flags: &mut Tensor<Atomic<u32>>, ticket: u32) {
    if ABSOLUTE_POS == 0 {
        flags[0].store(ticket);
    }
}

#[cube(launch_unchecked)]
fn await_kernel(flags: &mut Tensor<Atomic<u32>>, ticket: u32) {
    if ABSOLUTE_POS == 0 {
        let mut polls = 0u32;
        loop {
            // An atomic read (CubeCL emits atomicAdd(x, 0)): never a cached value.
            if flags[1].load() >= ticket {
                break;
            }
            polls += 1;
            if polls >= SPIN_LIMIT {
                flags[2].store(ticket);
                break;
            }
        }
    }
}

/// The cuBLAS side's two kernels, compiled with NVRTC (which CubeCL's CUDA runtime loads too).
const SPIN_SOURCE: &str = r#"
extern "C" __global__ void wait_reached(unsigned int* flags, unsigned int ticket, unsigned int limit) {
    unsigned int polls = 0;
    while (atomicAdd(&flags[0], 0u) < ticket) {
        if (++polls >= limit) { atomicExch(&flags[2], ticket); break; }
    }
}
extern "C" __global__ void set_done(unsigned int* flags, unsigned int ticket) {
    atomicExch(&flags[1], ticket);
}
"#;

struct SpinKernels {
    wait_reached: driver_sys::CUfunction,
    set_done: driver_sys::CUfunction,
}

impl SpinKernels {
    fn compile() -> Result<Self, String> {
        let ptx = cudarc::nvrtc::compile_ptx(SPIN_SOURCE)
            .map_err(|e| format!("cuBLAS: compiling the handoff kernels: {e:?}"))?;
        let image = std::ffi::CString::new(ptx.to_src()).map_err(|e| format!("{e:?}"))?;
        let function = |module, name: &str| {
            let name = std::ffi::CString::new(name).expect("a kernel name");
            // SAFETY: a module just loaded in the current context.
            unsafe { driver::module::get_function(module, name) }
                .map_err(|e| format!("cuBLAS: handoff kernel: {e:?}"))
        };
        // SAFETY: a NUL-terminated PTX image; the module lives as long as the process.
        let module = unsafe { driver::module::load_data(image.as_ptr().cast()) }
            .map_err(|e| format!("cuBLAS: loading the handoff kernels: {e:?}"))?;
        Ok(Self {
            wait_reached: function(module, "wait_reached")?,
            set_done: function(module, "set_done")?,
        })
    }

    /// One thread of `function` on `stream` with these arguments.
    fn launch(
        function: driver_sys::CUfunction,
        stream: driver_sys::CUstream,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        // SAFETY: the arguments match the kernel's parameters (a device pointer to three u32s
        // and u32 scalars), each pointing at a live local of the caller.
        unsafe { driver::launch_kernel(function, (1, 1, 1), (1, 1, 1), 0, stream, args) }
            .map_err(|e| format!("cuBLAS: handoff launch: {e:?}"))
    }
}

impl Handoff {
    fn new(client: &Client, device: &CudaDevice) -> Result<Self, String> {
        let flags = zeros_client(
            client.clone(),
            device.clone(),
            Shape::from(vec![3]),
            DType::U32,
        );
        let address = client
            .get_resource(flags.handle.clone())
            .map_err(|e| format!("cuBLAS: handoff flags: {e:?}"))?
            .resource()
            .ptr;
        Ok(Self {
            flags,
            address,
            spin: SpinKernels::compile()?,
            ticket: 0,
        })
    }

    /// Step 1: a one-unit CubeCL kernel sets `reached = ticket`.
    fn reach(&self, client: &Client, ticket: u32) {
        let flags = self.flags.clone().into_tensor_arg();
        // SAFETY: one unit writes index 0 of a 3-element tensor.
        unsafe {
            reach_kernel::launch_unchecked::<CudaRuntime>(client, ONE, ONE_UNIT, flags, ticket)
        }
    }

    /// Step 3: a one-unit CubeCL kernel spins until `done ≥ ticket`.
    fn await_done(&self, client: &Client, ticket: u32) {
        let flags = self.flags.clone().into_tensor_arg();
        // SAFETY: one unit reads index 1 and writes index 2 of a 3-element tensor.
        unsafe {
            await_kernel::launch_unchecked::<CudaRuntime>(client, ONE, ONE_UNIT, flags, ticket)
        }
    }

    /// Step 1 and the wait of step 2: the ticket of this product.
    fn open(&mut self, client: &Client, stream: driver_sys::CUstream) -> Result<u32, String> {
        self.ticket += 1;
        let ticket = self.ticket;
        self.reach(client, ticket);
        let (mut address, mut ticket_arg, mut limit) = (self.address, ticket, SPIN_LIMIT);
        SpinKernels::launch(
            self.spin.wait_reached,
            stream,
            &mut [
                (&mut address as *mut u64).cast(),
                (&mut ticket_arg as *mut u32).cast(),
                (&mut limit as *mut u32).cast(),
            ],
        )?;
        Ok(ticket)
    }

    /// The end of step 2 (after the product) and step 3.
    fn close(
        &self,
        client: &Client,
        stream: driver_sys::CUstream,
        ticket: u32,
    ) -> Result<(), String> {
        let (mut address, mut ticket_arg) = (self.address, ticket);
        SpinKernels::launch(
            self.spin.set_done,
            stream,
            &mut [
                (&mut address as *mut u64).cast(),
                (&mut ticket_arg as *mut u32).cast(),
            ],
        )?;
        self.await_done(client, ticket);
        Ok(())
    }
}

/// [`matmul`] (or, with `heads_last`, [`matmul_heads_last`]) for tensors of any CubeCL
/// runtime: an error unless it is CUDA's.
pub fn matmul_on<R: burn_cubecl::CubeRuntime>(
    lhs: CubeTensor<R>,
    rhs: CubeTensor<R>,
    heads_last: bool,
) -> Result<CubeTensor<R>, String> {
    let (Some(lhs), Some(rhs)) = (as_cuda(lhs), as_cuda(rhs)) else {
        return Err("cuBLAS runs on the CUDA backend only".into());
    };
    let out = if heads_last {
        matmul_heads_last(lhs, rhs)?
    } else {
        matmul(lhs, rhs)?
    };
    let out: Box<dyn Any> = Box::new(out);
    Ok(*out.downcast().expect("R is CudaRuntime"))
}

fn as_cuda<R: burn_cubecl::CubeRuntime>(t: CubeTensor<R>) -> Option<CubeTensor<CudaRuntime>> {
    let boxed: Box<dyn Any> = Box::new(t);
    boxed.downcast().ok().map(|t| *t)
}
