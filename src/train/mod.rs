//! The trainer: a [`Task`] (a model, its data and its loss; the built-in models are one) trained
//! as a [`RunConfig`](crate::config::RunConfig) says: data and pipeline parallel, gradient
//! compression, mixed precision, accumulation, clipping, LR schedules, checkpoints (written in
//! the background with `checkpoint.async`) with resume and reshard, metrics and a progress bar.
//!
//! - [`train_task`] trains a user's [`Task`] in a process the launcher started ([`main`] is a
//!   whole command line: a config file, `--set`, `--resume`, `--check`);
//! - [`train`] is `burnrun train`: the built-in models through the same path ([`BuiltIn`]).

pub mod build;
mod builtin;
pub mod checkpoint;
mod checkpoint_writer;
mod cli;
mod device_grads;
mod error;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod progress;
mod report;
mod resume;
mod run;
mod setup;
mod sharded;
mod stage;
mod step;
mod task;
mod tensor_parallel;

pub use builtin::BuiltIn;
pub use checkpoint_writer::AsyncCheckpointError;
pub use cli::main;
pub use error::TrainError;
pub use run::{train, train_on, train_task, train_task_on, TrainOptions, TrainSummary};
pub use setup::stage_blocks;
pub use task::{BlockChain, Task, TaskError};
