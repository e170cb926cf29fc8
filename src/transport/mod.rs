//! Moves tagged byte buffers between two ranks, nothing else.
//!
//! `tcp` connects ranks (authenticated TCP), `pair` frames the byte stream between two ranks,
//! over TCP or, for ranks of one host, over `shm` rings; [`Mesh`] drives batches of sends and
//! receives over pairs concurrently with deadlines.

mod eager;
mod error;
mod frame;
mod mesh;
mod pair;
mod shm;
mod tcp;

pub use eager::EAGER_MAX_BYTES;
pub use error::TransportError;
pub use frame::{FrameHeader, Tag, HEADER_BYTES, MAX_FRAME_BYTES};
pub use mesh::{Deadline, Drain, Mesh, Op, Reducer, Reduction, DEFAULT_SHM_SPIN};
pub use pair::{Pair, STASH_LIMIT_BYTES};
pub use shm::{
    host_id, shm_file_prefix, shm_rank_file_prefix, Inbox, ShmLink, DEFAULT_SHM_RING_BYTES, MIN_SHM_RING_BYTES, SHM_DIR,
};
pub use tcp::{connect, DataListener};
