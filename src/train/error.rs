//! Trainer errors: one enum, each variant saying which rank and what.

use crate::comm::CommError;
use crate::config::ConfigError;
use crate::data::DataError;
use crate::models::ModelError;
use crate::parallel::{DivergenceError, PipelineError, SyncError};
use crate::precision::PrecisionError;

use super::checkpoint::CheckpointError;
use super::checkpoint_writer::AsyncCheckpointError;
use super::lock::LockError;
use super::memory::{MemoryAvailable, MemoryEstimate};

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config is invalid for this world.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Joining the job failed.
    #[error("rank {rank}: cannot join the job: {source}")]
    Init {
        /// This rank (0 when unknown).
        rank: usize,
        /// The error.
        source: Box<crate::Error>,
    },
    /// A collective failed.
    #[error("rank {rank}: {source}")]
    Comm {
        /// This rank.
        rank: usize,
        /// The error.
        source: CommError,
    },
    /// The data could not be read.
    #[error("rank {rank}: data: {source}")]
    Data {
        /// This rank.
        rank: usize,
        /// The error.
        source: DataError,
    },
    /// Building or running the model failed.
    #[error("rank {rank}: model: {source}")]
    Model {
        /// This rank.
        rank: usize,
        /// The error.
        source: ModelError,
    },
    /// The task (a user's model, data or loss) failed.
    #[error("rank {rank}: {what}: {source}")]
    Task {
        /// This rank.
        rank: usize,
        /// What the trainer asked of the task: `building the model`, `reading a batch`, ...
        what: &'static str,
        /// The task's error.
        source: super::TaskError,
    },
    /// Reading or loading the model's parameters as flat buffers failed.
    #[error("rank {rank}: parameters: {source}")]
    Params {
        /// This rank.
        rank: usize,
        /// The error.
        source: crate::parallel::ParamError,
    },
    /// Gradient synchronisation (or its codec) failed.
    #[error("rank {rank}: gradient sync: {source}")]
    Sync {
        /// This rank.
        rank: usize,
        /// The error.
        source: SyncError,
    },
    /// The loss scaler failed or collapsed.
    #[error("rank {rank}: mixed precision: {source}")]
    Precision {
        /// This rank.
        rank: usize,
        /// The error.
        source: PrecisionError,
    },
    /// Replicas diverged.
    #[error("rank {rank}: {source}")]
    Divergence {
        /// This rank.
        rank: usize,
        /// The error.
        source: DivergenceError,
    },
    /// The pipeline failed.
    #[error("rank {rank}: {source}")]
    Pipeline {
        /// This rank.
        rank: usize,
        /// The error.
        source: PipelineError,
    },
    /// A checkpoint could not be written or read.
    #[error("rank {rank}: {source}")]
    Checkpoint {
        /// This rank.
        rank: usize,
        /// The error.
        source: CheckpointError,
    },
    /// An asynchronous checkpoint (`checkpoint.async = true`) failed in the background: noticed at
    /// the first step boundary after it did, or when the next checkpoint or the run's end waited
    /// for it.
    #[error(
        "rank {rank}: the asynchronous checkpoint of step {step} ({dir}) failed, noticed after step \
         {noticed_after}: {source}"
    )]
    CheckpointAsync {
        /// This rank.
        rank: usize,
        /// The checkpoint's step.
        step: u64,
        /// Its folder.
        dir: String,
        /// Steps completed when the failure was noticed.
        noticed_after: u64,
        /// What failed (a file's error names the file).
        source: AsyncCheckpointError,
    },
    /// The loss became NaN or infinite.
    #[error("rank {rank}: loss is {loss} at step {step}; lower optim.lr or enable gradient clipping")]
    NonFinite {
        /// This rank.
        rank: usize,
        /// The step.
        step: u64,
        /// The loss.
        loss: f64,
    },
    /// The metrics file could not be written.
    #[error("rank {rank}: metrics file {path}: {source}")]
    Metrics {
        /// This rank.
        rank: usize,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Rank 0 could not lock `train.out_dir` (another job holds it, or the lock file failed).
    #[error("rank {rank}: {source}")]
    OutDir {
        /// This rank (0).
        rank: usize,
        /// The error.
        source: LockError,
    },
    /// Rank 0 refused to start (it could not lock `train.out_dir`); its error says why.
    #[error("rank {rank}: rank 0 could not lock train.out_dir {dir} (its error says why): not starting")]
    OutDirRefused {
        /// This rank.
        rank: usize,
        /// The folder.
        dir: String,
    },
    /// The model does not fit in this node's memory.
    #[error(
        "rank {rank}: the model does not fit in memory: it needs {estimate}; {available}. Use a smaller model or \
         batch, fewer ranks per node, or more pipeline stages"
    )]
    OutOfMemory {
        /// This rank.
        rank: usize,
        /// What the rank needs.
        estimate: MemoryEstimate,
        /// What it has.
        available: MemoryAvailable,
    },
    /// A large buffer could not be allocated (the estimate fit, the allocator still said no).
    #[error("rank {rank}: cannot allocate the {what} ({bytes} bytes): {source}")]
    Alloc {
        /// This rank.
        rank: usize,
        /// Which buffer.
        what: &'static str,
        /// Its size.
        bytes: u64,
        /// The allocator's refusal.
        source: std::collections::TryReserveError,
    },
    /// The checkpoint resumed from is already past `train.steps`.
    #[error(
        "rank {rank}: checkpoint {checkpoint} is at step {step}, past train.steps = {steps}: set train.steps above \
         {step} to train on, or start the run in another train.out_dir"
    )]
    PastEnd {
        /// This rank.
        rank: usize,
        /// The checkpoint folder.
        checkpoint: String,
        /// Its step.
        step: u64,
        /// `train.steps`.
        steps: u64,
    },
    /// The setting is valid but this build cannot run it.
    #[error("rank {rank}: {what} is not supported here: {why}")]
    Unsupported {
        /// This rank.
        rank: usize,
        /// The setting.
        what: String,
        /// Why.
        why: String,
    },
}
