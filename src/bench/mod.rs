//! `burnrun bench <op>`: nccl-tests-style collective benchmarks.
//!
//! [`run_collective`] times one collective over a range of sizes on every rank of a group,
//! checks the results exactly, and prints nccl-tests' table (size, count, type, redop, root,
//! time, algbw, busbw, #wrong) or JSON lines on rank 0. The comparison with torch.distributed's
//! gloo backend lives in `benches/`.

mod buffers;
mod collective;
mod error;
mod options;
mod report;
mod values;

pub use collective::{engine_tuning, run_collective, run_collective_to};
pub use error::BenchError;
pub use options::{
    parse_size, BenchOp, CollectiveBenchOptions, DEFAULT_ITERS, DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES,
    DEFAULT_STEP_FACTOR, DEFAULT_WARMUP,
};
pub use report::BenchRow;
