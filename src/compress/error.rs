//! Errors of the gradient codecs.

use crate::comm::CommError;

/// What went wrong while compressing or averaging a bucket, or building a codec.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// A collective of the codec failed (the source names the rank and the peer waited for).
    #[error("{method} codec, bucket {bucket}, step {step}: {source}")]
    Comm {
        /// The codec's name.
        method: &'static str,
        /// The bucket being averaged.
        bucket: usize,
        /// The optimizer step.
        step: u64,
        /// The collective's error.
        source: CommError,
    },
    /// The gradients handed to the codec do not match the shapes (or the state kept from an
    /// earlier step): a caller bug, found before any byte was sent.
    #[error("rank {rank}: {method} codec, bucket {bucket}: {reason}")]
    Layout {
        /// This rank.
        rank: usize,
        /// The codec's name.
        method: &'static str,
        /// The bucket.
        bucket: usize,
        /// What did not match.
        reason: String,
    },
    /// A peer sent a top-k payload with an index outside the bucket.
    #[error(
        "rank {rank}: topk codec, bucket {bucket}: peer {peer} sent index {index} but the bucket has {numel} elements \
         (ranks disagree on the bucket layout?)"
    )]
    CorruptPayload {
        /// This rank.
        rank: usize,
        /// The bucket.
        bucket: usize,
        /// The group rank whose payload was wrong.
        peer: usize,
        /// The offending index.
        index: i64,
        /// Elements in the bucket.
        numel: usize,
    },
    /// An option of `[compression]` is out of range.
    #[error("compression.{key} = {value}: {reason}")]
    InvalidOption {
        /// The config key.
        key: &'static str,
        /// Its value, as written.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
    /// A tensor of saved codec state (a checkpoint's) has another shape than this codec's
    /// buckets need.
    #[error("{method} codec state: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    StateShape {
        /// The codec's name.
        method: &'static str,
        /// The tensor.
        name: String,
        /// The shape this codec's buckets need.
        expected: Vec<usize>,
        /// The shape saved.
        found: Vec<usize>,
    },
    /// A tensor of saved codec state is malformed or belongs to no part of this codec.
    #[error("{method} codec state: tensor `{name}` {problem}")]
    StateTensor {
        /// The codec's name.
        method: &'static str,
        /// The tensor.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `compression.method` names no codec.
    #[error("compression.method = {name:?}: unknown method (expected one of none, fp16, bf16, topk, powersgd)")]
    UnknownMethod {
        /// The name given.
        name: String,
    },
}
