//! Gradients averaged on the GPU by NCCL (feature `cuda`): the flat gradient buffer that burn
//! built on the device is handed to NCCL by its device pointer, reduced in place, and only then
//! read back (once) for the host-side optimizer.
//!
//! burn's CUDA backend (cubecl) and burnrun's NCCL communicator both work in the device's primary
//! context (cubecl retains it, and so does cudarc's `CudaContext::new`), so the pointer burn's
//! allocator hands out is valid on NCCL's stream. burn's CUDA stream is not exposed, so the order
//! is kept by synchronisation: the device is
//! synchronised before NCCL reads the buffer on its own stream, and NCCL's stream is finished
//! (the communicator waits for every call, against its deadline) before burn touches the buffer
//! again.
//!
//! This machine's CI has no GPU: the module type-checks there (`DOCS_RS=1 cargo check --features
//! cuda`); it runs only where burn's CUDA backend links and a GPU is present.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor};
use cubecl::server::ServerStorage;

use cudarc::driver::{CudaSlice, DevicePtr as CudaDevicePtr};

use crate::comm::nccl::{CallCheck, CheckMode, NcclCommunicator};
use crate::comm::Store;
use crate::comm::{BufMut, CommError, Communicator, DType, DevicePtr, MemoryMut, ProcessGroup, ReduceOp};
use crate::kernels::{HalfFormat, Kernels};

use burn::cubecl;

/// The CUDA server type of cubecl, whose storage hands out raw device pointers (not exported by
/// name: reached through the runtime).
type CudaServer = <cubecl::cuda::CudaRuntime as cubecl_runtime::runtime::Runtime>::Server;

/// Why the device all-reduce could not run.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSyncError {
    /// The world group was not built through a store (NCCL's unique id travels through it).
    #[error("rank {rank}: the NCCL communicator needs the job's store, and this process group has none (start the job with burnrun)")]
    NoStore {
        /// This rank.
        rank: usize,
    },
    /// `BURNRUN_NCCL_CHECK` is not a mode.
    #[error("rank {rank}: {reason}")]
    Check {
        /// This rank.
        rank: usize,
        /// What was wrong.
        reason: String,
    },
    /// NCCL could not be set up.
    #[error("rank {rank}: NCCL on CUDA device {ordinal}: {source}")]
    Nccl {
        /// This rank.
        rank: usize,
        /// The device.
        ordinal: usize,
        /// NCCL's error.
        source: crate::comm::nccl::NcclError,
    },
    /// The buffer is not a contiguous f32 CUDA buffer, or its pointer could not be had.
    #[error("rank {rank}: the gradient buffer cannot go to NCCL: {reason}")]
    Buffer {
        /// This rank.
        rank: usize,
        /// What was wrong.
        reason: String,
    },
    /// The all-reduce failed.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// A rank's NCCL communicator for averaging flat gradient tensors on its CUDA device.
#[derive(Debug)]
pub struct DeviceAllReduce {
    comm: NcclCommunicator,
    ordinal: usize,
    rank: usize,
}

impl DeviceAllReduce {
    /// Joins NCCL beside `group` (same ranks) on CUDA device `ordinal`; the unique id and the
    /// fingerprint checks go through the group's store (a launched job's world group has it).
    pub fn new(group: &ProcessGroup, ordinal: usize, timeout: Duration) -> Result<Self, DeviceSyncError> {
        let rank = group.global_ranks()[group.rank()];
        let store = group.store().cloned().ok_or(DeviceSyncError::NoStore { rank })?;
        Self::new_in(group, store, ordinal, timeout)
    }

