//! Errors of the precision layer.

use std::ops::Range;

use crate::comm::CommError;

/// What went wrong in the loss scaler.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// The all-reduce that agrees on an overflow failed.
    #[error("loss scaler, step {step}: agreeing on overflow across ranks failed: {source}")]
    Comm {
        /// The optimizer step.
        step: u64,
        /// The collective's error (names the rank and the peer waited for).
        source: CommError,
    },
    /// An option of `[precision]` is out of range.
    #[error("precision.{key} = {value}: {reason}")]
    InvalidOption {
        /// The config key.
        key: &'static str,
        /// Its value, as written.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
    /// A named parameter reaches past the gradient vector (a caller bug).
    #[error("rank {rank}: parameter `{name}` spans elements {elements:?} but the gradient has {numel}")]
    Span {
        /// This rank.
        rank: usize,
        /// The parameter.
        name: String,
        /// Its elements.
        elements: Range<usize>,
        /// Elements in the gradient.
        numel: usize,
    },
    /// Gradients kept overflowing at the minimum scale: the loss is diverging, scaling cannot help.
    #[error(
        "loss scale collapsed at step {step}: {consecutive} consecutive overflows at the minimum scale {scale} \
         (ranks overflowing this step: {ranks:?}; first parameter on rank {rank}: {first_param}); the loss is \
         probably diverging: lower the learning rate, clip gradients, or compute in bf16"
    )]
    Collapsed {
        /// The optimizer step.
        step: u64,
        /// The scale (the minimum).
        scale: f32,
        /// Consecutive overflowing steps at the minimum.
        consecutive: u64,
        /// Group ranks whose gradients overflowed at this step.
        ranks: Vec<usize>,
        /// This rank.
        rank: usize,
        /// The first overflowing parameter on this rank, or `none on this rank`.
        first_param: String,
    },
}
