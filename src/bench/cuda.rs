//! `burnrun bench <op> --device cuda`: the same sweep on CUDA device buffers, through NCCL.
//!
//! Each rank's buffers are device allocations made on its [`NcclCommunicator`]'s own stream, so
//! filling them, the collectives and the copy back for the check are ordered without further
//! synchronisation. They hold the same pattern as the CPU benchmark's (filled on the host, copied
//! in) and the result is copied back and compared exactly, element by element. Every call returns
//! once the device has finished it (the communicator polls its stream against the deadline), so
//! the wall clock around the timed iterations is what a caller waits for, launch and completion
//! included; the reported time is the slowest rank's mean, as for the CPU benchmark. The barrier
//! and the reductions of times and wrong counts go through the same communicator (host values
//! staged through the device).

use std::io::Write;
use std::marker::PhantomData;

use cudarc::driver::{CudaSlice, DevicePtr as _};

use crate::comm::nccl::NcclCommunicator;
use crate::comm::{BufMut, BufRef, CommError, Communicator, DevicePtr, Memory, MemoryMut, ReduceOp};

use super::buffers::{Layout, Workload};
use super::collective::run_sweep;
use super::error::BenchError;
use super::options::{BenchDevice, BenchOp, CollectiveBenchOptions};
use super::report::{BenchRow, RunInfo};
use super::values::{with_bench_value, BenchValue};

/// Runs the benchmark on every rank of `comm` (one rank per CUDA device) and prints the table
/// (or JSON lines) on rank 0's stdout. Every rank returns the same rows. Fails if a collective or
/// a device operation fails or, when results are checked, if any element was wrong (after
/// printing every row).
pub fn run_collective_cuda(
    comm: &NcclCommunicator,
    opts: &CollectiveBenchOptions,
) -> Result<Vec<BenchRow>, BenchError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_collective_cuda_to(comm, opts, &mut out)
}

/// [`run_collective_cuda`], writing rank 0's report to `out`.
pub fn run_collective_cuda_to(
    comm: &NcclCommunicator,
    opts: &CollectiveBenchOptions,
    out: &mut dyn Write,
) -> Result<Vec<BenchRow>, BenchError> {
    opts.validate(comm.world_size())?;
    if opts.device != BenchDevice::Cuda {
        return Err(BenchError::InvalidOptions {
            op: opts.op,
            reason: format!(
                "--device {} asked of the NCCL benchmark, which runs on CUDA",
                opts.device
            ),
        });
    }
    let version = match comm.nccl_version() {
        Ok(v) => format!("NCCL {}.{}.{}", v / 10000, v / 100 % 100, v % 100),
        Err(e) => format!("NCCL of unknown version ({e})"),
    };
    let info = RunInfo {
        opts,
        ranks: comm.world_size(),
        engine: format!(
            "nccl ({version}), rank 0 on CUDA device {} ({}); device buffers; every call waited for to completion",
            comm.ordinal(),
            comm.device_name()
        ),
        links: comm.links(),
    };
    with_bench_value!(opts.dtype, T => run_sweep(comm, &info, out, |count| {
        DeviceBuffers::<T>::new(comm, opts.op, opts.root, count)
    }))
}

/// One device allocation and the address NCCL gets for it.
struct Region {
    slice: CudaSlice<u8>,
    /// The device address, stable while `slice` lives.
    address: u64,
    numel: usize,
}

/// The buffers of one operation at one size, for one rank, in device memory.
struct DeviceBuffers<'c, T> {
    comm: &'c NcclCommunicator,
    layout: Layout,
    input: Region,
    /// `None` for the in-place operations.
    output: Option<Region>,
    values: PhantomData<T>,
}

/// A device failure of the benchmark itself (not of a collective), naming this rank and device.
fn device_err(comm: &NcclCommunicator, op: &'static str, reason: impl std::fmt::Display) -> CommError {
    CommError::Device {
        rank: comm.rank(),
        op,
        seq: 0,
        reason: format!("CUDA device {}: {reason}", comm.ordinal()),
    }
}

