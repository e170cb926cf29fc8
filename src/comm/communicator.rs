//! The communicator trait: the one collective API every backend implements.

use std::time::Duration;

use super::buffer::{BufMut, BufRef};
use super::dtype::ReduceOp;

/// Errors of a collective. Every variant names the operation, its sequence number and this rank.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// Waiting for a peer ran past the deadline.
    #[error("rank {rank}: {op} #{seq} timed out after {timeout:?} waiting for peer {peer}{detail}")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// Its sequence number in the group.
        seq: u64,
        /// The global rank waited for.
        peer: usize,
        /// The deadline.
        timeout: Duration,
        /// What was seen instead, if anything.
        detail: String,
    },
    /// A peer's connection closed or failed: it died or its job was torn down.
    #[error("rank {rank}: {op} #{seq}: connection to peer {peer} lost ({reason}); that rank likely exited")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// Its sequence number.
        seq: u64,
        /// The global rank of the peer.
        peer: usize,
        /// The I/O error.
        reason: String,
    },
    /// Two ranks called different collectives (or the same with different arguments) at the same
    /// point of the group's sequence.
    #[error("rank {rank}: collective mismatch at #{seq}: this rank called {ours}, peer {peer} called {theirs}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// Sequence number.
        seq: u64,
        /// The peer.
        peer: usize,
        /// What this rank called.
        ours: String,
        /// What the peer called.
        theirs: String,
    },
    /// A bad argument (sizes, root, peer), found before any byte was sent.
    #[error("rank {rank}: {op}: {reason}")]
    InvalidArgument {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// This backend cannot run the call (e.g. device memory on the CPU engine).
    #[error("rank {rank}: {op} is not supported by the {backend} backend: {reason}")]
    Unsupported {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// The backend name.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Other transport failure (protocol error, oversized frame).
    #[error("rank {rank}: {op} #{seq}: {source}")]
    Transport {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// Sequence number.
        seq: u64,
        /// The transport error.
        source: crate::transport::TransportError,
    },
    /// Building the group failed at the store.
    #[error("rank {rank}: rendezvous for group {group:?} failed: {source}")]
    Store {
        /// This rank.
        rank: usize,
        /// The group name.
        group: String,
        /// The store error.
        source: crate::rendezvous::StoreError,
    },
    /// A device backend (NCCL) failed: its call returned an error, the device reported one, or
    /// the deadline passed (NCCL cannot say which peer it waited for; the communicator was
    /// aborted so nothing stays blocked).
    #[error("rank {rank}: {op} #{seq} failed on the device: {reason}")]
    Device {
        /// This rank.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// Sequence number.
        seq: u64,
        /// What happened.
        reason: String,
    },
    /// An earlier error broke the group; it cannot be used any more.
    #[error("rank {rank}: the process group is unusable after an earlier failure: {first}")]
    Poisoned {
        /// This rank.
        rank: usize,
        /// The first error's message.
        first: String,
    },
}

/// The collective operations. Ranks are the communicator's own (0..world_size) unless noted.
///
/// Every call blocks until this rank's part is done or the deadline passes; an error names the
/// operation, its sequence number, this rank and the peer it waited for.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This rank within the communicator.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Backend name (`tcp`, `nccl`, `local`).
    fn backend(&self) -> &'static str;
    /// What this rank's links to the group's peers go through, for reports (e.g. `shm to 3
    /// peers`); empty where it means nothing.
    fn links(&self) -> String {
        String::new()
    }
    /// The deadline of every blocking call.
    fn timeout(&self) -> Duration;
    /// Bytes this process has sent over the transport so far, all groups together (0 when the
    /// backend cannot tell).
    fn bytes_sent(&self) -> u64 {
        0
    }
    /// Of [`Communicator::bytes_sent`], the bytes sent to ranks on other hosts (0 when the
    /// backend cannot tell).
    fn bytes_sent_across_hosts(&self) -> u64 {
        0
    }

    /// Reduces `buf` across all ranks; every rank gets the result.
    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Reduces `buf` across all ranks into `root`'s buffer; other ranks' buffers are scratch.
    fn reduce(&self, buf: BufMut<'_>, op: ReduceOp, root: usize) -> Result<(), CommError>;
    /// Copies `root`'s buffer to every rank.
    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError>;
    /// Concatenates every rank's `input` in rank order into `output` (`world_size` times as long).
    fn all_gather(&self, input: BufRef<'_>, output: BufMut<'_>) -> Result<(), CommError>;
    /// Reduces `input` (`world_size` chunks) and leaves chunk `rank` in `output`.
    fn reduce_scatter(&self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Sends chunk `j` of `input` to rank `j`; chunk `i` of `output` comes from rank `i`.
    fn all_to_all(&self, input: BufRef<'_>, output: BufMut<'_>) -> Result<(), CommError>;
    /// Sends `buf` to `peer`, matched by `tag` with its `recv`.
    fn send(&self, buf: BufRef<'_>, peer: usize, tag: u32) -> Result<(), CommError>;
    /// Receives from `peer` the message sent with `tag`; its dtype and length must match.
    fn recv(&self, buf: BufMut<'_>, peer: usize, tag: u32) -> Result<(), CommError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<(), CommError>;
    /// A communicator over the given ranks (in this communicator's numbering), or `None` on ranks
    /// outside it. Every rank must call it with the same list, in the same order of calls.
    fn new_group(&self, ranks: &[usize]) -> Result<Option<Box<dyn Communicator>>, CommError>;
}
