//! The trainer's NCCL path (`comm.backend` resolved to `nccl`, feature `cuda`): each backward's
//! gradients are summed on the GPU as one flat tensor, averaged there by NCCL, and read back once
//! for the f32 master weights and the optimizer on the host. Control traffic (the loss, buffers,
//! replica checks, checkpoints) stays on the host group.
//!
//! Without the feature the type is empty and never built: validation refuses a CUDA device in
//! such a build, so `nccl` cannot be resolved.

use burn::module::Module;
use burn::tensor::Gradients;

use crate::comm::ProcessGroup;
use crate::config::{CommBackend, Resolved};
use crate::parallel::{ParamError, SyncStats};

use super::TrainError;

/// Gradients of a step on the GPU, averaged by NCCL.
#[derive(Debug)]
pub(crate) struct NcclGrads {
    #[cfg(feature = "cuda")]
    reduce: crate::parallel::DeviceAllReduce,
    /// The step's sum so far.
    #[cfg(feature = "cuda")]
    sum: Option<burn::tensor::Tensor<1>>,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

impl NcclGrads {
    /// The NCCL path when `resolved` runs its collectives on NCCL, `None` otherwise.
    pub(crate) fn setup(world: &ProcessGroup, resolved: &Resolved) -> Result<Option<Self>, TrainError> {
        if resolved.backend != CommBackend::Nccl {
            return Ok(None);
        }
        let rank = world.rank();
        #[cfg(feature = "cuda")]
        {
            let local_rank = crate::env::DistEnv::from_env().map(|e| e.local_rank).unwrap_or(0);
            let ordinal = match resolved.device {
                crate::config::DeviceSpec::Cuda(Some(n)) => n,
                _ => local_rank,
            };
            let timeout = std::time::Duration::from_secs(resolved.config.comm.timeout_secs);
            let reduce = crate::parallel::DeviceAllReduce::new(world, ordinal, timeout).map_err(|e| {
                TrainError::Unsupported {
                    rank,
                    what: "comm.backend = \"nccl\"".into(),
                    why: e.to_string(),
                }
            })?;
            if rank == 0 {
                tracing::info!(
                    "gradients: averaged on the GPU by NCCL ({}), read back once per step",
                    crate::comm::Communicator::links(reduce.communicator())
                );
            }
            Ok(Some(Self { reduce, sum: None }))
        }
        #[cfg(not(feature = "cuda"))]
        Err(TrainError::Unsupported {
            rank,
            what: "comm.backend = \"nccl\"".into(),
            why: "this build has no CUDA backend (rebuild with `--features cuda`)".into(),
        })
    }

    /// Adds the gradients of one backward of `model` to the step's sum, on the device.
    pub(crate) fn add<M: Module>(&mut self, model: &M, grads: Gradients) -> Result<(), ParamError> {
        #[cfg(feature = "cuda")]
        {
            let params = burn::optim::GradientsParams::from_grads(grads, model);
            if let Some(flat) = crate::parallel::flat_grads_on_device(model, &params, None)? {
                self.sum = Some(match self.sum.take() {
                    Some(sum) => sum + flat,
                    None => flat,
                });
            }
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, grads);
            match self.never {}
        }
    }

    /// Averages the step's sum over the ranks on the device and reads it into `out` (layout
    /// order); the sum is reset for the next step.
    pub(crate) fn average_into(&mut self, rank: usize, out: &mut Vec<f32>) -> Result<SyncStats, TrainError> {
        #[cfg(feature = "cuda")]
        {
            out.clear();
            let Some(sum) = self.sum.take() else {
                return Ok(SyncStats::default());
            };
            let (averaged, comm_ms) = self.reduce.average(sum).map_err(|e| match e {
                crate::parallel::DeviceSyncError::Comm(source) => TrainError::Comm { rank, source },
                other => TrainError::Unsupported {
                    rank,
                    what: "the NCCL gradient all-reduce".into(),
                    why: other.to_string(),
                },
            })?;
            crate::parallel::read_flat(averaged, out).map_err(|source| TrainError::Params { rank, source })?;
            Ok(SyncStats {
                buckets: 1,
                bytes: out.len() * 4,
                comm_ms,
                wait_ms: comm_ms,
                wire_bytes: (out.len() * 4) as u64,
                compression_error: Vec::new(),
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (rank, out);
            match self.never {}
        }
    }
}
