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

use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor};
use cubecl::server::ServerStorage;

use crate::comm::nccl::{CallCheck, CheckMode, NcclCommunicator};
use crate::comm::{BufMut, CommError, Communicator, DType, DevicePtr, MemoryMut, ProcessGroup, ReduceOp};

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
    /// Joins NCCL beside `world` (same ranks) on CUDA device `ordinal`; the unique id and the
    /// fingerprint checks go through `world`'s store.
    pub fn new(world: &ProcessGroup, ordinal: usize, timeout: Duration) -> Result<Self, DeviceSyncError> {
        let rank = world.rank();
        let store = world.store().cloned().ok_or(DeviceSyncError::NoStore { rank })?;
        let mode = CheckMode::from_env().map_err(|reason| DeviceSyncError::Check { rank, reason })?;
        let comm = NcclCommunicator::new(&*store, "nccl/world/id", rank, world.world_size(), ordinal, timeout)
            .map_err(|source| DeviceSyncError::Nccl { rank, ordinal, source })?
            .with_check(CallCheck::new(
                store,
                "nccl/world/check",
                rank,
                world.world_size(),
                mode,
                timeout,
            ));
        Ok(Self { comm, ordinal, rank })
    }

    /// The communicator (for the bytes it moved, its links).
    pub fn communicator(&self) -> &NcclCommunicator {
        &self.comm
    }

    /// Averages `flat` (a flat f32 tensor on this rank's CUDA device, e.g. from
    /// [`super::params::flat_grads_on_device`]) over the ranks, in place on the device, and
    /// returns it with the time NCCL took.
    pub fn average(&self, flat: Tensor<1>) -> Result<(Tensor<1>, f64), DeviceSyncError> {
        let buffer = |reason: String| DeviceSyncError::Buffer {
            rank: self.rank,
            reason,
        };
        let device: Device = flat.device();
        // burn's stream must have finished writing the buffer before NCCL's stream reads it.
        device
            .sync()
            .map_err(|e| buffer(format!("synchronising the device: {e:?}")))?;
        let prim = flat
            .without_autodiff()
            .try_into_primitive::<burn::backend::Cuda>()
            .map_err(|e| buffer(format!("not a CUDA tensor: {e:?}")))?;
        if prim.dtype != burn::tensor::DType::F32 {
            return Err(buffer(format!("dtype {:?}, expected f32", prim.dtype)));
        }
        if !prim.is_contiguous() || !prim.can_mut() {
            return Err(buffer(
                "not a contiguous buffer of its own (a view or a shared one)".into(),
            ));
        }
        let numel = prim.meta.num_elements();
        let started = Instant::now();
        {
            // The guard keeps the allocation in place while NCCL writes it.
            let resource = prim
                .client
                .get_resource::<CudaServer>(prim.handle.clone())
                .map_err(|e| buffer(format!("its device pointer: {e:?}")))?;
            let address = resource.resource().ptr;
            self.comm.all_reduce(
                BufMut {
                    dtype: DType::F32,
                    numel,
                    memory: MemoryMut::Device(DevicePtr {
                        address,
                        ordinal: self.ordinal,
                    }),
                },
                ReduceOp::Avg,
            )?;
        }
        let comm_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok((Tensor::<1>::from_primitive::<burn::backend::Cuda>(prim), comm_ms))
    }
}

// The server type must be the one whose storage gives raw CUDA pointers.
const _: fn() = || {
    fn storage<S: ServerStorage>() {}
    storage::<CudaServer>();
};
