//! Top-k with error feedback on the GPU (`compression.method = "topk"` on NCCL, feature `cuda`):
//! the host codec's algorithm (`compress::TopK`), bucket by bucket over the flat gradient buffer
//! burn built on the device, with the kernels of `kernels/topk.cu` and NCCL's all-gather:
//!
//! 1. select the `k = ceil(ratio * n)` entries of `grad + residual` with the largest magnitudes
//!    (`Kernels::topk_select`: the CPU codec's choice, lower index first on ties);
//! 2. all-gather every rank's k indices and k values (two NCCL all-gathers);
//! 3. if every gathered value is finite, the residual keeps what was not sent (`residual_topk`);
//! 4. the bucket becomes the sum of the ranks' pairs, rank after rank (`scatter_add`, the CPU
//!    codec's order of additions), divided by the world size.
//!
//! A bucket where the pairs would not be smaller than the dense values is averaged dense, its
//! residual cleared, as the host codec does. The kernels run on the NCCL communicator's stream,
//! so selection, all-gathers and updates are ordered without synchronisations between them; the
//! threshold search waits for its counts (31 small probes per bucket).
//!
//! This machine's CI has no GPU: the module type-checks there, the kernels' parity with their CPU
//! references is the GPU check's, and this path runs where a machine has two GPUs or more.

use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use burn::tensor::Tensor;
use cudarc::driver::{CudaSlice, DevicePtr as CudaDevicePtr};

use crate::comm::{BufMut, BufRef, Communicator, DType, DevicePtr, Memory, MemoryMut, ReduceOp};
use crate::compress::TopK;
use crate::kernels::{KernelError, Kernels};

use super::device_sync::{DeviceAllReduce, DeviceSyncError};

/// Top-k over NCCL, bucket by bucket (see the module's text).
#[derive(Debug)]
pub struct DeviceTopK {
    reduce: DeviceAllReduce,
    kernels: Kernels,
    /// The host codec, for its rule of how many entries a bucket sends.
    codec: TopK,
    feedback: bool,
    /// Each bucket's elements in the flat buffer (the host engine's buckets).
    buckets: Vec<Range<usize>>,
    /// One residual per bucket, made at the first step.
    residuals: Mutex<Vec<CudaSlice<f32>>>,
}

impl DeviceTopK {
    /// Top-k keeping `ratio` of each of `buckets` (ranges of the flat gradient, in order, covering
    /// it), with error feedback when `feedback`, over `reduce`'s communicator.
    pub fn new(
        reduce: DeviceAllReduce,
        ratio: f32,
        feedback: bool,
        buckets: Vec<Range<usize>>,
    ) -> Result<Self, DeviceSyncError> {
        let kernels = reduce.kernels()?;
        Ok(Self {
            reduce,
            kernels,
            codec: TopK::new(ratio, feedback),
            feedback,
            buckets,
            residuals: Mutex::new(Vec::new()),
        })
    }

    /// The average of `flat` over the ranks, each bucket sent as its top-k pairs, written back
    /// into `flat`.
    pub fn average(&self, flat: Tensor<1>) -> Result<(Tensor<1>, f64), DeviceSyncError> {
        let started = Instant::now();
        let rank = self.reduce.rank();
        let kernel_err = |e: KernelError| DeviceSyncError::Buffer {
            rank,
            reason: e.to_string(),
        };
        let averaged = self.reduce.with_buffer(flat, |address, numel| {
            let covered = self.buckets.last().map_or(0, |b| b.end);
            if covered != numel {
                return Err(DeviceSyncError::Buffer {
                    rank,
                    reason: format!("the buckets cover {covered} elements, the gradient has {numel}"),
                });
            }
            let mut residuals = self.residuals.lock().unwrap_or_else(|p| p.into_inner());
            if residuals.len() != self.buckets.len() {
                *residuals = self
                    .buckets
                    .iter()
                    .map(|b| self.kernels.zeros::<f32>(b.len()))
                    .collect::<Result<_, _>>()
                    .map_err(kernel_err)?;
            }
            let stream = self.kernels.stream();
            for (bucket, residual) in self.buckets.iter().zip(residuals.iter_mut()) {
                let n = bucket.len();
                // SAFETY: elements `bucket` of burn's buffer of `numel` f32 values, alive while
                // `with_buffer` holds its resource guard; the view is leaked below, never freed
                // by cudarc.
                let mut grad = unsafe { stream.upgrade_device_ptr::<f32>(address + 4 * bucket.start as u64, n) };
                let outcome = self.bucket(&mut grad, residual);
                grad.leak();
                outcome?;
            }
            // burn reads the buffer next, on its own stream.
            self.kernels.synchronize().map_err(kernel_err)
        })?;
        Ok((averaged, started.elapsed().as_secs_f64() * 1e3))
    }

