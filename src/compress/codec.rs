//! The plug-in point: [`GradCodec`], its per-bucket statistics and the run-time factory.

use super::error::CompressError;
use super::half_cast::{HalfCast, WireHalf};
use super::powersgd::PowerSgd;
use super::state::{StateTensor, StateTensors};
use super::topk::TopK;
use super::uncompressed::Uncompressed;
use super::warmup::WarmUp;
use crate::comm::ProcessGroup;
use crate::config::CompressionMethod;

/// Averages one DDP bucket's gradients across a data-parallel group, exactly or lossily.
///
/// Every rank of `group` calls [`GradCodec::all_reduce_avg`] for the same buckets in the same order
/// with the same shapes (the collectives inside check this). Codecs keep state per bucket index
/// (error-feedback residuals, warm-started factors), so a bucket index must always name the same
/// parameters.
///
/// Non-finite gradients (an f16 overflow the loss scaler will skip) reach every rank's output as
/// non-finite values, and a step whose averaged result is not finite leaves the codec's state as it
/// was, so a skipped step does not poison later ones.
pub trait GradCodec: Send + std::fmt::Debug {
    /// Replaces `grads` (bucket `bucket`'s elements, in parameter order) with their average across
    /// `group`. `shapes` are the shapes of the bucket's parameters in order; their element counts
    /// must add up to `grads.len()`. `step` is the optimizer step (compression starts at
    /// `start_step`).
    fn all_reduce_avg(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        shapes: &[Vec<usize>],
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError>;

    /// The method's config name (`none`, `fp16`, `bf16`, `topk`, `powersgd`).
    fn name(&self) -> &'static str;

    /// This rank's error-feedback residual for `bucket` (what it has not sent yet), if it keeps one.
    /// For diagnostics, tests and checkpoints.
    fn residual(&self, _bucket: usize) -> Option<&[f32]> {
        None
    }

    /// Drops every per-bucket state (residuals, warm starts), e.g. after the bucket layout changed.
    fn reset(&mut self) {}

    /// The method and every option that gives this codec's state its meaning, e.g.
    /// `topk(ratio=0.1, error_feedback=true)`. State saved from one codec is loaded only into a
    /// codec with the same description (checkpoints compare them).
    fn describe(&self) -> String;

    /// This rank's state as named f32 tensors (copies), for checkpoints: error-feedback residuals
    /// and PowerSGD's warm-started Q factors. Empty for a stateless codec and before the first
    /// compressed step. Residuals differ between ranks: each rank saves and loads its own.
    fn state(&self) -> Vec<StateTensor> {
        Vec::new()
    }

    /// Replaces this codec's state by `tensors` (what [`GradCodec::state`] returned on the same
    /// rank of a codec with the same [`GradCodec::describe`]), for the buckets that will be
    /// averaged: `buckets[b]` are the shapes of bucket `b`'s parameters, as they will be passed
    /// to [`GradCodec::all_reduce_avg`]. A bucket with no saved state starts as on its first
    /// step. All or nothing: on error (a tensor of another shape than the buckets need, a name
    /// that belongs to no part of this codec) the state is left as it was, and the error names
    /// the tensor and both shapes.
    fn load_state(&mut self, _buckets: &[Vec<Vec<usize>>], tensors: Vec<StateTensor>) -> Result<(), CompressError> {
        StateTensors::new(self.name(), tensors)?.finish()
    }
}

/// What averaging one bucket did on this rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CodecStats {
    /// Payload bytes this rank contributed for the bucket, as sent: the size of its message(s) to
    /// the collectives (4 per element uncompressed, 2 for fp16/bf16, the (index, value) pairs for
    /// top-k, the P and Q factors plus uncompressed tensors for PowerSGD). Independent of the
    /// collective algorithm, so methods compare directly.
    pub wire_bytes: u64,
    /// Bytes the transport actually sent for the bucket, measured on the group's communicator:
    /// includes the algorithm's fan-out (a ring all-reduce sends about `2 (n-1)/n` times the
    /// payload, an all-gather `n-1` times) and framing. Counts every group of the process, so it
    /// over-counts if another thread runs collectives at the same time.
    pub transport_bytes: u64,
    /// `||g - sent(g)|| / ||g||` on this rank, where `g` is the gradient plus the carried
    /// residual and `sent(g)` its decoded contribution: the relative size of what was held back
    /// this step. 0 for exact methods and for a zero gradient; NaN when the gradient is not finite.
    pub relative_error: f64,
    /// Whether the lossy method ran (false for `none` and during the `start_step` warm-up).
    pub compressed: bool,
}

