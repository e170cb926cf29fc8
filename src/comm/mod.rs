//! Collectives: the only communication API the upper layers see.
//!
//! [`init`] reads the launcher's environment and returns the world [`ProcessGroup`]; the CPU
//! engine ([`host`]) runs our algorithms over TCP pairs.

mod buffer;
mod communicator;
mod dtype;
mod group;
mod init;

pub use buffer::{BufMut, BufRef, DevicePtr, HostBuffer, Memory, MemoryMut};
pub use communicator::{CommError, Communicator};
pub use dtype::{DType, Element, ReduceOp};
pub use group::{ProcessGroup, Work};
pub use init::{init, init_from};
