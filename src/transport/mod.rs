//! Moves tagged byte buffers between two ranks, nothing else.

mod error;

pub use error::TransportError;
