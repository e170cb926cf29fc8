//! Parallelisms as functions applied to flat parameter/gradient buffers and process groups.
//!
//! Model code knows nothing of them: the trainer flattens a burn model's gradients in a fixed
//! order, hands them to [`DataParallel`], and loads the result back.

mod data;
#[cfg(feature = "train")]
mod ddp;
#[cfg(feature = "cuda")]
mod device_pipe;
#[cfg(feature = "train")]
mod device_powersgd;
#[cfg(feature = "cuda")]
mod device_sync;
#[cfg(feature = "cuda")]
mod device_topk;
#[cfg(feature = "train")]
pub mod params;
mod pipeline;
pub mod tensor;
pub mod zero;

pub use data::{BucketLayout, DataParallel, DivergenceError, SyncError, SyncStats};
#[cfg(feature = "train")]
pub use ddp::{BufferSync, Ddp, DdpError, DdpOptions, FlatReduce, HostFlatReduce};
#[cfg(feature = "cuda")]
pub use device_pipe::NcclStageLink;
#[cfg(feature = "train")]
pub use device_powersgd::{DevicePowerSgd, DeviceSum, HostDeviceSum};
#[cfg(feature = "cuda")]
pub use device_sync::{nccl_flat_reduce, DeviceAllReduce, DeviceHalfWire, DeviceSyncError};
#[cfg(feature = "cuda")]
pub use device_topk::DeviceTopK;
// The mesh is defined by the config layer (it validates it against the world size); the
// process groups are built from it here.
pub use crate::config::{MeshCoords, ParallelDims, ParallelDimsError};
#[cfg(feature = "train")]
pub use params::{
    flat_grads_on_device, flat_selected_grads_on_device, flatten_grads, flatten_grads_into, flatten_params,
    flatten_params_into, grads_from_flat, load_params, load_params_by_name, read_flat, ParamError, ParamInfo,
    ParamLayout,
};
pub use pipeline::{
    partition_balanced, peak_in_flight, schedule, Action, Activation, HostLink, PipelineError, PipelineStage,
    StageCompute, StageLink, StepTimes,
};
// `schedule` takes the config's choice of schedule.
pub use crate::config::PipelineSchedule;
