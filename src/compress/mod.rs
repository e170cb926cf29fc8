//! Gradient codecs: how one DDP bucket is averaged across the data-parallel group.
//!
//! A codec is chosen at run time from the `[compression]` config ([`build_codec`]) and plugs into
//! the gradient sync per bucket through [`GradCodec`], so the trainer does not change per method.
//! Codecs are pure functions over f32 slices plus per-bucket state (error-feedback residuals,
//! PowerSGD's warm-started factors); they talk to other ranks only through a
//! [`ProcessGroup`](crate::comm::ProcessGroup)'s typed collectives, never a socket. The state is
//! exported and imported as named f32 tensors ([`GradCodec::state`], [`GradCodec::load_state`])
//! so that checkpoints carry it across a resume.

mod codec;
mod error;
mod feedback;
mod half_cast;
mod powersgd;
mod state;
mod topk;
mod uncompressed;
mod warmup;

pub use codec::{build_codec, CodecOptions, CodecStats, GradCodec};
pub use error::CompressError;
pub use half_cast::{HalfCast, WireHalf};
pub use powersgd::{PowerSgd, DEFAULT_MIN_COMPRESSION_RATE};
pub use state::{residual_name, StateTensor};
pub use topk::TopK;
pub use uncompressed::Uncompressed;
pub use warmup::WarmUp;

// The device codec (`parallel::DevicePowerSgd`) runs the host codec's plan and draws.
pub(crate) use powersgd::{fresh_column, BucketPlan, LowRank, DEPENDENT_COLUMN_RATIO};
pub(crate) use state::q_name;

// The methods are the config's choice (`compression.method`); codecs are built from it directly.
pub use crate::config::CompressionMethod;
