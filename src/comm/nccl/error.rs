//! What can go wrong with NCCL, each error naming the call, the library or the places looked.

/// An NCCL failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    /// No candidate library loaded.
    #[error(
        "NCCL not found: looked for libnccl.so.2 in {} place(s): {}{}; install NCCL (a CUDA install, or `pip \
         install nvidia-nccl-cu12` as PyTorch does) or set NCCL_LIBRARY to the library or its folder",
        .looked.len(),
        .looked.join(", "),
        failures_text(.failures)
    )]
    LibraryNotFound {
        /// Every path tried, in order.
        looked: Vec<String>,
        /// Candidates that exist but did not load, with why.
        failures: Vec<String>,
    },
    /// The library at `path` did not load.
    #[error("cannot load NCCL from {path}: {why}")]
    Load {
        /// The path.
        path: String,
        /// The loader's message.
        why: String,
    },
    /// The library lacks a function burnrun calls (an NCCL older than 2.12).
    #[error("NCCL at {path} has no `{symbol}`: burnrun needs NCCL 2.12 or newer")]
    MissingSymbol {
        /// The library.
        path: String,
        /// The function.
        symbol: &'static str,
    },
    /// An NCCL call returned an error.
    #[error("{call} failed: {message} (ncclResult_t {code})")]
    Call {
        /// The function.
        call: &'static str,
        /// Its result code.
        code: i32,
        /// NCCL's text for the code.
        message: String,
    },
    /// The CUDA driver is missing or failed.
    #[error("CUDA: {call}: {why}")]
    Cuda {
        /// What was asked of the driver.
        call: &'static str,
        /// Why it failed.
        why: String,
    },
    /// More ranks on this node than CUDA devices it can see: NCCL runs one rank per device.
    #[error(
        "rank {rank} (local rank {local_rank}): {local_world_size} rank(s) on this node but {devices} CUDA \
         device(s) visible{visible}: NCCL needs one GPU per rank (two ranks on one GPU are refused); start at most \
         {devices} rank(s) per node (--nproc-per-node {devices})"
    )]
    TooFewDevices {
        /// This rank.
        rank: usize,
        /// Its rank on this node, which picks the device.
        local_rank: usize,
        /// Ranks on this node.
        local_world_size: usize,
        /// CUDA devices this process sees.
        devices: usize,
        /// `CUDA_VISIBLE_DEVICES`, when set, as ` (CUDA_VISIBLE_DEVICES=...)`.
        visible: String,
    },
    /// `ncclCommInitRank` waits for every rank of the communicator; not all came in time.
    #[error(
        "rank {rank}: ncclCommInitRank did not finish within {timeout:?}: not all {world_size} ranks of the \
         communicator joined (one died or is stuck before its NCCL setup); the setup was abandoned"
    )]
    InitTimedOut {
        /// This rank (in the communicator).
        rank: usize,
        /// Ranks of the communicator.
        world_size: usize,
        /// The deadline.
        timeout: std::time::Duration,
    },
    /// The unique id read from the store has the wrong size.
    #[error("the NCCL unique id from the store has {len} bytes, not 128: another program wrote the key")]
    BadUniqueId {
        /// Bytes read.
        len: usize,
    },
    /// The unique id could not be exchanged through the store.
    #[error("rank {rank}: exchanging the NCCL unique id through the store (key `{key}`): {why}")]
    IdExchange {
        /// This rank.
        rank: usize,
        /// The store key.
        key: String,
        /// The store's error.
        why: String,
    },
}

fn failures_text(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!(" (found but not loadable: {})", failures.join("; "))
    }
}
