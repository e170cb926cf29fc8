//! [`Kernels`]: the kernels of `kernels/` compiled for one CUDA device, loaded into its context
//! once, and launched on one stream through typed methods that check their arguments (an error,
//! never a launch out of bounds, never a panic).
//!
//! Every method enqueues on the stream; those that return a number (a count, the top-k
//! threshold) wait for it by polling the stream against the deadline given to [`Kernels::new`],
//! never blocking without bound. Each method's semantics are its reference's in
//! [`reference`](mod@super::reference), bit for bit. (cudarc's own waits are not bounded: dropping a
//! `CudaSlice` waits for the work that uses it, so after a [`KernelError::Timeout`] the stream's
//! buffers are best leaked or the process ended.)
//!
//! Written against cudarc 0.19's driver API; it needs a GPU to run, which this project's CI
//! machine does not have: opening a device without a driver is an error (tested), the launches
//! are exercised by the GPU check (`tests/kernels.rs` on a GPU).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::error::KernelError;
use super::nvrtc::Nvrtc;
use super::reference::{find_threshold, HalfFormat, Threshold};
use super::{architecture_for, SOURCES};

/// Threads per block of every launch (a multiple of 32: the counting kernels vote per warp).
pub const BLOCK: u32 = 256;

/// Pause between two polls of the stream.
const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// The most blocks of a one-dimensional grid.
const MAX_BLOCKS: u64 = i32::MAX as u64;

/// Stands for a null pointer argument (a codec without error feedback has no residual).
const NULL: u64 = 0;

/// The kernels, loaded for the device of one stream.
pub struct Kernels {
    stream: Arc<CudaStream>,
    arch: &'static str,
    functions: HashMap<&'static str, CudaFunction>,
    timeout: Duration,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("device", &self.stream.context().ordinal())
            .field("arch", &self.arch)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// One rank's top-k selection on the device (see [`Kernels::topk_select`]).
#[derive(Debug)]
pub struct TopKSelection {
    /// The threshold selecting exactly the pairs (for [`Kernels::topk_residual`]).
    pub threshold: Threshold,
    /// The selected indices, `k` of them, in no particular order.
    pub indices: CudaSlice<u32>,
    /// Their values, `grad + residual`, in the same order.
    pub values: CudaSlice<f32>,
    /// Calls of `count_selected` made (at most [`max_probes`](super::reference::max_probes)).
    pub probes: u32,
}

fn driver(call: &'static str, kernel: &'static str) -> impl Fn(DriverError) -> KernelError {
    move |e| KernelError::Driver {
        call,
        kernel,
        why: e.to_string(),
    }
}

fn arguments(kernel: &'static str, reason: String) -> KernelError {
    KernelError::Arguments { kernel, reason }
}

/// `Ok` when `len` is `want`, else an error naming the buffer.
fn same_len(kernel: &'static str, what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len == want {
        return Ok(());
    }
    Err(arguments(
        kernel,
        format!("{what} holds {len} elements, the input {want}"),
    ))
}

/// The divisor of an average over `world` ranks, as the CPU codecs compute it.
fn world_f32(kernel: &'static str, world: usize) -> Result<f32, KernelError> {
    if world == 0 {
        return Err(arguments(kernel, "a world of 0 ranks".into()));
    }
    Ok(world as f32)
}

/// Pushes `residual` as a kernel argument, or a null pointer (no error feedback).
fn arg_or_null<'a>(args: &mut cudarc::driver::LaunchArgs<'a>, residual: Option<&'a CudaSlice<f32>>) {
    match residual {
        Some(r) => args.arg(r),
        None => args.arg(&NULL),
    };
}

fn half_kernel(format: HalfFormat, f16: &'static str, bf16: &'static str) -> &'static str {
    match format {
        HalfFormat::F16 => f16,
        HalfFormat::Bf16 => bf16,
    }
}

