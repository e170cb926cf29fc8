//! Transport errors: each names this rank, the peer and the tag.

use std::time::Duration;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Placeholder while the engine is written.
    #[error("rank {rank}: peer {peer} timed out after {timeout:?}")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The deadline.
        timeout: Duration,
    },
}
