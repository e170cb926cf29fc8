//! NCCL (feature `nccl`): the library found where users have it and loaded at run time (no CUDA
//! needed to build), its unique id exchanged through the job's store, burnrun's dtypes and
//! reductions mapped to NCCL's.
//!
//! What runs without a GPU, and is tested here: finding and loading the library (or the error
//! that lists every place looked), `ncclGetVersion`, `ncclGetUniqueId`, the id exchange, the
//! mappings, `ncclCommInitRank` failing cleanly, and [`NcclCommunicator::new`] refusing without a
//! CUDA driver. The collectives of [`NcclCommunicator`] need a GPU (the GPU check).

mod check;
mod communicator;
mod error;
mod id;
mod library;
mod types;
mod world;

pub use check::{CallCheck, CheckMode};
pub use communicator::NcclCommunicator;
pub use error::NcclError;
pub use id::exchange_unique_id;
pub use library::{candidates, Comm, Nccl, RawComm, RawStream, UniqueId, NCCL_SONAME, UNIQUE_ID_BYTES};
pub use types::{nccl_dtype, nccl_op};
pub use world::{cuda_device_count, init_world};
