//! The rank mesh: `data` replicas of a `pipeline` of stages, each stage split over `tensor` ranks.
//!
//! One type for the config (`Resolved.mesh`, validated against the world size) and for the
//! parallel layer that builds its process groups from it (re-exported as
//! `crate::parallel::ParallelDims`): the config layer may not depend on `parallel`, so the type
//! lives here, below both.
//!
//! Rank r is tensor rank `r % tensor` of stage `(r / tensor) % pipeline` of replica
//! `r / (tensor * pipeline)`: the ranks of a tensor-parallel group are neighbours (they exchange
//! activations twice per transformer layer, so the launcher's consecutive local ranks put them
//! on one host), then the stages of one replica, and the data-parallel group of a (stage,
//! tensor rank) is every `tensor * pipeline`-th rank. With `tensor = 1` this is the
//! `data x pipeline` mesh it always was.

/// Sizes of the mesh axes (`data * tensor * pipeline` ranks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelDims {
    /// Data-parallel replicas.
    pub data: usize,
    /// Tensor-parallel ranks per stage.
    pub tensor: usize,
    /// Pipeline stages per replica.
    pub pipeline: usize,
}

/// A rank's place in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCoords {
    /// Replica index (position in the data axis).
    pub data: usize,
    /// Tensor-parallel rank within its stage.
    pub tensor: usize,
    /// Stage index.
    pub stage: usize,
}

/// The mesh does not fit the world.
#[derive(Debug, thiserror::Error)]
#[error("parallel: data({data}) * tensor({tensor}) * pipeline({pipeline}) = {product} != WORLD_SIZE({world_size})")]
pub struct ParallelDimsError {
    /// Data axis.
    pub data: usize,
    /// Tensor axis.
    pub tensor: usize,
    /// Pipeline axis.
    pub pipeline: usize,
    /// Their product.
    pub product: usize,
    /// The world size.
    pub world_size: usize,
}

impl ParallelDims {
    /// Checks `data * tensor * pipeline == world_size`; `data == 0` means "whatever is left".
    pub fn new(data: usize, tensor: usize, pipeline: usize, world_size: usize) -> Result<Self, ParallelDimsError> {
        let (tensor, pipeline) = (tensor.max(1), pipeline.max(1));
        let data = if data == 0 {
            world_size / (tensor * pipeline)
        } else {
            data
        };
        let product = data * tensor * pipeline;
        if product != world_size || data == 0 {
            return Err(ParallelDimsError {
                data,
                tensor,
                pipeline,
                product,
                world_size,
            });
        }
        Ok(Self { data, tensor, pipeline })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.data * self.tensor * self.pipeline
    }

    /// Coordinates of `rank`.
    pub fn coords(&self, rank: usize) -> MeshCoords {
        MeshCoords {
            data: rank / (self.tensor * self.pipeline),
            tensor: rank % self.tensor,
            stage: (rank / self.tensor) % self.pipeline,
        }
    }

    /// Rank at the given coordinates.
    pub fn rank_of(&self, coords: MeshCoords) -> usize {
        (coords.data * self.pipeline + coords.stage) * self.tensor + coords.tensor
    }

    /// Members of the data-parallel group of (`stage`, `tensor`) (one rank per replica).
    pub fn data_group(&self, stage: usize, tensor: usize) -> Vec<usize> {
        (0..self.data)
            .map(|d| self.rank_of(MeshCoords { data: d, tensor, stage }))
            .collect()
    }

    /// Members of the pipeline of replica `data`, tensor rank `tensor`, in stage order.
    pub fn pipeline_group(&self, data: usize, tensor: usize) -> Vec<usize> {
        (0..self.pipeline)
            .map(|s| self.rank_of(MeshCoords { data, tensor, stage: s }))
            .collect()
    }

    /// Members of the tensor-parallel group of replica `data`'s stage `stage`, in tensor order.
    pub fn tensor_group(&self, data: usize, stage: usize) -> Vec<usize> {
        (0..self.tensor)
            .map(|t| self.rank_of(MeshCoords { data, tensor: t, stage }))
            .collect()
    }

    /// For `ProcessGroup::split`: the data-parallel color of every rank (its stage and tensor rank).
    pub fn data_colors(&self) -> Vec<usize> {
        (0..self.world_size())
            .map(|r| {
                let c = self.coords(r);
                c.stage * self.tensor + c.tensor
            })
            .collect()
    }

    /// For `ProcessGroup::split`: the pipeline color of every rank (its replica and tensor rank).
    pub fn pipeline_colors(&self) -> Vec<usize> {
        (0..self.world_size())
            .map(|r| {
                let c = self.coords(r);
                c.data * self.tensor + c.tensor
            })
            .collect()
    }

    /// For `ProcessGroup::split`: the tensor-parallel color of every rank (its replica and stage).
    pub fn tensor_colors(&self) -> Vec<usize> {
        (0..self.world_size())
            .map(|r| {
                let c = self.coords(r);
                c.data * self.pipeline + c.stage
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_two_by_two_mesh_places_stages_next_to_each_other() {
        let dims = ParallelDims::new(2, 1, 2, 4).unwrap();
        assert_eq!(dims.pipeline_group(0, 0), vec![0, 1]);
        assert_eq!(dims.pipeline_group(1, 0), vec![2, 3]);
        assert_eq!(dims.data_group(0, 0), vec![0, 2]);
        assert_eq!(
            dims.coords(3),
            MeshCoords {
                data: 1,
                tensor: 0,
                stage: 1
            }
        );
    }

    #[test]
    fn tensor_parallel_ranks_are_neighbours_then_stages_then_replicas() {
        // data 2 x tensor 2 x pipeline 2 = 8.
        let dims = ParallelDims::new(2, 2, 2, 8).unwrap();
        assert_eq!(dims.tensor_group(0, 0), vec![0, 1]);
        assert_eq!(dims.tensor_group(0, 1), vec![2, 3]);
        assert_eq!(dims.pipeline_group(0, 1), vec![1, 3]);
        assert_eq!(dims.data_group(1, 0), vec![2, 6]);
        for r in 0..8 {
            assert_eq!(dims.rank_of(dims.coords(r)), r);
        }
        // Every split gives groups of the right size, each rank in exactly one.
        for (colors, size) in [
            (dims.data_colors(), 2),
            (dims.tensor_colors(), 2),
            (dims.pipeline_colors(), 2),
        ] {
            for c in 0..4 {
                assert_eq!(colors.iter().filter(|&&x| x == c).count(), size, "{colors:?}");
            }
        }
    }

    #[test]
    fn a_mesh_that_does_not_fit_names_every_term() {
        let err = ParallelDims::new(2, 1, 3, 4).unwrap_err().to_string();
        assert_eq!(err, "parallel: data(2) * tensor(1) * pipeline(3) = 6 != WORLD_SIZE(4)");
        let err = ParallelDims::new(0, 3, 1, 4).unwrap_err().to_string();
        assert!(err.contains("tensor(3)"), "{err}");
    }
}
