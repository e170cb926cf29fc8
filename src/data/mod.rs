//! Datasets and the rank-aware sampler.
//!
//! Every dataset implements [`Dataset`] and produces [`Batch`]es in the layout the built-in models
//! take: `inputs` `[batch, width]` f32 (features, flattened images, or float token ids) and
//! `targets` `[batch, t]` ids. [`DistributedSampler`] says which samples each data-parallel rank
//! reads at each step. Everything is deterministic given the seed.

mod batch;
mod error;
mod idx;
mod sampler;
mod synthetic;
mod text;

pub use crate::rng::SplitMix64;
pub use batch::{Batch, Dataset};
pub use error::DataError;
pub use idx::{read_idx, write_idx, IdxArray, IdxDataset};
pub use sampler::DistributedSampler;
pub use synthetic::SyntheticDataset;
pub use text::TextDataset;
