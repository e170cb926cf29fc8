//! `[parallel]`: how the ranks are arranged: data-parallel replicas of a pipeline of stages.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `parallel.schedule`: the order in which a pipeline stage runs its micro-batches
    /// (`crate::parallel::schedule` lists a stage's actions under each).
    PipelineSchedule, default GPipe {
        /// All forwards, then all backwards (holds every micro-batch's activations).
        GPipe = "gpipe",
        /// Warm-up forwards, then one forward one backward, then cool-down (PipeDream-flush;
        /// holds at most `pipeline` micro-batches' activations).
        OneFOneB = "1f1b",
    }
}

choice! {
    /// `parallel.shard`: what the data-parallel replicas of a stage split among themselves
    /// instead of each holding all of it (ZeRO's stages; `crate::parallel::zero`).
    ShardMode, default None {
        /// Nothing: every replica holds the whole optimizer state (plain data parallelism).
        None = "none",
        /// ZeRO-1: the optimizer state; gradients are all-reduced, each replica steps its share,
        /// parameters are all-gathered.
        Optimizer = "optimizer",
        /// ZeRO-2: the optimizer state and the averaged gradients; gradients are reduce-scattered.
        Gradients = "gradients",
        /// ZeRO-3 (FSDP): the master weights too; a block's parameters are all-gathered just
        /// before it computes and freed after (a model that is a chain of blocks, one stage).
        Parameters = "parameters",
    }
}

/// `parallel.partition`: where the model is cut into pipeline stages.
///
/// In TOML either the string `"balanced"` or an array of block boundaries: `[2, 5]` with
/// `pipeline = 3` puts blocks `0..2` on stage 0, `2..5` on stage 1 and the rest on stage 2
/// (one boundary per stage after the first, strictly increasing, each in `1..num_blocks`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Partition {
    /// Split so that the stages hold about the same number of parameters.
    #[default]
    Balanced,
    /// The first block of each stage after the first.
    Boundaries(Vec<usize>),
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Balanced => f.write_str("\"balanced\""),
            Self::Boundaries(boundaries) => write!(f, "{boundaries:?}"),
        }
    }
}

impl Serialize for Partition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Balanced => serializer.serialize_str("balanced"),
            Self::Boundaries(boundaries) => boundaries.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Partition {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PartitionVisitor)
    }
}

/// Accepts `"balanced"` or an array of block indices, with one message for everything else.
struct PartitionVisitor;

impl<'de> Visitor<'de> for PartitionVisitor {
    type Value = Partition;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"balanced\" or an array of block boundaries such as [2, 4]")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Partition, E> {
        match value {
            "balanced" => Ok(Partition::Balanced),
            _ => Err(E::invalid_value(de::Unexpected::Str(value), &self)),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Partition, A::Error> {
        let mut boundaries = Vec::new();
        while let Some(boundary) = seq.next_element::<usize>()? {
            boundaries.push(boundary);
        }
        Ok(Partition::Boundaries(boundaries))
    }
}

/// `[parallel]`: the rank mesh.
///
/// `data * tensor * pipeline` must equal `WORLD_SIZE`. Rank `r` is tensor rank `r % tensor` of
/// stage `(r / tensor) % pipeline` of replica `r / (tensor * pipeline)`: tensor-parallel ranks
/// are neighbours (one host), then the stages of one replica (see `crate::config::ParallelDims`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Data-parallel replicas. `0` means `WORLD_SIZE / (tensor * pipeline)`. Default `0`.
    pub data: usize,
    /// Pipeline stages per replica; `1` is plain data parallelism. Default `1`.
    pub pipeline: usize,
    /// Tensor-parallel ranks per stage: each holds 1/tensor of every transformer layer's
    /// attention heads and MLP (Megatron's column/row split; the built-in GPT). `1`: none.
    /// Default `1`.
    pub tensor: usize,
    /// Micro-batches each rank's `train.batch_size` is split into for the pipeline schedule; must
    /// divide `train.batch_size`. With `pipeline = 1` it has no effect. Default `1`.
    pub micro_batches: usize,
    /// Pipeline schedule: `"gpipe"` or `"1f1b"`. Default `"gpipe"`.
    pub schedule: PipelineSchedule,
    /// Where stages split the model: `"balanced"` or an array of block boundaries. Default `"balanced"`.
    pub partition: Partition,
    /// What the data-parallel replicas shard: `"none"`, `"optimizer"` (ZeRO-1), `"gradients"`
    /// (ZeRO-2) or `"parameters"` (ZeRO-3, FSDP). Default `"none"`.
    pub shard: ShardMode,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            data: 0,
            pipeline: 1,
            tensor: 1,
            micro_batches: 1,
            schedule: PipelineSchedule::GPipe,
            partition: Partition::Balanced,
            shard: ShardMode::None,
        }
    }
}
