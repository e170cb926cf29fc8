//! A plain text file as a character-level corpus.
//!
//! The vocabulary is the set of distinct characters (Unicode scalar values) of the file, sorted,
//! so token ids are the same for everyone who reads the same file. Sample `i` is the window of
//! `seq_len + 1` characters starting at `i * stride`: its inputs are the first `seq_len` ids (as
//! floats, which is how the GPT's embedding block takes them) and its targets the last `seq_len`
//! (the next character at every position).

use std::path::Path;

use super::batch::Dataset;
use super::error::DataError;

/// A character corpus cut into (possibly overlapping) windows.
#[derive(Debug, Clone)]
pub struct TextDataset {
    tokens: Vec<u32>,
    vocab: Vec<char>,
    seq_len: usize,
    stride: usize,
    windows: usize,
}

impl TextDataset {
    /// Reads a UTF-8 text file; windows of `seq_len + 1` characters start every `stride`
    /// characters (`stride = 1`: every position; `stride = seq_len`: no overlap of inputs).
    pub fn from_file(path: impl AsRef<Path>, seq_len: usize, stride: usize) -> Result<Self, DataError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            op: "read",
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
            path: path.to_path_buf(),
            valid_up_to: e.utf8_error().valid_up_to(),
        })?;
        Self::from_text(&text, seq_len, stride, &path.display().to_string())
    }

    /// The same from text in memory; `source_name` names it in errors.
    pub fn from_text(text: &str, seq_len: usize, stride: usize, source_name: &str) -> Result<Self, DataError> {
        if seq_len == 0 {
            return Err(DataError::Invalid {
                what: "text.seq_len",
                why: "must be at least 1".into(),
            });
        }
        if stride == 0 {
            return Err(DataError::Invalid {
                what: "text.stride",
                why: "must be at least 1".into(),
            });
        }
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let tokens: Vec<u32> = text
            .chars()
            // Every character of the text is in its own sorted vocabulary.
            .map(|c| vocab.binary_search(&c).unwrap_or_default() as u32)
            .collect();
        if tokens.len() < seq_len + 1 {
            return Err(DataError::TextTooShort {
                source_name: source_name.to_string(),
                chars: tokens.len(),
                seq_len,
            });
        }
        let windows = (tokens.len() - seq_len - 1) / stride + 1;
        Ok(Self {
            tokens,
            vocab,
            seq_len,
            stride,
            windows,
        })
    }

    /// The sorted distinct characters; token id `i` is `vocab()[i]`.
    pub fn vocab(&self) -> &[char] {
        &self.vocab
    }

    /// Number of distinct characters (the GPT's `vocab`).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The corpus as token ids.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Window length (the GPT's sequence length, at most its `block_size`).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Token ids of `text`; a character outside the vocabulary is an error.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        text.chars()
            .map(|ch| {
                self.vocab
                    .binary_search(&ch)
                    .map(|id| id as u32)
                    .map_err(|_| DataError::UnknownChar {
                        ch,
                        vocab: self.vocab.len(),
                    })
            })
            .collect()
    }

    /// The text of token ids (ids outside the vocabulary become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&id| {
                self.vocab
                    .get(id as usize)
                    .copied()
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect()
    }
}

impl Dataset for TextDataset {
    fn name(&self) -> &'static str {
        "text"
    }

    fn len(&self) -> usize {
        self.windows
    }

    fn input_width(&self) -> usize {
        self.seq_len
    }

    fn targets_per_sample(&self) -> usize {
        self.seq_len
    }

    fn num_classes(&self) -> usize {
        self.vocab.len()
    }

    fn write_sample(&self, index: usize, inputs: &mut Vec<f32>, targets: &mut Vec<i64>) {
        let start = index * self.stride;
        let window = &self.tokens[start..start + self.seq_len + 1];
        inputs.extend(window[..self.seq_len].iter().map(|&t| t as f32));
        targets.extend(window[1..].iter().map(|&t| i64::from(t)));
    }
}
