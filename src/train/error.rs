//! Trainer errors: one enum, each variant saying which rank and what.

use crate::comm::CommError;
use crate::config::ConfigError;
use crate::data::DataError;
use crate::models::ModelError;
use crate::parallel::{DivergenceError, PipelineError, SyncError};
use crate::precision::PrecisionError;

use super::checkpoint::CheckpointError;

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
