//! The rank mesh as the config describes it: `data` replicas of a `pipeline` of stages.
//!
//! The layout matches `parallel::ParallelDims` (the config layer may not depend on `parallel`):
//! rank `r` is stage `r % pipeline` of replica `r / pipeline`, so the stages of one replica are
//! neighbours (activations cross the fastest links) and a stage's data-parallel group is every
//! `pipeline`-th rank.

/// Sizes of the mesh axes (validated: `data * pipeline = WORLD_SIZE`, both at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankMesh {
    /// Data-parallel replicas.
    pub data: usize,
    /// Pipeline stages per replica.
    pub pipeline: usize,
}

impl RankMesh {
    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.data * self.pipeline
    }

    /// `(data, stage)` coordinates of `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.pipeline, rank % self.pipeline)
    }

    /// The rank at replica `data`, stage `stage`.
    pub fn rank_of(&self, data: usize, stage: usize) -> usize {
        data * self.pipeline + stage
    }

    /// Members of the data-parallel group of `stage` (one rank per replica, in replica order).
    pub fn data_group(&self, stage: usize) -> Vec<usize> {
        (0..self.data).map(|data| self.rank_of(data, stage)).collect()
    }

    /// Members of replica `data`'s pipeline, in stage order.
    pub fn pipeline_group(&self, data: usize) -> Vec<usize> {
        (0..self.pipeline).map(|stage| self.rank_of(data, stage)).collect()
    }
}
