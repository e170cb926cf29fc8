//! `[data]`: the dataset and how it is split across ranks.
//!
//! Each kind has its own sub-table (`[data.synthetic]`, `[data.idx]`, `[data.text]`); only the one
//! `kind` names is used. A relative path written in a config file is relative to that file's
//! folder; one given with `--set` (or in the embedded default, which has no file) is relative to
//! the directory burnrun is started in.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `data.kind`: where samples come from.
    DataKind, default Synthetic {
        /// A deterministic classification set generated from a seed (`[data.synthetic]`).
        Synthetic = "synthetic",
        /// MNIST-format IDX image and label files (`[data.idx]`).
        Idx = "idx",
        /// A plain text file read as a character corpus (`[data.text]`).
        Text = "text",
    }
}

/// `[data]`: the dataset.
///
/// The sampler gives each data-parallel rank a disjoint shard of every epoch, shuffled with
/// `train.seed`. An epoch has `N` samples and each micro step consumes `batch_size` samples on
/// each of the `D` data-parallel ranks.
///
/// The last uneven batch: with `drop_last = true` (the default) an epoch has
/// `floor(N / (batch_size * D))` micro steps and the remaining `N mod (batch_size * D)` samples
/// of that epoch's order are skipped (a different remainder each epoch, since the order is
/// reshuffled). With `drop_last = false` the last batch is filled up by wrapping around to the
/// start of the epoch's order, so a few samples are seen twice. Either way every rank runs the same
/// number of steps: ranks never wait on a peer that ran out of data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Which dataset: `"synthetic"`, `"idx"` or `"text"`. Default `"synthetic"`.
    pub kind: DataKind,
    /// Skip the last uneven batch of an epoch (`true`) or fill it by wrapping around (`false`);
    /// see the rule above. Default `true`.
    pub drop_last: bool,
    /// Reshuffle the sample order every epoch with `train.seed` (`false`: file order). Default `true`.
    pub shuffle: bool,
    /// The synthetic set (used when `kind = "synthetic"`).
    pub synthetic: SyntheticConfig,
    /// IDX files (used when `kind = "idx"`).
    pub idx: IdxConfig,
    /// Text corpus (used when `kind = "text"`).
    pub text: TextConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Synthetic,
            drop_last: true,
            shuffle: true,
            synthetic: SyntheticConfig::default(),
            idx: IdxConfig::default(),
            text: TextConfig::default(),
        }
    }
}

/// `[data.synthetic]`: a deterministic classification set (one centre per class plus noise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Number of samples in the set. Default `8192`.
    pub samples: usize,
    /// Features per sample (the model's input width). Default `784`.
    pub features: usize,
    /// Number of classes, at least 2. Default `10`.
    pub classes: usize,
    /// Standard deviation of the noise around each class centre; larger is harder. Default `0.5`.
    pub noise: f64,
    /// Optional image shape `[channels, height, width]` whose product is `features`, so the CNN
    /// can run on synthetic data. Default: not set (flat features).
    pub image_shape: Option<[usize; 3]>,
    /// Seed of the generator, separate from `train.seed` so that changing the training seed keeps
    /// the same data. Default `1234`.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            samples: 8192,
            features: 784,
            classes: 10,
            noise: 0.5,
            image_shape: None,
            seed: 1234,
        }
    }
}

/// `[data.idx]`: MNIST-format IDX files (images: `u8` `[n, h, w]`, labels: `u8` `[n]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdxConfig {
    /// Path of the images file (e.g. `train-images-idx3-ubyte`). Default `""`: must be set when
    /// `data.kind = "idx"`.
    pub images: String,
    /// Path of the labels file (e.g. `train-labels-idx1-ubyte`). Default `""`: must be set when
    /// `data.kind = "idx"`.
    pub labels: String,
}

/// `[data.text]`: a plain text file as a character corpus (the vocabulary is its distinct characters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// Path of the text file. Default `""`: must be set when `data.kind = "text"`.
    pub path: String,
    /// Tokens per training sequence, at most `model.gpt.block_size`. Default: not set, meaning
    /// `model.gpt.block_size`.
    pub seq_len: Option<usize>,
}
