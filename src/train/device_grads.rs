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
use crate::compress::PowerSgd;
use crate::config::{CommBackend, CompressionMethod, Resolved};
use crate::parallel::{
    BucketLayout, DdpError, DevicePowerSgd, FlatReduce, HostDeviceSum, HostFlatReduce, ParamError, SyncError, SyncStats,
};

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
    /// `None` otherwise: gradients are averaged over `data` (the ranks holding the same blocks:
    /// the world, or a pipeline stage's replicas), NCCL's id going through `world`'s store.
    /// `buckets` are the host engine's buckets (which parameters, which elements of the flat
    /// gradient) and `shapes` the parameters' shapes (layout order): a codec on the device keeps
    /// them.
    pub(crate) fn setup(
        world: &ProcessGroup,
        data: &ProcessGroup,
        buckets: &BucketLayout,
        shapes: &[Vec<usize>],
        resolved: &Resolved,
        options: &TrainOptions,
    ) -> Result<Option<Self>, TrainError> {
        let rank = world.rank();
        let bucket_shapes: Vec<Vec<Vec<usize>>> = buckets.params.iter().map(|r| shapes[r.clone()].to_vec()).collect();
        let reduce: Box<dyn FlatReduce> = if resolved.backend == CommBackend::Nccl {
            nccl_reduce(world, data, &buckets.elements, &bucket_shapes, resolved)?
        } else if options.device_path_via_host {
            let codec = super::build::codec_options(&resolved.config);
            let unsupported = |why: &str| TrainError::Unsupported {
                rank,
                what: format!(
                    "the device path through the host with compression.method = \"{}\"",
                    codec.method
                ),
                why: why.into(),
            };
            match codec.method {
                CompressionMethod::None => Box::new(HostFlatReduce::new(data)),
                _ if codec.start_step > 0 => {
                    return Err(unsupported(
                        "a codec on the device starts at step 0 (compression.start_step must be 0, as on NCCL)",
                    ))
                }
                // PowerSGD's matmuls on the device, its factors summed by the host group.
                CompressionMethod::PowerSgd => {
                    let powersgd = PowerSgd::new(codec.powersgd_rank, codec.error_feedback, codec.seed);
                    let sum = Box::new(HostDeviceSum::new(data));
                    let device = DevicePowerSgd::new(sum, powersgd, &buckets.elements, &bucket_shapes)
                        .map_err(|e| device_err(rank, "PowerSGD on the device", e))?;
                    Box::new(device)
                }
                _ => {
                    return Err(unsupported(
                        "its stand-in for NCCL runs PowerSGD or no codec (fp16, bf16 and top-k on the device need \
                         NCCL and the GPU kernels)",
                    ))
                }
            }
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

    /// Scales the step's sum by `factor` on the device (to the mean over its micro-batches, out
    /// of the loss scale: what the host codec is given), averages it over the ranks there and
    /// reads it into `out` (layout order); the sum is reset for the next step. `step` is the
    /// optimizer step (0-based).
    pub(crate) fn average_into(
        &mut self,
        rank: usize,
        step: u64,
        factor: f32,
        out: &mut Vec<f32>,
    ) -> Result<SyncStats, TrainError> {
        out.clear();
        let Some(sum) = self.sum.take() else {
            return Ok(SyncStats::default());
        };
        let sum = if factor == 1.0 { sum } else { sum.mul_scalar(factor) };
        let started = Instant::now();
        self.reduce.set_step(step);
        let averaged = self
            .reduce
            .average(sum)
            .map_err(|e| device_err(rank, "the gradient all-reduce on the device", e))?;
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

    /// A device codec's state in the checkpoint's form, under the names the host codec saves (so
    /// either path resumes the other's checkpoint): its residual as `residual.bucket<b>` tensors
    /// over the host engine's `buckets`, then its factors (PowerSGD's `q.bucket<b>.param<i>`);
    /// `None` when the reduction keeps neither.
    pub(crate) fn codec_state(
        &self,
        rank: usize,
        buckets: &[std::ops::Range<usize>],
    ) -> Result<Option<Vec<crate::compress::StateTensor>>, TrainError> {
        let flat = self
            .reduce
            .residual()
            .map_err(|e| device_err(rank, "reading the codec residual", e))?;
        let factors = self
            .reduce
            .factors()
            .map_err(|e| device_err(rank, "reading the codec factors", e))?;
        if flat.is_none() && factors.is_empty() {
            return Ok(None);
        }
        let mut state: Vec<_> = flat
            .map(|flat| {
                buckets
                    .iter()
                    .enumerate()
                    .map(|(b, range)| crate::compress::StateTensor {
                        name: crate::compress::residual_name(b),
                        shape: vec![range.len()],
                        data: flat[range.clone()].to_vec(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        state.extend(factors);
        Ok(Some(state))
    }

    /// Hands the host codec's state (as resumed from a checkpoint) to the device codec: its
    /// factors (PowerSGD's Q), and its residuals when every bucket has one.
    pub(crate) fn resume_codec(
        &self,
        rank: usize,
        codec: &dyn crate::compress::GradCodec,
        buckets: usize,
    ) -> Result<(), TrainError> {
        self.reduce
            .load_factors(&codec.state())
            .map_err(|e| device_err(rank, "loading the codec factors", e))?;
        let mut flat = Vec::new();
        for b in 0..buckets {
            match codec.residual(b) {
                Some(r) => flat.extend_from_slice(r),
                None => return Ok(()),
            }
        }
        self.reduce
            .load_residual(&flat)
            .map_err(|e| device_err(rank, "loading the codec residual", e))
    }

    /// Whether the reduction's bytes travel outside the host group's counters (NCCL's do).
    pub(crate) fn counts_own_bytes(&self, resolved: &Resolved) -> bool {
        resolved.backend == CommBackend::Nccl
    }
}

/// The trainer's error for a failure of the device reduction.
fn device_err(rank: usize, what: &str, e: DdpError) -> TrainError {
    match e {
        DdpError::Comm(source) => TrainError::Comm { rank, source },
        DdpError::Codec(source) => TrainError::Sync {
            rank,
            source: SyncError::Codec(source),
        },
        other => TrainError::Unsupported {
            rank,
            what: what.into(),
            why: other.to_string(),
        },
    }
}

/// NCCL on this rank's CUDA device (feature `cuda`).
#[cfg(feature = "cuda")]
fn nccl_reduce(
    world: &ProcessGroup,
    data: &ProcessGroup,
    buckets: &[std::ops::Range<usize>],
    shapes: &[Vec<Vec<usize>>],
    resolved: &Resolved,
) -> Result<Box<dyn FlatReduce>, TrainError> {
    let rank = world.rank();
    let unsupported = |why: String| TrainError::Unsupported {
        rank,
        what: "comm.backend = \"nccl\"".into(),
        why,
    };
    let store = world
        .store()
        .cloned()
        .ok_or_else(|| unsupported("the job has no store for NCCL's id (start it with burnrun)".into()))?;
    let timeout = std::time::Duration::from_secs(resolved.config.comm.timeout_secs);
    let codec = super::build::codec_options(&resolved.config);
    crate::parallel::nccl_flat_reduce(data, store, cuda_ordinal(resolved), timeout, &codec, buckets, shapes)
        .map_err(|e| unsupported(e.to_string()))
}

/// The CUDA device this rank runs on: the configured one, else its local rank's.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_ordinal(resolved: &Resolved) -> usize {
    let local_rank = crate::env::DistEnv::from_env().map(|e| e.local_rank).unwrap_or(0);
    match resolved.device {
        crate::config::DeviceSpec::Cuda(Some(n)) => n,
        _ => local_rank,
    }
}

/// The link that carries a pipeline stage's activations and gradients on NCCL when `resolved`
/// runs on it (`None`: the host group's link).
#[cfg(feature = "cuda")]
pub(crate) fn nccl_stage_link(
    world: &ProcessGroup,
    pipe: &ProcessGroup,
    resolved: &Resolved,
    device: &burn::tensor::Device,
) -> Result<Option<Box<dyn crate::parallel::StageLink>>, TrainError> {
    if resolved.backend != CommBackend::Nccl {
        return Ok(None);
    }
    let rank = world.rank();
    let unsupported = |why: String| TrainError::Unsupported {
        rank,
        what: "pipeline stages on NCCL".into(),
        why,
    };
    let store = world
        .store()
        .cloned()
        .ok_or_else(|| unsupported("the job has no store for NCCL's ids (start it with burnrun)".into()))?;
    let timeout = std::time::Duration::from_secs(resolved.config.comm.timeout_secs);
    let link = crate::parallel::NcclStageLink::new(pipe, store, cuda_ordinal(resolved), device.clone(), timeout)
        .map_err(|e| unsupported(e.to_string()))?;
    Ok(Some(Box::new(link)))
}

/// Without the `cuda` feature `nccl` is never resolved: the host group's link.
#[cfg(not(feature = "cuda"))]
pub(crate) fn nccl_stage_link(
    _world: &ProcessGroup,
    _pipe: &ProcessGroup,
    _resolved: &Resolved,
    _device: &burn::tensor::Device,
) -> Result<Option<Box<dyn crate::parallel::StageLink>>, TrainError> {
    Ok(None)
}

/// Without the `cuda` feature validation refuses a CUDA device, so `nccl` is never resolved.
#[cfg(not(feature = "cuda"))]
fn nccl_reduce(
    world: &ProcessGroup,
    _data: &ProcessGroup,
    _buckets: &[std::ops::Range<usize>],
    _shapes: &[Vec<Vec<usize>>],
    _resolved: &Resolved,
) -> Result<Box<dyn FlatReduce>, TrainError> {
    Err(TrainError::Unsupported {
        rank: world.rank(),
        what: "comm.backend = \"nccl\"".into(),
        why: "this build has no CUDA backend (rebuild with `--features cuda`)".into(),
    })
}
