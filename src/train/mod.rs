//! The trainer: the loop (forward, backward, sync, clip, step), checkpoints, metrics, progress.

pub mod build;
pub mod checkpoint;
mod error;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod progress;
mod stage;
mod trainer;

pub use error::TrainError;
pub use trainer::{stage_blocks, train, train_on, TrainOptions, TrainSummary};
