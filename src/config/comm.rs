//! `[comm]`: the collective backend and its tuning knobs.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `comm.backend`: who runs the collectives.
    CommBackend, default Auto {
        /// NCCL when the ranks train on CUDA devices (`train.device = "cuda"`, a `cuda` build),
        /// otherwise the host engine.
        Auto = "auto",
        /// burnrun's own algorithms over TCP and shared memory between host buffers (any device;
        /// `"tcp"` is accepted for it too).
        #[serde(alias = "tcp")]
        Host = "host",
        /// NVIDIA's NCCL on GPU buffers (needs `train.device = "cuda"` or `"cuda:N"` and the
        /// `cuda` feature).
        Nccl = "nccl",
    }
}

choice! {
    /// `comm.hierarchical`: when the host engine's all-reduce and broadcast go host by host (reduce
    /// inside each host before crossing hosts; cross hosts once per host, then spread inside
    /// each), only for a group that spans two hosts or more, two of its ranks or more on one of
    /// them.
    HierarchicalMode, default Auto {
        /// From `comm.ring_threshold_bytes` up; smaller buffers keep recursive doubling.
        Auto = "auto",
        /// At any size.
        On = "on",
        /// Never: one flat ring (or recursive doubling) over all ranks.
        Off = "off",
    }
}

/// `[comm]`: collectives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommConfig {
    /// Backend: `"auto"`, `"host"` or `"nccl"`. Default `"auto"`: NCCL when every rank's device is
    /// CUDA, the host engine otherwise.
    pub backend: CommBackend,
    /// Gradients are packed into buckets of at most this many MiB and each bucket is all-reduced
    /// as one message (torch DDP's `bucket_cap_mb`). Default `25.0`.
    pub bucket_cap_mb: f64,
    /// With a model that is a chain of blocks (the built-in models, a `Task` giving `blocks()`),
    /// trained data parallel on one pipeline stage: all-reduce each block's gradients while the
    /// backward of the earlier blocks goes on (one all-reduce per block, launched last block
    /// first). Not with a gradient codec or f16 loss scaling, which need the whole gradient first.
    /// Default: not set (on for GPU devices; off on the CPU, where the communication thread takes
    /// a core from compute: measured 0.90x the throughput of the sync after backward on 2 cores).
    pub overlap: Option<bool>,
    /// Deadline of every blocking collective, in seconds; a rank that waits longer fails naming
    /// the peer it waited for. Default `300`.
    pub timeout_secs: u64,
    /// All-reduce switches from recursive halving-doubling to the ring at this message size.
    /// Default: not set (the engine's built-in threshold, or `BURNRUN_RING_THRESHOLD_BYTES`).
    pub ring_threshold_bytes: Option<usize>,
    /// I/O unit of the pipelined algorithms, in bytes. Default: not set (the engine's built-in
    /// size, or `BURNRUN_SEGMENT_BYTES`).
    pub segment_bytes: Option<usize>,
    /// Hierarchical all-reduce and broadcast of the host engine for groups that span hosts: `"auto"`, `"on"`
    /// or `"off"` (see [`HierarchicalMode`]). Default: not set (`BURNRUN_HIERARCHICAL`, else
    /// `"auto"`).
    pub hierarchical: Option<HierarchicalMode>,
    /// Ranks of one host exchange frames through shared memory (`false`: loopback TCP).
    /// Default: not set (on, unless `BURNRUN_SHM=0`).
    pub shm: Option<bool>,
    /// Bytes of one shared-memory ring, a power of two of at least 4096. Default: not set
    /// (2 MiB, or `BURNRUN_SHM_RING_BYTES`).
    pub shm_ring_bytes: Option<usize>,
}

impl Default for CommConfig {
    fn default() -> Self {
        Self {
            backend: CommBackend::Auto,
            bucket_cap_mb: 25.0,
            overlap: None,
            timeout_secs: 300,
            ring_threshold_bytes: None,
            segment_bytes: None,
            hierarchical: None,
            shm: None,
            shm_ring_bytes: None,
        }
    }
}
