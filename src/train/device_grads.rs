//! The trainer's device path for gradients: each backward's gradients are summed on the device
//! as one flat tensor, averaged there by a [`FlatReduce`], and read back once for the f32 master
//! weights and the optimizer on the host. With `comm.backend` resolved to `nccl` (feature `cuda`)
//! the reduction is NCCL's all-reduce on the buffer's device pointer; control traffic (the loss,
//! buffers, replica checks, checkpoints) stays on the host group.
//!
//! The same flow with the host group's all-reduce as the reduction runs on any device
//! (`TrainOptions::device_path_via_host`), so the path NCCL takes is tested where there is no GPU.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Gradients, Tensor};

use crate::comm::ProcessGroup;
use crate::config::{CommBackend, Resolved};
use crate::parallel::{DdpError, FlatReduce, HostFlatReduce, ParamError, SyncStats};

use super::{TrainError, TrainOptions};

/// Gradients of a step kept on the device and averaged there.
#[derive(Debug)]
pub(crate) struct DeviceGrads {
    reduce: Box<dyn FlatReduce>,
    /// The step's sum so far.
    sum: Option<Tensor<1>>,
}

impl DeviceGrads {
    /// The device path when `resolved` runs its collectives on NCCL (or the options ask for it),
    /// `None` otherwise.
    pub(crate) fn setup(
        world: &ProcessGroup,
        resolved: &Resolved,
        options: &TrainOptions,
    ) -> Result<Option<Self>, TrainError> {
        let rank = world.rank();
        let wanted = resolved.backend == CommBackend::Nccl || options.device_path_via_host;
        if wanted && resolved.config.parallel.pipeline > 1 {
            return Err(TrainError::Unsupported {
                rank,
                what: "the gradients' device path with parallel.pipeline > 1".into(),
                why: "pipeline stages exchange activations through the host group".into(),
            });
        }
        let reduce: Box<dyn FlatReduce> = if resolved.backend == CommBackend::Nccl {
            nccl_reduce(world, resolved)?
        } else if options.device_path_via_host {
            Box::new(HostFlatReduce::new(world))
        } else {
            return Ok(None);
        };
        if rank == 0 {
            tracing::info!("gradients: summed and averaged on the device ({reduce:?}), read back once per step");
        }
        Ok(Some(Self { reduce, sum: None }))
    }

    /// Adds the gradients of one backward of `model` to the step's sum, on the device.
    pub(crate) fn add<M: Module>(&mut self, model: &M, grads: Gradients) -> Result<(), ParamError> {
        let params = burn::optim::GradientsParams::from_grads(grads, model);
        if let Some(flat) = crate::parallel::flat_grads_on_device(model, &params, None)? {
            self.sum = Some(match self.sum.take() {
                Some(sum) => sum + flat,
                None => flat,
            });
        }
        Ok(())
    }

    /// Averages the step's sum over the ranks on the device and reads it into `out` (layout
    /// order); the sum is reset for the next step.
    pub(crate) fn average_into(&mut self, rank: usize, out: &mut Vec<f32>) -> Result<SyncStats, TrainError> {
        out.clear();
        let Some(sum) = self.sum.take() else {
            return Ok(SyncStats::default());
        };
        let started = Instant::now();
        let averaged = self.reduce.average(sum).map_err(|e| match e {
            DdpError::Comm(source) => TrainError::Comm { rank, source },
            other => TrainError::Unsupported {
                rank,
                what: "the gradient all-reduce on the device".into(),
                why: other.to_string(),
            },
        })?;
        let comm_ms = started.elapsed().as_secs_f64() * 1e3;
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

    /// Whether the reduction's bytes travel outside the host group's counters (NCCL's do).
    pub(crate) fn counts_own_bytes(&self, resolved: &Resolved) -> bool {
        resolved.backend == CommBackend::Nccl
    }
}

/// NCCL on this rank's CUDA device (feature `cuda`).
#[cfg(feature = "cuda")]
fn nccl_reduce(world: &ProcessGroup, resolved: &Resolved) -> Result<Box<dyn FlatReduce>, TrainError> {
    let rank = world.rank();
    let local_rank = crate::env::DistEnv::from_env().map(|e| e.local_rank).unwrap_or(0);
    let ordinal = match resolved.device {
        crate::config::DeviceSpec::Cuda(Some(n)) => n,
        _ => local_rank,
    };
    let timeout = std::time::Duration::from_secs(resolved.config.comm.timeout_secs);
    crate::parallel::nccl_flat_reduce(world, ordinal, timeout, &resolved.config.compression).map_err(|e| {
        TrainError::Unsupported {
            rank,
            what: "comm.backend = \"nccl\"".into(),
            why: e.to_string(),
        }
    })
}

/// Without the `cuda` feature validation refuses a CUDA device, so `nccl` is never resolved.
#[cfg(not(feature = "cuda"))]
fn nccl_reduce(world: &ProcessGroup, _resolved: &Resolved) -> Result<Box<dyn FlatReduce>, TrainError> {
    Err(TrainError::Unsupported {
        rank: world.rank(),
        what: "comm.backend = \"nccl\"".into(),
        why: "this build has no CUDA backend (rebuild with `--features cuda`)".into(),
    })
}
