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

/// The job's key-value store, as a group holds it ([`ProcessGroup::store`]): what a device
/// communicator (NCCL) exchanges its ids through.
pub use crate::rendezvous::Store;
pub use buffer::{BufMut, BufRef, DevicePtr, HostBuffer, Memory, MemoryMut};
pub use communicator::{CommError, Communicator};
pub use dtype::{DType, Element, ReduceOp};
pub use fingerprint::{describe as describe_fingerprint, fingerprint, OpKind};
pub use group::{ProcessGroup, Work};
pub use host::{Tuning, DEFAULT_RING_THRESHOLD_BYTES, DEFAULT_SEGMENT_BYTES};
pub use init::{init, init_from, init_with_store, spawn_ranks, InitOptions, ShmOptions};
