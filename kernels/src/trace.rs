//! The GPU's kernel timeline on the CUDA backend, through CUPTI's activity API (the same records
//! Nsight Systems and PyTorch's profiler read): every kernel's name, stream, start and end.
//!
//! Why our own: the GPU machine has no Nsight Systems, and Nsight Compute serialises and
//! replays each kernel (one GPT-2 step took minutes under it). CUPTI only timestamps kernels as
//! they run, so a traced step runs at nearly its normal speed. libcupti is loaded at run time
//! (CUDA's `extras/CUPTI/lib64` must be on the library path); nothing is needed at build time.

use std::alloc::{Layout, alloc, dealloc};
use std::ffi::CStr;
use std::sync::Mutex;

use cudarc::cupti::result::{CuptiError, activity};
use cudarc::cupti::sys;

/// One kernel as it ran on the GPU.
#[derive(Clone, Debug)]
pub struct KernelRun {
    pub name: String,
    pub stream: u32,
    /// GPU timestamps, nanoseconds.
    pub start: u64,
    pub end: u64,
}

/// CUPTI's kernel record, as far as it is read here. Versions 10 to 13 of
/// `CUpti_ActivityKernel` (CUDA 12 and 13) share this prefix and only append fields, so the
/// prefix is read whichever version the library writes.
#[repr(C)]
struct KernelRecord {
    kind: u32,
    cache_config: u8,
    shared_memory_config: u8,
    registers_per_thread: u16,
    partitioned_global_cache_requested: u32,
    partitioned_global_cache_executed: u32,
    start: u64,
    end: u64,
    completed: u64,
    device_id: u32,
    context_id: u32,
    stream_id: u32,
    grid: [i32; 3],
    block: [i32; 3],
    static_shared_memory: i32,
    dynamic_shared_memory: i32,
    local_memory_per_thread: u32,
    local_memory_total: u32,
    correlation_id: u32,
    grid_id: i64,
    name: *const std::ffi::c_char,
}

const BUFFER_BYTES: usize = 8 << 20;
const BUFFER_ALIGN: usize = 8;
const CONCURRENT_KERNEL: sys::CUpti_ActivityKind =
    sys::CUpti_ActivityKind::CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;

/// Kernels recorded since [`start`], filled by CUPTI's buffer-complete callback.
static RUNS: Mutex<Vec<KernelRun>> = Mutex::new(Vec::new());

fn buffer_layout() -> Layout {
    Layout::from_size_align(BUFFER_BYTES, BUFFER_ALIGN).expect("a valid layout")
}

extern "C" fn buffer_requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
    // SAFETY: CUPTI passes valid out-pointers; the buffer is freed in `buffer_completed`, which
    // CUPTI calls for every buffer it was given.
    unsafe {
        *buffer = alloc(buffer_layout());
        *size = if (*buffer).is_null() { 0 } else { BUFFER_BYTES };
        *max_records = 0; // as many as fit
    }
}

extern "C" fn buffer_completed(
    _context: cudarc::driver::sys::CUcontext,
    _stream: u32,
    buffer: *mut u8,
    _size: usize,
    valid: usize,
) {
    let mut runs = Vec::new();
    let mut record: *mut sys::CUpti_Activity = std::ptr::null_mut();
    // SAFETY: `buffer` holds `valid` bytes of records written by CUPTI; a record of kind
    // CONCURRENT_KERNEL starts with `KernelRecord`'s fields, and its name is a C string CUPTI
    // keeps alive.
    unsafe {
        while activity::get_next_record(buffer, valid, &mut record).is_ok() {
            if (*record).kind != CONCURRENT_KERNEL {
                continue;
            }
            let kernel = &*(record as *const KernelRecord);
            let name = if kernel.name.is_null() {
                String::from("?")
            } else {
                CStr::from_ptr(kernel.name).to_string_lossy().into_owned()
            };
            runs.push(KernelRun {
                name,
                stream: kernel.stream_id,
                start: kernel.start,
                end: kernel.end,
            });
        }
        dealloc(buffer, buffer_layout());
    }
    RUNS.lock().unwrap_or_else(|e| e.into_inner()).extend(runs);
}

fn cupti_error(what: &str, error: CuptiError) -> String {
    format!("CUPTI: {what}: {error:?}")
}

/// Starts recording kernels (from here on, on every CUDA context of the process).
pub fn start() -> Result<(), String> {
    // SAFETY: only probes for the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "CUPTI: libcupti.so is not on the library path (CUDA's extras/CUPTI/lib64)".into(),
        );
    }
    RUNS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    activity::register_callbacks(Some(buffer_requested), Some(buffer_completed))
        .map_err(|e| cupti_error("registering buffers", e))?;
    activity::enable(CONCURRENT_KERNEL).map_err(|e| cupti_error("enabling kernel records", e))
}

/// Stops recording and returns the kernels that ran since [`start`], in start order. Call it
/// after the device has finished the work to be seen (records of kernels still running are
/// not complete).
pub fn stop() -> Result<Vec<KernelRun>, String> {
    activity::disable(CONCURRENT_KERNEL).map_err(|e| cupti_error("disabling kernel records", e))?;
    let forced = sys::CUpti_ActivityFlag::CUPTI_ACTIVITY_FLAG_FLUSH_FORCED as u32;
    activity::flush_all(forced).map_err(|e| cupti_error("flushing", e))?;
    let mut runs = std::mem::take(&mut *RUNS.lock().unwrap_or_else(|e| e.into_inner()));
    runs.sort_by_key(|run| run.start);
    Ok(runs)
}