impl Kernels {
    /// Opens CUDA device `ordinal` (a new stream on its primary context) and loads the kernels.
    /// Without a driver or that device, [`KernelError::NoDevice`] (never a panic).
    pub fn open(ordinal: usize, timeout: Duration) -> Result<Kernels, KernelError> {
        let no_device = |why: String| KernelError::NoDevice { ordinal, why };
        // SAFETY: only checks whether the driver library loads; calls nothing in it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(no_device(
                "libcuda.so (the NVIDIA driver) is not on this machine: the kernels need a GPU".into(),
            ));
        }
        let context = CudaContext::new(ordinal).map_err(|e| no_device(e.to_string()))?;
        let stream = context
            .new_stream()
            .map_err(driver("creating a stream", "the kernels"))?;
        Kernels::new(stream, timeout)
    }

    /// Compiles every kernel source with NVRTC for the architecture of the stream's device
    /// ([`architecture_for`]), loads each into its context once, and launches on `stream`;
    /// `timeout` bounds every wait for the device.
    pub fn new(stream: Arc<CudaStream>, timeout: Duration) -> Result<Kernels, KernelError> {
        let context = stream.context().clone();
        let (major, minor) = context
            .compute_capability()
            .map_err(driver("reading the compute capability", "the kernels"))?;
        let arch = architecture_for(major, minor)?;
        let nvrtc = Nvrtc::get()?;
        let mut functions = HashMap::new();
        for source in &SOURCES {
            let ptx = nvrtc.compile(source, arch)?;
            let module = context
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.text))
                .map_err(|e| KernelError::Driver {
                    call: "loading the PTX",
                    kernel: source.file,
                    why: if e.0 == CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                        let (nv_major, nv_minor) = nvrtc.version();
                        format!(
                            "{e}: the driver is older than NVRTC {nv_major}.{nv_minor} ({}): use an NVRTC no \
                             newer than the driver's CUDA version (NVRTC_LIBRARY)",
                            nvrtc.path.display()
                        )
                    } else {
                        e.to_string()
                    },
                })?;
            for &entry in source.entries {
                let function = module
                    .load_function(entry)
                    .map_err(driver("finding the kernel in its module", entry))?;
                functions.insert(entry, function);
            }
        }
        Ok(Kernels {
            stream,
            arch,
            functions,
            timeout,
        })
    }

    /// The architecture the kernels were compiled for (`compute_90`).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A copy of `host` on the device (an empty slice for an empty one).
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, KernelError> {
        if host.is_empty() {
            return self.stream.null().map_err(driver("allocating", "upload"));
        }
        self.stream
            .clone_htod(host)
            .map_err(driver("copying to the device", "upload"))
    }

    /// `len` zeros on the device.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, KernelError> {
        if len == 0 {
            return self.stream.null().map_err(driver("allocating", "zeros"));
        }
        self.stream.alloc_zeros(len).map_err(driver("allocating", "zeros"))
    }

    /// The device's `slice` on the host, once the work queued before it is done (bounded).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, slice: &CudaSlice<T>) -> Result<Vec<T>, KernelError> {
        let mut host = vec![T::default(); slice.len()];
        if host.is_empty() {
            return Ok(host);
        }
        self.wait("download")?;
        self.stream
            .memcpy_dtoh(slice, &mut host)
            .map_err(driver("copying to the host", "download"))?;
        self.wait("download")?;
        Ok(host)
    }

    /// `cast_f16` / `cast_bf16`: `out = half((grad + residual) / world)`, `residual` untouched
    /// (`None`: no error feedback). Keep `out` as this rank's sent values for
    /// [`Kernels::half_residual`] and all-reduce a copy.
    pub fn cast(
        &self,
        format: HalfFormat,
        grad: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<u16>,
        world: usize,
    ) -> Result<(), KernelError> {
        let kernel = half_kernel(format, "cast_f16", "cast_bf16");
        let n = grad.len();
        same_len(kernel, "out", out.len(), n)?;
        if let Some(r) = residual {
            same_len(kernel, "residual", r.len(), n)?;
        }
        let world = world_f32(kernel, world)?;
        let n64 = n as u64;
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(grad);
        arg_or_null(&mut args, residual);
        args.arg(out).arg(&n64).arg(&world);
        self.launch(kernel, n, &mut args)
    }

    /// `widen_f16` / `widen_bf16`: `out = f32(input)`.
    pub fn widen(
        &self,
        format: HalfFormat,
        input: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let kernel = half_kernel(format, "widen_f16", "widen_bf16");
        let n = input.len();
        same_len(kernel, "out", out.len(), n)?;
        let n64 = n as u64;
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(input).arg(out).arg(&n64);
        self.launch(kernel, n, &mut args)
    }

    /// `residual_f16` / `residual_bf16`: `residual = (grad + residual) - f32(sent) * world`, for a
    /// step whose reduced sum is finite ([`Kernels::count_nonfinite_half`] is 0); `sent` is
    /// this rank's [`Kernels::cast`] output.
    pub fn half_residual(
        &self,
        format: HalfFormat,
        grad: &CudaSlice<f32>,
        residual: &mut CudaSlice<f32>,
        sent: &CudaSlice<u16>,
        world: usize,
    ) -> Result<(), KernelError> {
        let kernel = half_kernel(format, "residual_f16", "residual_bf16");
        let n = grad.len();
        same_len(kernel, "residual", residual.len(), n)?;
        same_len(kernel, "sent", sent.len(), n)?;
        let world = world_f32(kernel, world)?;
        let n64 = n as u64;
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(grad).arg(residual).arg(sent).arg(&n64).arg(&world);
        self.launch(kernel, n, &mut args)
    }

    /// `count_nonfinite_half`: how many of `values` are inf or NaN (waits for the answer).
    pub fn count_nonfinite_half(&self, format: HalfFormat, values: &CudaSlice<u16>) -> Result<u64, KernelError> {
        let kernel = "count_nonfinite_half";
        let (n, n64, exponent) = (values.len(), values.len() as u64, u32::from(format.exponent_mask()));
        let mut count = self.counter(kernel)?;
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(values).arg(&n64).arg(&exponent).arg(&mut count);
        self.launch(kernel, n, &mut args)?;
        self.read_counter(kernel, &count)
    }

    /// `count_nonfinite`: how many of `values` are inf or NaN (waits for the answer).
    pub fn count_nonfinite(&self, values: &CudaSlice<f32>) -> Result<u64, KernelError> {
        let kernel = "count_nonfinite";
        let (n, n64) = (values.len(), values.len() as u64);
        let mut count = self.counter(kernel)?;
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(values).arg(&n64).arg(&mut count);
        self.launch(kernel, n, &mut args)?;
        self.read_counter(kernel, &count)
    }

    /// `count_selected`: how many elements of `grad + residual` `threshold` selects (waits).
    pub fn count_selected(
        &self,
        grad: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        threshold: Threshold,
    ) -> Result<u64, KernelError> {
        let kernel = "count_selected";
        Self::topk_lengths(kernel, grad, residual)?;
        let mut count = self.counter(kernel)?;
        self.count_into(&mut count, grad, residual, threshold)
    }

    /// One rank's top-k: the `k` elements of `grad + residual` with the largest magnitudes, lower
    /// index first on ties (the CPU codec's choice), as (index, value) pairs in no particular
    /// order; `residual` untouched (`None`: no error feedback). The threshold is bisected on
    /// the host, one `count_selected` and one wait per probe: 31 probes, plus at most
    /// `ceil(log2 n)` when elements tie at the k-th magnitude, none when `k` is 0 or `n`. Then
    /// `gather_selected` takes them. `n` must fit the CPU codec's i32 indices; `k <= n`.
    pub fn topk_select(
        &self,
        grad: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        k: usize,
    ) -> Result<TopKSelection, KernelError> {
        let n = grad.len();
        Self::topk_lengths("topk_select", grad, residual)?;
        if k > n {
            return Err(arguments("topk_select", format!("k = {k} of only {n} elements")));
        }
        let kernel = "gather_selected";
        let mut count = self.counter("count_selected")?;
        let (threshold, probes) = find_threshold(n, k, |t| self.count_into(&mut count, grad, residual, t))?;
        let mut indices = self.zeros::<u32>(k)?;
        let mut values = self.zeros::<f32>(k)?;
        let mut cursor = self.counter(kernel)?;
        let (n64, k64) = (n as u64, k as u64);
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(grad);
        arg_or_null(&mut args, residual);
        args.arg(&n64)
            .arg(&threshold.magnitude)
            .arg(&threshold.last_tie)
            .arg(&mut cursor)
            .arg(&k64)
            .arg(&mut indices)
            .arg(&mut values);
        self.launch(kernel, n, &mut args)?;
        let taken = self.read_counter(kernel, &cursor)?;
        if taken != k64 {
            return Err(KernelError::Inconsistent {
                kernel,
                reason: format!(
                    "took {taken} elements where count_selected counted {k} for {threshold:?}: the gradient or \
                     the residual changed during the selection"
                ),
            });
        }
        Ok(TopKSelection {
            threshold,
            indices,
            values,
            probes,
        })
    }

    /// `residual_topk`: after a step whose gathered values are all finite
    /// ([`Kernels::count_nonfinite`] is 0), `residual = 0` where `threshold` (from
    /// [`Kernels::topk_select`] on the same `grad` and `residual`) sent the element, and
    /// `grad + residual` elsewhere.
    pub fn topk_residual(
        &self,
        grad: &CudaSlice<f32>,
        residual: &mut CudaSlice<f32>,
        threshold: Threshold,
    ) -> Result<(), KernelError> {
        let kernel = "residual_topk";
        let n = grad.len();
        same_len(kernel, "residual", residual.len(), n)?;
        let n64 = n as u64;
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(grad)
            .arg(residual)
            .arg(&n64)
            .arg(&threshold.magnitude)
            .arg(&threshold.last_tie);
        self.launch(kernel, n, &mut args)
    }

    /// `out[index] += value` for every gathered pair, rank after rank in the order of the
    /// all-gather (`indices` and `values` hold `pairs_per_rank` pairs of each rank, rank-major):
    /// the CPU codec's order of additions, so the sums are its bits. Every index is checked first
    /// (`count_out_of_range`, waited for): one not below `out.len()` is an error and nothing is
    /// written. A rank's indices must be distinct, as [`Kernels::topk_select`] makes them.
    pub fn scatter_add(
        &self,
        indices: &CudaSlice<u32>,
        values: &CudaSlice<f32>,
        pairs_per_rank: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let kernel = "scatter_add";
        let (pairs, numel) = (indices.len(), out.len());
        same_len(kernel, "values", values.len(), pairs)?;
        if pairs_per_rank == 0 || pairs % pairs_per_rank != 0 {
            if pairs == 0 {
                return Ok(());
            }
            return Err(arguments(
                kernel,
                format!("{pairs} pairs are not whole ranks of {pairs_per_rank} pairs"),
            ));
        }
        let (pairs64, n64, k64) = (pairs as u64, numel as u64, pairs_per_rank as u64);
        let mut bad = self.counter("count_out_of_range")?;
        let check = self.function("count_out_of_range")?;
        let mut args = self.stream.launch_builder(check);
        args.arg(indices).arg(&pairs64).arg(&n64).arg(&mut bad);
        self.launch("count_out_of_range", pairs, &mut args)?;
        let count = self.read_counter("count_out_of_range", &bad)?;
        if count > 0 {
            return Err(KernelError::OutOfRange { count, pairs, numel });
        }
        let function = self.function(kernel)?;
        for start in (0..pairs).step_by(pairs_per_rank) {
            let rank_indices = indices.slice(start..start + pairs_per_rank);
            let rank_values = values.slice(start..start + pairs_per_rank);
            let mut args = self.stream.launch_builder(function);
            args.arg(&rank_indices)
                .arg(&rank_values)
                .arg(&k64)
                .arg(&mut *out)
                .arg(&n64);
            self.launch(kernel, pairs_per_rank, &mut args)?;
        }
        Ok(())
    }

    /// `divide`: `values /= divisor` (the sum of the ranks' pairs into their average).
    pub fn divide(&self, values: &mut CudaSlice<f32>, divisor: f32) -> Result<(), KernelError> {
        let kernel = "divide";
        let (n, n64) = (values.len(), values.len() as u64);
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(values).arg(&n64).arg(&divisor);
        self.launch(kernel, n, &mut args)
    }

    /// The residual's length, and the size limit of the top-k kernels' u32 indices (the CPU
    /// codec's i32 wire indices: larger buckets are not supported on the device).
    fn topk_lengths(
        kernel: &'static str,
        grad: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
    ) -> Result<(), KernelError> {
        let n = grad.len();
        if let Some(r) = residual {
            same_len(kernel, "residual", r.len(), n)?;
        }
        if n > i32::MAX as usize {
            return Err(arguments(
                kernel,
                format!("{n} elements: the device top-k takes buckets of at most 2^31 - 1 (i32 indices)"),
            ));
        }
        Ok(())
    }

    /// One probe: zeroes `count`, counts what `threshold` selects, waits for the number.
    fn count_into(
        &self,
        count: &mut CudaSlice<u64>,
        grad: &CudaSlice<f32>,
        residual: Option<&CudaSlice<f32>>,
        threshold: Threshold,
    ) -> Result<u64, KernelError> {
        let kernel = "count_selected";
        self.stream
            .memset_zeros(count)
            .map_err(driver("zeroing the counter", kernel))?;
        let (n, n64) = (grad.len(), grad.len() as u64);
        let function = self.function(kernel)?;
        let mut args = self.stream.launch_builder(function);
        args.arg(grad);
        arg_or_null(&mut args, residual);
        args.arg(&n64)
            .arg(&threshold.magnitude)
            .arg(&threshold.last_tie)
            .arg(&mut *count);
        self.launch(kernel, n, &mut args)?;
        self.read_counter(kernel, count)
    }

    fn function(&self, kernel: &'static str) -> Result<&CudaFunction, KernelError> {
        self.functions.get(kernel).ok_or_else(|| KernelError::Inconsistent {
            kernel,
            reason: "not among the loaded kernels (SOURCES does not list it)".into(),
        })
    }

    /// A zeroed device counter.
    fn counter(&self, kernel: &'static str) -> Result<CudaSlice<u64>, KernelError> {
        self.stream
            .alloc_zeros::<u64>(1)
            .map_err(driver("allocating a counter", kernel))
    }

    /// The counter's value once the stream's work is done (bounded waits).
    fn read_counter(&self, kernel: &'static str, counter: &CudaSlice<u64>) -> Result<u64, KernelError> {
        // Pageable host memory: the copy blocks the host until it is done, so the kernels before
        // it are waited for first, against the deadline.
        self.wait(kernel)?;
        let mut host = [0u64; 1];
        self.stream
            .memcpy_dtoh(counter, &mut host)
            .map_err(driver("copying a counter to the host", kernel))?;
        self.wait(kernel)?;
        Ok(host[0])
    }

    /// Launches `args` over `n` elements (one thread each); nothing for `n == 0`.
    fn launch(&self, kernel: &'static str, n: usize, args: &mut LaunchArgs<'_>) -> Result<(), KernelError> {
        if n == 0 {
            return Ok(());
        }
        let blocks = (n as u64).div_ceil(u64::from(BLOCK));
        if blocks > MAX_BLOCKS {
            return Err(arguments(
                kernel,
                format!("{n} elements need {blocks} blocks of {BLOCK}, more than a grid holds"),
            ));
        }
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's parameters in order and type (each method
        // mirrors its kernel's signature in kernels/*.cu: device pointers as slices, or NULL
        // where the kernel accepts a null residual; u64 lengths; u32 and f32 scalars), and the
        // lengths passed are those of the slices, checked against each other above, so every
        // thread's index stays inside its buffers.
        unsafe { args.launch(config) }
            .map(|_| ())
            .map_err(driver("launching", kernel))
    }

    /// Waits for everything queued on the stream (launches, copies, and NCCL calls when the
    /// stream is a communicator's), polling it until the timeout.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.wait("synchronize")
    }

    /// Waits for the work queued on the stream, polling it until `timeout`.
    fn wait(&self, kernel: &'static str) -> Result<(), KernelError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver("binding the context", kernel))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: the stream is alive (held by self) and its context is bound.
            match unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(KernelError::Driver {
                        call: "waiting for the stream",
                        kernel,
                        why: format!("{other:?}"),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(KernelError::Timeout {
                    kernel,
                    timeout: self.timeout,
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}
