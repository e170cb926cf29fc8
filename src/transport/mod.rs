//! Moves tagged byte buffers between two ranks, nothing else.
//!
//! [`tcp`] holds authenticated, framed TCP pairs; [`Mesh`] drives batches of sends and receives
//! over them concurrently with deadlines.

mod error;
mod frame;
mod mesh;
mod tcp;

pub use error::TransportError;
pub use frame::{FrameHeader, Tag, HEADER_BYTES, MAX_FRAME_BYTES};
pub use mesh::{Mesh, Op, Reducer};
pub use tcp::{connect, DataListener, TcpPair, STASH_LIMIT_BYTES};
