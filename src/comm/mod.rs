//! Collectives: the only communication API the upper layers see.
//!
//! [`init`] reads the launcher's environment and returns the world [`ProcessGroup`]; the CPU
//! engine (`host`) runs our algorithms over TCP pairs.

mod algorithms;
mod buffer;
mod communicator;
mod dtype;
mod fingerprint;
mod group;
mod host;
mod init;
#[cfg(feature = "nccl")]
pub mod nccl;
mod reduce;

/// The job's key-value store that [`ProcessGroup::store`] hands out and its error, named here so the layers
/// above, which see only `comm`, can hold one (the trainer's asynchronous checkpoints publish
/// each rank's part through it, beside the group's collectives, never through them).
pub use crate::rendezvous::{Store, StoreError};
pub use buffer::{BufMut, BufRef, DevicePtr, HostBuffer, Memory, MemoryMut};
pub use communicator::{CommError, Communicator};
pub use dtype::{DType, Element, ReduceOp};
pub use fingerprint::{describe as describe_fingerprint, fingerprint, OpKind};
pub use group::{ProcessGroup, Work};
pub use host::{Hierarchy, Tuning, DEFAULT_RING_THRESHOLD_BYTES, DEFAULT_SEGMENT_BYTES};
pub use init::{init, init_from, init_with_store, spawn_ranks, spawn_ranks_each, InitOptions, ShmOptions};
