//! The error type of the data layer.

use std::path::PathBuf;

/// Everything that can go wrong when reading, generating or sampling data. File errors name the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened, read or written.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was attempted (`read`, `write`).
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// An IDX file's header or size is wrong.
    #[error("{path}: not a valid IDX {role} file: {why}")]
    IdxFormat {
        /// The file.
        path: PathBuf,
        /// `images` or `labels`.
        role: &'static str,
        /// What is wrong, with the values found and expected.
        why: String,
    },
    /// The image and label files do not describe the same samples.
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels")]
    IdxCountMismatch {
        /// The images file.
        images: PathBuf,
        /// Its number of images.
        image_count: usize,
        /// The labels file.
        labels: PathBuf,
        /// Its number of labels.
        label_count: usize,
    },
    /// A text corpus is not valid UTF-8.
    #[error("{path}: text corpus is not valid UTF-8 (byte {valid_up_to} starts an invalid sequence)")]
    NotUtf8 {
        /// The file.
        path: PathBuf,
        /// Length of the valid prefix, in bytes.
        valid_up_to: usize,
    },
    /// A text corpus has too few characters for one window.
    #[error("{source_name}: text corpus has {chars} characters, one window of seq_len {seq_len} needs {}", seq_len + 1)]
    TextTooShort {
        /// The file (or `<text>` for an in-memory corpus).
        source_name: String,
        /// Characters in the corpus.
        chars: usize,
        /// The requested window length.
        seq_len: usize,
    },
    /// A character is not in a corpus's vocabulary.
    #[error("character {ch:?} is not in the corpus vocabulary of {vocab} characters")]
    UnknownChar {
        /// The character.
        ch: char,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A dataset or sampler parameter is out of range.
    #[error("{what}: {why}")]
    Invalid {
        /// The parameter, e.g. `sampler.rank` or `synthetic.classes`.
        what: &'static str,
        /// Why, with the values involved.
        why: String,
    },
    /// A sample index is past the end of a dataset.
    #[error("{dataset}: sample {index} is out of range (the dataset has {len} samples)")]
    IndexOutOfRange {
        /// Which dataset.
        dataset: &'static str,
        /// The index asked for.
        index: usize,
        /// The dataset's length.
        len: usize,
    },
    /// A batch index is past the end of an epoch.
    #[error("rank {rank}: batch {batch} of epoch {epoch} is out of range (an epoch has {batches_per_epoch} batches)")]
    BatchOutOfRange {
        /// The sampler's rank.
        rank: usize,
        /// The epoch.
        epoch: u64,
        /// The batch asked for.
        batch: usize,
        /// Batches per epoch.
        batches_per_epoch: usize,
    },
}
