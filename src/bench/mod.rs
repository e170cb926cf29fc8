//! `burnrun bench <op>`: nccl-tests-style collective benchmarks.
//!
//! [`run_collective`] times one collective over a range of sizes on every rank of a group,
//! checks the results exactly, and prints nccl-tests' table (size, count, type, redop, root,
//! time, algbw, busbw, #wrong) or JSON lines on rank 0. With `--device cuda` (feature `nccl`)
//! the same sweep runs on CUDA device buffers through NCCL (`run_collective_cuda`). The
//! comparisons with torch.distributed's gloo and NCCL backends live in `benches/`.

mod buffers;
mod collective;
#[cfg(feature = "nccl")]
mod cuda;
mod error;
mod options;
mod report;
mod values;

pub use collective::{engine_tuning, run_collective, run_collective_to};
#[cfg(feature = "nccl")]
pub use cuda::{run_collective_cuda, run_collective_cuda_to};
pub use error::BenchError;
pub use options::{
    auto_iters, auto_warmup, parse_size, BenchDevice, BenchOp, CollectiveBenchOptions, AUTO_ITER_BYTES,
    DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES, DEFAULT_STEP_FACTOR, MAX_AUTO_ITERS, MIN_AUTO_ITERS,
};
pub use report::BenchRow;