impl<'c, T: BenchValue> DeviceBuffers<'c, T> {
    /// Allocates the buffers on the communicator's device and fills them.
    fn new(comm: &'c NcclCommunicator, op: BenchOp, root: usize, count: usize) -> Result<Self, CommError> {
        let layout = Layout::new(op, root, comm.rank(), comm.world_size(), count);
        let (input_len, output_len) = layout.lengths();
        let elem = T::DTYPE.size_bytes();
        let alloc = |numel: usize| -> Result<Region, CommError> {
            let bytes = numel * elem;
            let slice = comm
                .stream()
                .alloc_zeros::<u8>(bytes)
                .map_err(|e| device_err(comm, "allocating", format!("{bytes} bytes: {e}")))?;
            let address = slice.device_ptr(comm.stream()).0;
            Ok(Region { slice, address, numel })
        };
        let input = alloc(input_len)?;
        let output = if layout.in_place() {
            None
        } else {
            Some(alloc(output_len)?)
        };
        let mut buffers = Self {
            comm,
            layout,
            input,
            output,
            values: PhantomData,
        };
        buffers.fill()?;
        Ok(buffers)
    }

    fn view(&self, region: &Region) -> BufRef<'static> {
        BufRef {
            dtype: T::DTYPE,
            numel: region.numel,
            memory: Memory::Device(self.device_ptr(region)),
        }
    }

    fn view_mut(&self, region: &Region) -> BufMut<'static> {
        BufMut {
            dtype: T::DTYPE,
            numel: region.numel,
            memory: MemoryMut::Device(self.device_ptr(region)),
        }
    }

    fn device_ptr(&self, region: &Region) -> DevicePtr {
        DevicePtr {
            address: region.address,
            ordinal: self.comm.ordinal(),
        }
    }

    fn output(&self) -> Result<&Region, CommError> {
        // Invariant in practice: `new` allocates an output for every operation that is not in
        // place; an error rather than a panic all the same.
        self.output.as_ref().ok_or_else(|| CommError::InvalidArgument {
            rank: self.comm.rank(),
            op: "bench",
            reason: format!("{} has no output buffer", self.layout.op),
        })
    }
}

impl<T: BenchValue> Workload for DeviceBuffers<'_, T> {
    fn fill(&mut self) -> Result<(), CommError> {
        let comm = self.comm;
        let stream = comm.stream();
        let mut host = vec![T::from_small(0); self.input.numel];
        self.layout.fill_input(&mut host);
        stream
            .memcpy_htod(bytemuck::cast_slice::<T, u8>(&host), &mut self.input.slice)
            .map_err(|e| device_err(comm, "filling the input", e))?;
        if let Some(output) = &mut self.output {
            stream
                .memset_zeros(&mut output.slice)
                .map_err(|e| device_err(comm, "zeroing the output", e))?;
        }
        // Copies only, on a stream whose collectives have all completed: this cannot wait on a
        // peer.
        stream
            .synchronize()
            .map_err(|e| device_err(comm, "filling the buffers", e))
    }

    fn step(&mut self) -> Result<(), CommError> {
        let comm = self.comm;
        let (rank, n, root) = (self.layout.rank, self.layout.world_size, self.layout.root);
        match self.layout.op {
            BenchOp::AllReduce => comm.all_reduce(self.view_mut(&self.input), ReduceOp::Sum),
            BenchOp::Broadcast => comm.broadcast(self.view_mut(&self.input), root),
            BenchOp::AllGather => comm.all_gather(self.view(&self.input), self.view_mut(self.output()?)),
            BenchOp::ReduceScatter => {
                comm.reduce_scatter(self.view(&self.input), self.view_mut(self.output()?), ReduceOp::Sum)
            }
            BenchOp::AllToAll => comm.all_to_all(self.view(&self.input), self.view_mut(self.output()?)),
            BenchOp::SendRecv => {
                let (left, right) = ((rank + n - 1) % n, (rank + 1) % n);
                comm.send_recv(self.view(&self.input), right, self.view_mut(self.output()?), left)
            }
        }
    }

    fn count_wrong(&mut self) -> Result<u64, CommError> {
        let comm = self.comm;
        let result = if self.layout.in_place() {
            &self.input
        } else {
            self.output()?
        };
        let mut host = vec![T::from_small(0); result.numel];
        comm.stream()
            .memcpy_dtoh(&result.slice, bytemuck::cast_slice_mut::<T, u8>(&mut host))
            .and_then(|()| comm.stream().synchronize())
            .map_err(|e| device_err(comm, "copying the result back", e))?;
        Ok(self.layout.count_wrong(&host))
    }
}