/// Parses a method by its config name, ignoring case. The enum is the config's (its names,
/// `ALL` and `Display` come from there); the parse lives here because its error is the codec
/// layer's, and the config layer may not name `compress`.
impl std::str::FromStr for CompressionMethod {
    type Err = CompressError;
    fn from_str(s: &str) -> Result<Self, CompressError> {
        let name = s.to_ascii_lowercase();
        CompressionMethod::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| CompressError::UnknownMethod { name: s.to_string() })
    }
}

/// Everything [`build_codec`] needs: the `[compression]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecOptions {
    /// The method. Default `none`.
    pub method: CompressionMethod,
    /// Top-k: fraction of each bucket's entries a rank sends, in (0, 1]. Default 0.01.
    pub topk_ratio: f32,
    /// PowerSGD: rank of the P, Q factors, at least 1. Default 4 (the paper's usual choice).
    pub powersgd_rank: usize,
    /// Carry what was not sent into the next step (lossy methods only). Default true: without it
    /// top-k and PowerSGD lose accuracy (Vogels et al. 2019; Stich et al. 2018).
    pub error_feedback: bool,
    /// Steps before this one are averaged uncompressed (PowerSGD's and 1-bit Adam's warm-up).
    /// Default 0: compress from the first step.
    pub start_step: u64,
    /// Seed of PowerSGD's initial Q factors; identical on every rank. Default 0.
    pub seed: u64,
}

impl Default for CodecOptions {
    fn default() -> Self {
        Self {
            method: CompressionMethod::None,
            topk_ratio: 0.01,
            powersgd_rank: 4,
            error_feedback: true,
            start_step: 0,
            seed: 0,
        }
    }
}

impl CodecOptions {
    /// Checks the ranges of the options the chosen method uses.
    pub fn validate(&self) -> Result<(), CompressError> {
        if self.method == CompressionMethod::TopK && !(self.topk_ratio > 0.0 && self.topk_ratio <= 1.0) {
            return Err(CompressError::InvalidOption {
                key: "topk_ratio",
                value: self.topk_ratio.to_string(),
                reason: "must be in (0, 1]: the fraction of each bucket's entries a rank sends",
            });
        }
        if self.method == CompressionMethod::PowerSgd && self.powersgd_rank == 0 {
            return Err(CompressError::InvalidOption {
                key: "powersgd_rank",
                value: "0".to_string(),
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// Builds the codec `options` describe, wrapped in the uncompressed warm-up when `start_step > 0`.
pub fn build_codec(options: &CodecOptions) -> Result<Box<dyn GradCodec>, CompressError> {
    options.validate()?;
    let ef = options.error_feedback;
    let codec: Box<dyn GradCodec> = match options.method {
        CompressionMethod::None => return Ok(Box::new(Uncompressed)),
        CompressionMethod::Fp16 => Box::new(HalfCast::new(WireHalf::F16, ef)),
        CompressionMethod::Bf16 => Box::new(HalfCast::new(WireHalf::Bf16, ef)),
        CompressionMethod::TopK => Box::new(TopK::new(options.topk_ratio, ef)),
        CompressionMethod::PowerSgd => Box::new(PowerSgd::new(options.powersgd_rank, ef, options.seed)),
    };
    Ok(if options.start_step > 0 {
        Box::new(WarmUp::new(codec, options.start_step))
    } else {
        codec
    })
}

/// Checks that `shapes` cover exactly `numel` elements; a 0-d shape `[]` is one element.
pub(crate) fn check_shapes(
    group: &ProcessGroup,
    method: &'static str,
    bucket: usize,
    shapes: &[Vec<usize>],
    numel: usize,
) -> Result<(), CompressError> {
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    if total != numel {
        return Err(CompressError::Layout {
            rank: group.rank(),
            method,
            bucket,
            reason: format!("the shapes {shapes:?} hold {total} elements but the gradient slice has {numel}"),
        });
    }
    Ok(())
}

/// Runs one collective of a codec, turning its error into a [`CompressError::Comm`].
pub(crate) fn collective<R>(
    method: &'static str,
    bucket: usize,
    step: u64,
    result: Result<R, crate::comm::CommError>,
) -> Result<R, CompressError> {
    result.map_err(|source| CompressError::Comm {
        method,
        bucket,
        step,
        source,
    })
}
