//! Transport errors: each names this rank, the peer and the frame tag.

use std::time::Duration;

use super::frame::Tag;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Nothing (or not enough) arrived from, or could be written to, `peer` before the deadline.
    #[error("rank {rank}: {direction} with peer {peer} (tag {tag}) timed out after {timeout:?}")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The peer waited for.
        peer: usize,
        /// `"recv"` or `"send"`.
        direction: &'static str,
        /// The frame tag waited for.
        tag: Tag,
        /// The deadline.
        timeout: Duration,
        /// Frames that did arrive from that peer meanwhile, as (tag, fingerprint): evidence of a
        /// mismatched collective.
        stashed: Vec<(Tag, u64)>,
    },
    /// The connection to `peer` closed or failed.
    #[error("rank {rank}: connection to peer {peer} lost: {reason}")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// What happened.
        reason: String,
    },
    /// A frame with the expected tag carried another operation's fingerprint.
    #[error("rank {rank}: peer {peer} sent tag {tag} with fingerprint {theirs:#x}, expected {ours:#x}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The tag.
        tag: Tag,
        /// What this rank expected.
        ours: u64,
        /// What the peer sent.
        theirs: u64,
    },
    /// A frame with the expected tag and fingerprint had the wrong length.
    #[error("rank {rank}: peer {peer} sent {got} bytes for tag {tag}, expected {expected}")]
    SizeMismatch {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The tag.
        tag: Tag,
        /// Expected payload bytes.
        expected: usize,
        /// Received payload bytes.
        got: u64,
    },
    /// A malformed frame, or more unexpected data than the stash allows.
    #[error("rank {rank}: protocol error from peer {peer}: {reason}")]
    Protocol {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// What was wrong.
        reason: String,
    },
    /// Setting up a connection failed.
    #[error("rank {rank}: cannot connect to peer {peer} at {addr}: {reason}")]
    Connect {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// Its address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The handshake failed.
    #[error("rank {rank}: data connection refused: {source}")]
    Auth {
        /// This rank.
        rank: usize,
        /// The handshake error.
        source: crate::auth::AuthError,
    },
    /// Local socket set-up failed.
    #[error("rank {rank}: {what}: {source}")]
    Io {
        /// This rank.
        rank: usize,
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl TransportError {
    /// The peer this error is about, if any.
    pub fn peer(&self) -> Option<usize> {
        match self {
            TransportError::Timeout { peer, .. }
            | TransportError::PeerLost { peer, .. }
            | TransportError::Mismatch { peer, .. }
            | TransportError::SizeMismatch { peer, .. }
            | TransportError::Protocol { peer, .. }
            | TransportError::Connect { peer, .. } => Some(*peer),
            TransportError::Auth { .. } | TransportError::Io { .. } => None,
        }
    }
}
