//! The rank mesh: `data` replicas of a `pipeline` of stages.
//!
//! One type for the config (`Resolved.mesh`, validated against the world size) and for the
//! parallel layer that builds its process groups from it (re-exported as
//! `crate::parallel::ParallelDims`): the config layer may not depend on `parallel`, so the type
//! lives here, below both.
//!
//! Rank r sits at stage `r % pipeline` of replica `r / pipeline`: the stages of one replica are
//! neighbours (activations cross the fastest links), and the data-parallel group of a stage is
//! every `pipeline`-th rank.

/// Sizes of the mesh axes (`data * pipeline` ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelDims {
    /// Data-parallel replicas.
    pub data: usize,
    /// Pipeline stages per replica.
    pub pipeline: usize,
}

/// A rank's place in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCoords {
    /// Replica index (position in the pipeline group's data axis).
    pub data: usize,
    /// Stage index.
    pub stage: usize,
}

/// The mesh does not fit the world.
#[derive(Debug, thiserror::Error)]
#[error("parallel: data({data}) * pipeline({pipeline}) = {product} != WORLD_SIZE({world_size})")]
pub struct ParallelDimsError {
    /// Data axis.
    pub data: usize,
    /// Pipeline axis.
    pub pipeline: usize,
    /// Their product.
    pub product: usize,
    /// The world size.
    pub world_size: usize,
}

impl ParallelDims {
    /// Checks `data * pipeline == world_size`; `data == 0` means "whatever is left".
    pub fn new(data: usize, pipeline: usize, world_size: usize) -> Result<Self, ParallelDimsError> {
        let pipeline = pipeline.max(1);
        let data = if data == 0 { world_size / pipeline } else { data };
        let product = data * pipeline;
        if product != world_size || data == 0 {
            return Err(ParallelDimsError {
                data,
                pipeline,
                product,
                world_size,
            });
        }
        Ok(Self { data, pipeline })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.data * self.pipeline
    }

    /// Coordinates of `rank`.
    pub fn coords(&self, rank: usize) -> MeshCoords {
        MeshCoords {
            data: rank / self.pipeline,
            stage: rank % self.pipeline,
        }
    }

    /// Rank at the given coordinates.
    pub fn rank_of(&self, coords: MeshCoords) -> usize {
        coords.data * self.pipeline + coords.stage
    }

    /// Members of the data-parallel group of `stage` (one rank per replica).
    pub fn data_group(&self, stage: usize) -> Vec<usize> {
        (0..self.data)
            .map(|d| self.rank_of(MeshCoords { data: d, stage }))
            .collect()
    }

    /// Members of replica `data`'s pipeline, in stage order.
    pub fn pipeline_group(&self, data: usize) -> Vec<usize> {
        (0..self.pipeline)
            .map(|s| self.rank_of(MeshCoords { data, stage: s }))
            .collect()
    }

    /// For `ProcessGroup::split`: the data-parallel color of every rank (its stage).
    pub fn data_colors(&self) -> Vec<usize> {
        (0..self.world_size()).map(|r| self.coords(r).stage).collect()
    }

    /// For `ProcessGroup::split`: the pipeline color of every rank (its replica).
    pub fn pipeline_colors(&self) -> Vec<usize> {
        (0..self.world_size()).map(|r| self.coords(r).data).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_two_by_two_mesh_places_stages_next_to_each_other() {
        let dims = ParallelDims::new(2, 2, 4).unwrap();
        assert_eq!(dims.pipeline_group(0), vec![0, 1]);
        assert_eq!(dims.pipeline_group(1), vec![2, 3]);
        assert_eq!(dims.data_group(0), vec![0, 2]);
        assert_eq!(dims.coords(3), MeshCoords { data: 1, stage: 1 });
    }

    #[test]
    fn a_mesh_that_does_not_fit_names_every_term() {
        let err = ParallelDims::new(2, 3, 4).unwrap_err().to_string();
        assert_eq!(err, "parallel: data(2) * pipeline(3) = 6 != WORLD_SIZE(4)");
    }
}
