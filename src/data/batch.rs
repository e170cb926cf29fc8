//! A batch of samples as burn tensors, and the dataset interface that produces them.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::error::DataError;

/// Inputs and targets of `len()` samples, laid out as the models expect them:
/// `inputs` `[batch, input_width]` (features, flattened images, or float token ids) and
/// `targets` `[batch, targets_per_sample]` (one class id, or one next token per position).
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, input_width]`.
    pub inputs: Tensor<2>,
    /// `[batch, targets_per_sample]` class or token ids.
    pub targets: Tensor<2, Int>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.inputs.dims()[0]
    }

    /// Whether the batch holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples `start..start + len` (a micro-batch); panics if out of range, like burn's `narrow`.
    pub fn narrow(&self, start: usize, len: usize) -> Batch {
        Batch {
            inputs: self.inputs.clone().narrow(0, start, len),
            targets: self.targets.clone().narrow(0, start, len),
        }
    }
}

/// A finite, indexable set of samples. Implementations are deterministic: sample `i` is the
/// same on every rank and every call.
pub trait Dataset: Send + Sync + std::fmt::Debug {
    /// Short name for messages (`synthetic`, `idx`, `text`).
    fn name(&self) -> &'static str;

    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether the dataset has no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per sample in [`Batch::inputs`].
    fn input_width(&self) -> usize;

    /// Targets per sample in [`Batch::targets`] (1 for classification, `seq_len` for text).
    fn targets_per_sample(&self) -> usize;

    /// Number of classes (the vocabulary size for text): every target is below it.
    fn num_classes(&self) -> usize;

    /// The per-sample image shape `[c, h, w]`, for datasets of images.
    fn image_shape(&self) -> Option<[usize; 3]> {
        None
    }

    /// Appends sample `index`'s inputs (`input_width()` values) and targets
    /// (`targets_per_sample()` ids). `index < len()`: [`Dataset::batch`] checks it.
    fn write_sample(&self, index: usize, inputs: &mut Vec<f32>, targets: &mut Vec<i64>);

    /// The samples `indices`, in that order, as tensors on `device`.
    fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch, DataError> {
        let len = self.len();
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(DataError::IndexOutOfRange {
                dataset: self.name(),
                index,
                len,
            });
        }
        let (width, per_sample) = (self.input_width(), self.targets_per_sample());
        let mut inputs = Vec::with_capacity(indices.len() * width);
        let mut targets = Vec::with_capacity(indices.len() * per_sample);
        for &index in indices {
            self.write_sample(index, &mut inputs, &mut targets);
        }
        let batch = indices.len();
        Ok(Batch {
            inputs: Tensor::from_data(TensorData::new(inputs, [batch, width]), device),
            targets: Tensor::from_data(TensorData::new(targets, [batch, per_sample]), device),
        })
    }
}