    /// [`DeviceAllReduce::new`] for any group (a sub-group has no store of its own) through the
    /// job's `store`, under keys naming the group's global ranks, so that every group of a mesh
    /// gets its own communicator.
    pub fn new_in(
        group: &ProcessGroup,
        store: Arc<dyn Store>,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, DeviceSyncError> {
        let rank = group.global_ranks()[group.rank()];
        let members: Vec<String> = group.global_ranks().iter().map(|r| r.to_string()).collect();
        let prefix = format!("nccl/grads/{}", members.join("-"));
        let mode = CheckMode::from_env().map_err(|reason| DeviceSyncError::Check { rank, reason })?;
        let (member, size) = (group.rank(), group.world_size());
        let comm = NcclCommunicator::new(&*store, &format!("{prefix}/id"), member, size, ordinal, timeout)
            .map_err(|source| DeviceSyncError::Nccl { rank, ordinal, source })?
            .with_check(CallCheck::new(
                store,
                format!("{prefix}/check"),
                member,
                size,
                mode,
                timeout,
            ));
        Ok(Self { comm, ordinal, rank })
    }

    /// This rank (global).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The CUDA device.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The communicator (for the bytes it moved, its links).
    pub fn communicator(&self) -> &NcclCommunicator {
        &self.comm
    }

    /// Averages `flat` (a flat f32 tensor on this rank's CUDA device, e.g. from
    /// [`super::params::flat_grads_on_device`]) over the ranks, in place on the device, and
    /// returns it with the time NCCL took.
    pub fn average(&self, flat: Tensor<1>) -> Result<(Tensor<1>, f64), DeviceSyncError> {
        let started = Instant::now();
        let averaged = self.all_reduce_in_place(flat, ReduceOp::Avg)?;
        Ok((averaged, started.elapsed().as_secs_f64() * 1e3))
    }

    /// `op` over the ranks of `flat`'s own f32 buffer, in place on the device.
    fn all_reduce_in_place(&self, flat: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DeviceSyncError> {
        self.with_buffer(flat, |address, numel| {
            self.comm.all_reduce(
                BufMut {
                    dtype: DType::F32,
                    numel,
                    memory: MemoryMut::Device(DevicePtr {
                        address,
                        ordinal: self.ordinal,
                    }),
                },
                op,
            )?;
            Ok(())
        })
    }

    /// The codec kernels on this communicator's stream (ordered with its calls).
    pub(crate) fn kernels(&self) -> Result<Kernels, DeviceSyncError> {
        Kernels::new(self.comm.stream().clone(), self.comm.timeout()).map_err(|e| DeviceSyncError::Buffer {
            rank: self.rank,
            reason: format!("the codec kernels: {e}"),
        })
    }

    /// Sums `values` (a flat f32 tensor of its own on this rank's CUDA device) over the ranks, in
    /// place on the device: the collective of a codec on the GPU (PowerSGD's factors,
    /// [`super::DevicePowerSgd`]).
    pub fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DeviceSyncError> {
        self.all_reduce_in_place(values, ReduceOp::Sum)
    }

    /// Runs `work` on the device address and length of `flat`'s buffer (a contiguous f32 CUDA
    /// buffer of its own, which `work` may rewrite in place), after burn's work on it is done;
    /// returns the tensor over the same buffer.
    pub(crate) fn with_buffer(
        &self,
        flat: Tensor<1>,
        work: impl FnOnce(u64, usize) -> Result<(), DeviceSyncError>,
    ) -> Result<Tensor<1>, DeviceSyncError> {
        let rank = self.rank;
        let buffer = |reason| DeviceSyncError::Buffer { rank, reason };
        with_cuda_buffer(
            flat,
            true,
            |address, numel, dtype| match dtype {
                DType::F32 => work(address, numel),
                other => Err(buffer(format!("dtype {other:?}, expected f32"))),
            },
            buffer,
        )
    }
}

/// Runs `work` on the device address, element count and element type of `tensor`'s buffer
/// (contiguous f32, f16 or bf16 on a CUDA device; with `writable`, a buffer of its own that `work` may rewrite in place), once
/// burn's queued work is done (burn's stream is not exposed: the device is synchronised), and
/// returns the tensor over the same buffer, on the inner (non-autodiff) backend. The allocation
/// stays in place while `work` runs. `buffer_err` turns a reason into the caller's error.
pub(crate) fn with_cuda_buffer<const D: usize, E>(
    tensor: Tensor<D>,
    writable: bool,
    work: impl FnOnce(u64, usize, DType) -> Result<(), E>,
    buffer_err: impl Fn(String) -> E,
) -> Result<Tensor<D>, E> {
    let device: Device = tensor.device();
    // burn's stream must have finished writing the buffer (or, for a fresh one, every kernel
    // that used its memory before) before NCCL's stream touches it.
    device
        .sync()
        .map_err(|e| buffer_err(format!("synchronising the device: {e:?}")))?;
    let prim = tensor
        .without_autodiff()
        .try_into_primitive::<burn::backend::Cuda>()
        .map_err(|e| buffer_err(format!("not a CUDA tensor: {e:?}")))?;
    let dtype = match prim.dtype {
        burn::tensor::DType::F32 => DType::F32,
        burn::tensor::DType::F16 => DType::F16,
        burn::tensor::DType::BF16 => DType::BF16,
        other => {
            return Err(buffer_err(format!(
                "dtype {other:?}: only f32, f16 and bf16 go to NCCL"
            )))
        }
    };
    if !prim.is_contiguous() || (writable && !prim.can_mut()) {
        return Err(buffer_err(
            "not a contiguous buffer of its own (a view or a shared one)".into(),
        ));
    }
    let numel = prim.meta.num_elements();
    {
        // The guard keeps the allocation in place while NCCL uses it.
        let resource = prim
            .client
            .get_resource::<CudaServer>(prim.handle.clone())
            .map_err(|e| buffer_err(format!("its device pointer: {e:?}")))?;
        work(resource.resource().ptr, numel, dtype)?;
    }
    Ok(Tensor::<D>::from_primitive::<burn::backend::Cuda>(prim))
}

/// fp16 or bf16 on the wire, on the GPU (`compression.method = "fp16" | "bf16"` on NCCL): each
/// rank casts `(grad + residual) / world` to 16 bits with the kernels of `kernels/half_cast.cu`,
/// NCCL sums the 16-bit buffers, the sum is widened back into the gradient buffer, and, when the
/// sum is finite, the residual keeps what the rounding lost (error feedback, as the host codec:
/// the kernels' CPU references match it bit for bit). The kernels run on the NCCL communicator's
/// stream, so cast, all-reduce and widening are ordered without a synchronisation between them.
#[derive(Debug)]
pub struct DeviceHalfWire {
    reduce: DeviceAllReduce,
    kernels: Kernels,
    format: HalfFormat,
    feedback: bool,
    /// The residual and the two 16-bit buffers, sized at the first step.
    state: Mutex<Option<HalfState>>,
}

#[derive(Debug)]
struct HalfState {
    residual: CudaSlice<f32>,
    /// This rank's cast values (for the residual).
    sent: CudaSlice<u16>,
    /// The buffer NCCL sums in place.
    wire: CudaSlice<u16>,
}

impl DeviceHalfWire {
    /// `format` on the wire over `reduce`'s communicator, with error feedback when `feedback`.
    pub fn new(reduce: DeviceAllReduce, format: HalfFormat, feedback: bool) -> Result<Self, DeviceSyncError> {
        let kernels = reduce.kernels()?;
        Ok(Self {
            reduce,
            kernels,
            format,
            feedback,
            state: Mutex::new(None),
        })
    }

    /// The residual (one value per gradient element), `None` before the first step or without
    /// error feedback.
    pub fn residual(&self) -> Result<Option<Vec<f32>>, DeviceSyncError> {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(state) if self.feedback => {
                let values = self
                    .kernels
                    .download(&state.residual)
                    .map_err(|e| DeviceSyncError::Buffer {
                        rank: self.reduce.rank,
                        reason: format!("reading the residual: {e}"),
                    })?;
                Ok(Some(values))
            }
            _ => Ok(None),
        }
    }

    /// Starts from the residual `flat` (from a checkpoint) instead of zeros.
    pub fn load_residual(&self, flat: &[f32]) -> Result<(), DeviceSyncError> {
        let rank = self.reduce.rank;
        let kernel_err = |e: crate::kernels::KernelError| DeviceSyncError::Buffer {
            rank,
            reason: format!("loading the residual: {e}"),
        };
        let n = flat.len();
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(HalfState {
            residual: self.kernels.upload(flat).map_err(kernel_err)?,
            sent: self.kernels.zeros(n).map_err(kernel_err)?,
            wire: self.kernels.zeros(n).map_err(kernel_err)?,
        });
        Ok(())
    }

    /// The average of `flat` over the ranks, sent as 16-bit values, written back into `flat`.
    pub fn average(&self, flat: Tensor<1>) -> Result<(Tensor<1>, f64), DeviceSyncError> {
        let started = Instant::now();
        let rank = self.reduce.rank;
        let kernel_err = |e: crate::kernels::KernelError| DeviceSyncError::Buffer {
            rank,
            reason: e.to_string(),
        };
        let averaged = self.reduce.with_buffer(flat, |address, numel| {
            let stream = self.kernels.stream();
            let world = self.reduce.comm.world_size();
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if guard.as_ref().is_none_or(|s| s.wire.len() != numel) {
                *guard = Some(HalfState {
                    residual: self.kernels.zeros(numel).map_err(kernel_err)?,
                    sent: self.kernels.zeros(numel).map_err(kernel_err)?,
                    wire: self.kernels.zeros(numel).map_err(kernel_err)?,
                });
            }
            let state = guard.as_mut().expect("set above");
            // SAFETY: burn's buffer of `numel` f32 values, alive while `with_buffer` holds its
            // resource guard; the view is leaked below, never freed by cudarc.
            let mut grad = unsafe { stream.upgrade_device_ptr::<f32>(address, numel) };
            let outcome = (|| {
                let residual = self.feedback.then_some(&state.residual);
                self.kernels
                    .cast(self.format, &grad, residual, &mut state.sent, world)
                    .map_err(kernel_err)?;
                stream
                    .memcpy_dtod(&state.sent, &mut state.wire)
                    .map_err(|e| DeviceSyncError::Buffer {
                        rank,
                        reason: format!("copying the cast values: {e}"),
                    })?;
                let wire_address = {
                    let (address, _sync) = CudaDevicePtr::device_ptr(&state.wire, stream);
                    address
                };
                self.reduce.comm.all_reduce(
                    BufMut {
                        dtype: match self.format {
                            HalfFormat::F16 => DType::F16,
                            HalfFormat::Bf16 => DType::BF16,
                        },
                        numel,
                        memory: MemoryMut::Device(DevicePtr {
                            address: wire_address,
                            ordinal: self.reduce.ordinal,
                        }),
                    },
                    ReduceOp::Sum,
                )?;
                // The residual keeps the rounding only of a step whose sum is finite (an
                // overflowed step is skipped by the loss scaler, its residual untouched).
                let nonfinite = self
                    .kernels
                    .count_nonfinite_half(self.format, &state.wire)
                    .map_err(kernel_err)?;
                if nonfinite == 0 && self.feedback {
                    self.kernels
                        .half_residual(self.format, &grad, &mut state.residual, &state.sent, world)
                        .map_err(kernel_err)?;
                }
                self.kernels
                    .widen(self.format, &state.wire, &mut grad)
                    .map_err(kernel_err)?;
                // burn reads the buffer next, on its own stream.
                self.kernels.synchronize().map_err(kernel_err)
            })();
            grad.leak();
            outcome
        })?;
        Ok((averaged, started.elapsed().as_secs_f64() * 1e3))
    }
}

/// The gradients' reduction on NCCL for `codec`: fp16 or bf16 on the wire through the GPU
/// kernels ([`DeviceHalfWire`]), top-k through them bucket by bucket over `buckets` (ranges of
/// the flat gradient: the host engine's buckets, [`super::DeviceTopK`]), PowerSGD with burn's
/// tensor ops bucket by bucket over `buckets` and their parameters' `shapes`, its factors summed
/// by NCCL ([`super::DevicePowerSgd`]), otherwise the f32 average ([`DeviceAllReduce`]); on CUDA
/// device `ordinal` beside `group` (its NCCL id through the job's `store`). Validation keeps a
/// codec with `start_step > 0` off this path.
#[allow(clippy::too_many_arguments)]
pub fn nccl_flat_reduce(
    group: &ProcessGroup,
    store: Arc<dyn Store>,
    ordinal: usize,
    timeout: Duration,
    codec: &crate::compress::CodecOptions,
    buckets: &[std::ops::Range<usize>],
    shapes: &[Vec<Vec<usize>>],
) -> Result<Box<dyn super::FlatReduce>, DeviceSyncError> {
    use crate::config::CompressionMethod;
    let reduce = DeviceAllReduce::new_in(group, store, ordinal, timeout)?;
    let format = match codec.method {
        CompressionMethod::Fp16 => HalfFormat::F16,
        CompressionMethod::Bf16 => HalfFormat::Bf16,
        CompressionMethod::TopK => {
            return Ok(Box::new(super::DeviceTopK::new(
                reduce,
                codec.topk_ratio,
                codec.error_feedback,
                buckets.to_vec(),
            )?))
        }
        CompressionMethod::PowerSgd => {
            let rank = reduce.rank();
            let powersgd = crate::compress::PowerSgd::new(codec.powersgd_rank, codec.error_feedback, codec.seed);
            let device = super::DevicePowerSgd::new(Box::new(reduce), powersgd, buckets, shapes).map_err(|e| {
                DeviceSyncError::Buffer {
                    rank,
                    reason: e.to_string(),
                }
            })?;
            return Ok(Box::new(device));
        }
        CompressionMethod::None => return Ok(Box::new(reduce)),
    };
    Ok(Box::new(DeviceHalfWire::new(reduce, format, codec.error_feedback)?))
}

// The server type must be the one whose storage gives raw CUDA pointers.
const _: fn() = || {
    fn storage<S: ServerStorage>() {}
    storage::<CudaServer>();
};
