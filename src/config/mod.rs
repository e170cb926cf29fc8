//! The typed TOML run config: one struct per section, loading with `--set` overrides, validation
//! against the world size, and the report `burnrun check` prints.
//!
//! ```toml
//! [model]
//! kind = "mlp"            # "mlp" | "cnn" | "gpt"; shapes in [model.mlp], [model.cnn], [model.gpt]
//! [data]
//! kind = "synthetic"      # "synthetic" | "idx" | "text"; details in [data.synthetic], [data.idx], [data.text]
//! [optim]
//! kind = "adam"
//! lr = 1e-3
//! [train]
//! steps = 300
//! batch_size = 32         # per rank, per micro step
//! [parallel]
//! pipeline = 1            # data = 0: WORLD_SIZE / pipeline
//! ```
//!
//! Every struct denies unknown keys and fills missing ones with the documented defaults. Errors
//! name the file, the key path and the line (`configs/x.toml:12:1: unknown key `lrr` in [optim]
//! (did you mean `lr`? expected one of: ...)`); [`RunConfig::validate`] checks combinations with
//! every term in the message (`parallel: data(2) * tensor(1) * pipeline(3) = 6 != WORLD_SIZE(4)`).

mod checkpoint;
mod choice;
mod comm;
mod compression;
mod data;
mod error;
mod load;
mod log;
mod mesh;
mod model;
mod optim;
mod overrides;
mod parallel;
mod precision;
mod report;
mod run;
mod schema;
mod spans;
mod suggest;
mod tensor_split;
mod train;
mod user;
mod validate;

pub use checkpoint::CheckpointConfig;
pub use comm::{CommBackend, CommConfig, HierarchicalMode};
pub use compression::{CompressionConfig, CompressionMethod};
pub use data::{DataConfig, DataKind, IdxConfig, SyntheticConfig, TextConfig};
pub use error::{ConfigError, Location, Origin, Problem};
pub use load::{DEFAULT_CONFIG, DEFAULT_CONFIG_NAME};
pub use log::{LogConfig, Progress};
pub use mesh::{MeshCoords, ParallelDims, ParallelDimsError};
pub use model::{CnnConfig, GptConfig, MlpConfig, ModelConfig, ModelKind};
pub use optim::{LrSchedule, OptimConfig, OptimKind};
pub use parallel::{ParallelConfig, Partition, PipelineSchedule, ShardMode};
pub use precision::{ComputeDtype, PrecisionConfig};
pub use report::{check_report, TaskFacts};
pub use run::{ConfigSource, RunConfig};
pub use tensor_split::TensorSplit;
pub use train::{DeviceSpec, TrainConfig, WgpuAdapter};
pub use validate::Resolved;
