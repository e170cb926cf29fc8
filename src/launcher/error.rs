//! The launcher's errors: everything that stops a job from starting, each naming the node and what it waited for.
//!
//! A rank that fails once the job runs is not an error of the launcher: it is a
//! [`Failure`](super::Failure) in the [`LaunchOutcome`](super::LaunchOutcome).

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::AuthError;
use crate::env::EnvError;
use crate::rendezvous::StoreError;

/// Why a job could not be started (or its launcher could not do its job).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `--nproc-per-node` or `--nnodes` is zero.
    #[error("--{flag} must be at least 1")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// `--node-rank` is not below `--nnodes`.
    #[error("--node-rank {node_rank} must be below --nnodes {nnodes}")]
    NodeRankOutOfRange {
        /// This node's rank.
        node_rank: usize,
        /// Number of nodes.
        nnodes: usize,
    },
    /// A multi-node job without an agreed store port.
    #[error(
        "a job of {nnodes} nodes needs --master-port (non-zero): the other nodes must know where node 0's store listens"
    )]
    MultiNodeNeedsPort {
        /// Number of nodes.
        nnodes: usize,
    },
    /// `--master-addr` does not resolve.
    #[error("node {node_rank}: --master-addr {addr}: {source}")]
    Resolve {
        /// This node's rank.
        node_rank: usize,
        /// What was given.
        addr: String,
        /// Why it does not resolve.
        source: std::io::Error,
    },
    /// The launcher's own environment is invalid.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The job secret cannot be read or parsed.
    #[error("job secret from {origin}: {source}")]
    Secret {
        /// Where it came from (`BURNRUN_SECRET`, a file).
        origin: String,
        /// What is wrong with it.
        source: AuthError,
    },
    /// The secret file cannot be read or created.
    #[error("job secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The secret file can be read by other users: like ssh with a private key, refused.
    #[error(
        "job secret file {path} has mode {mode:04o}: other users can read or change it, and whoever reads it can join the job; run `chmod 600 {path}`"
    )]
    SecretFileOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Node 0 cannot host the rendezvous store.
    #[error("node 0: cannot host the rendezvous store on {addr} (port taken? a single-node job can omit --master-port to get a free one): {source}")]
    HostStore {
        /// The address it tried to bind.
        addr: String,
        /// The error.
        source: StoreError,
    },
    /// A store operation of the launchers' own protocol failed.
    #[error("node {node_rank}: rendezvous store at {addr}, {what}: {source}")]
    Store {
        /// This node's rank.
        node_rank: usize,
        /// The store's address.
        addr: String,
        /// What the launcher was doing.
        what: &'static str,
        /// The error.
        source: StoreError,
    },
    /// This node was given a run id that differs from node 0's.
    #[error("node {node_rank}: --run-id {ours:?} differs from node 0's run id {theirs:?}")]
    RunIdMismatch {
        /// This node's rank.
        node_rank: usize,
        /// The id this node was given.
        ours: String,
        /// Node 0's id.
        theirs: String,
    },
    /// Another launcher already registered with this node rank.
    #[error("node {node_rank}: node rank {node_rank} is already taken by {other} (two launchers with the same --node-rank?)")]
    NodeRankTaken {
        /// The contested node rank.
        node_rank: usize,
        /// Host and pid of the launcher that registered first.
        other: String,
    },
    /// Some nodes did not join in time.
    #[error("node {node_rank}: node(s) {missing:?} did not join within {timeout:?} (--rdzv-timeout)")]
    NodesMissing {
        /// This node's rank.
        node_rank: usize,
        /// The node ranks that never registered.
        missing: Vec<usize>,
        /// The deadline.
        timeout: Duration,
    },
    /// Two nodes disagree on a launch setting or the command they run.
    #[error("node {node_b} was started with {what} {value_b} but node {node_a} with {value_a}; every node must be started alike")]
    NodeMismatch {
        /// What differs (`--nnodes`, `--nproc-per-node`, `the command`).
        what: &'static str,
        /// The first node.
        node_a: usize,
        /// Its value.
        value_a: String,
        /// The node that differs from it.
        node_b: usize,
        /// Its value.
        value_b: String,
    },
    /// The rendezvous was abandoned because another node failed or the launcher was stopped.
    #[error("node {node_rank}: rendezvous abandoned: {reason}")]
    RendezvousAborted {
        /// This node's rank.
        node_rank: usize,
        /// Why.
        reason: String,
    },
    /// The log directory or a rank's log file cannot be created.
    #[error("log file {path}: {source}")]
    LogFile {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A rank's process could not be started.
    #[error("node {node_rank}: cannot start rank {rank} ({program}): {source}")]
    Spawn {
        /// This node's rank.
        node_rank: usize,
        /// The global rank.
        rank: usize,
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
    /// The launcher's own plumbing (signal handlers, the orphan watchdog) failed.
    #[error("node {node_rank}: {what}: {source}")]
    System {
        /// This node's rank.
        node_rank: usize,
        /// What failed.
        what: &'static str,
        /// The error.
        source: nix::Error,
    },
}