    /// Every bucket's residual one after another (one value per gradient element), `None`
    /// before the first step or without error feedback.
    pub fn residual(&self) -> Result<Option<Vec<f32>>, DeviceSyncError> {
        let residuals = self.residuals.lock().unwrap_or_else(|p| p.into_inner());
        if !self.feedback || residuals.is_empty() {
            return Ok(None);
        }
        let mut flat = Vec::with_capacity(self.buckets.last().map_or(0, |b| b.end));
        for residual in residuals.iter() {
            flat.extend(self.kernels.download(residual).map_err(|e| DeviceSyncError::Buffer {
                rank: self.reduce.rank(),
                reason: format!("reading the residual: {e}"),
            })?);
        }
        Ok(Some(flat))
    }

    /// Starts from the residual `flat` (from a checkpoint, buckets one after another).
    pub fn load_residual(&self, flat: &[f32]) -> Result<(), DeviceSyncError> {
        let rank = self.reduce.rank();
        let covered = self.buckets.last().map_or(0, |b| b.end);
        if flat.len() != covered {
            return Err(DeviceSyncError::Buffer {
                rank,
                reason: format!("a residual of {} values for buckets of {covered}", flat.len()),
            });
        }
        let uploaded = self
            .buckets
            .iter()
            .map(|b| self.kernels.upload(&flat[b.clone()]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeviceSyncError::Buffer {
                rank,
                reason: format!("loading the residual: {e}"),
            })?;
        *self.residuals.lock().unwrap_or_else(|p| p.into_inner()) = uploaded;
        Ok(())
    }

    /// One bucket, averaged in place.
    fn bucket(&self, grad: &mut CudaSlice<f32>, residual: &mut CudaSlice<f32>) -> Result<(), DeviceSyncError> {
        let rank = self.reduce.rank();
        let kernel_err = |e: KernelError| DeviceSyncError::Buffer {
            rank,
            reason: e.to_string(),
        };
        let comm = self.reduce.communicator();
        let (stream, ordinal, world) = (self.kernels.stream(), self.reduce.ordinal(), comm.world_size());
        let address = |slice: &CudaSlice<f32>| CudaDevicePtr::device_ptr(slice, stream).0;
        let n = grad.len();
        let k = self.codec.k_for(n);
        if k * TopK::pair_bytes(n) >= n * 4 {
            // The pairs would not be smaller than the values: dense, as the host codec. A
            // bucket's k never changes, so such a bucket is dense at every step and its residual
            // (cleared by the host codec on this path) stays zero: there is nothing to add.
            comm.all_reduce(
                BufMut {
                    dtype: DType::F32,
                    numel: n,
                    memory: MemoryMut::Device(DevicePtr {
                        address: address(grad),
                        ordinal,
                    }),
                },
                ReduceOp::Avg,
            )?;
            return Ok(());
        }
        let selection = self
            .kernels
            .topk_select(grad, self.feedback.then_some(&*residual), k)
            .map_err(kernel_err)?;
        let indices = self.kernels.zeros::<u32>(k * world).map_err(kernel_err)?;
        let values = self.kernels.zeros::<f32>(k * world).map_err(kernel_err)?;
        // The indices travel as i32: the same four bytes, and the host codec's wire type.
        let index_address = |slice: &CudaSlice<u32>| CudaDevicePtr::device_ptr(slice, stream).0;
        let gather = |dtype, from: u64, into: u64| {
            let at = |address| DevicePtr { address, ordinal };
            comm.all_gather(
                BufRef {
                    dtype,
                    numel: k,
                    memory: Memory::Device(at(from)),
                },
                BufMut {
                    dtype,
                    numel: k * world,
                    memory: MemoryMut::Device(at(into)),
                },
            )
        };
        gather(DType::I32, index_address(&selection.indices), index_address(&indices))?;
        gather(DType::F32, address(&selection.values), address(&values))?;
        // Every rank gathered the same pairs, so all agree whether the step is finite: only then
        // does the residual keep this step's input minus what was sent.
        let nonfinite = self.kernels.count_nonfinite(&values).map_err(kernel_err)?;
        if nonfinite == 0 && self.feedback {
            self.kernels
                .topk_residual(grad, residual, selection.threshold)
                .map_err(kernel_err)?;
        }
        stream.memset_zeros(grad).map_err(|e| DeviceSyncError::Buffer {
            rank,
            reason: format!("clearing the bucket: {e}"),
        })?;
        self.kernels
            .scatter_add(&indices, &values, k, grad)
            .map_err(kernel_err)?;
        self.kernels.divide(grad, world as f32).map_err(kernel_err)?;
        // Keep the selection's buffers alive until the stream has used them.
        self.kernels.synchronize().map_err(kernel_err)?;
        drop((selection, indices, values));
        Ok(())
    }
}
