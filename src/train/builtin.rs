//! The built-in models (MLP, CNN, GPT of `[model]`) on the built-in data (`[data]`), as one
//! [`Task`]: `burnrun train` is [`super::run`] with this task, the same path a user's own task
//! takes.

use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{Device, Tensor};

use crate::config::Resolved;
use crate::data::{Batch, Dataset};
use crate::models::{BlockStack, ModelSpec};

use super::build;
use super::task::{BlockChain, Task, TaskError};
use super::TrainError;

/// A built-in model and dataset, as a config names them.
#[derive(Debug, Clone)]
pub struct BuiltIn {
    spec: ModelSpec,
    dataset: Arc<dyn Dataset>,
    /// Every block draws its initial values from `(seed, block index)`.
    seed: u64,
}

impl BuiltIn {
    /// Opens the dataset of `resolved`'s `[data]` and plans the model of its `[model]`, sized by
    /// the data (input width, classes, vocabulary).
    pub fn new(resolved: &Resolved, rank: usize) -> Result<Self, TrainError> {
        let cfg = &resolved.config;
        let dataset = build::dataset(cfg, resolved.seq_len).map_err(|source| TrainError::Data { rank, source })?;
        let spec = build::model_spec(cfg, dataset.as_ref());
        spec.validate().map_err(|source| TrainError::Model { rank, source })?;
        Ok(Self {
            spec,
            dataset,
            seed: cfg.train.seed,
        })
    }

    /// The model's plan.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The dataset.
    pub fn dataset(&self) -> &dyn Dataset {
        self.dataset.as_ref()
    }
}

impl Task for BuiltIn {
    type Model = BlockStack;
    type Batch = Batch;

    fn describe(&self) -> String {
        format!(
            "{} ({} blocks) on {} samples of {} data",
            self.spec.name(),
            self.spec.num_blocks(),
            self.dataset.len(),
            self.dataset.name()
        )
    }

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn model(&self, device: &Device) -> Result<BlockStack, TaskError> {
        Ok(BlockStack::new(self.spec.clone(), self.seed, device)?)
    }

    fn batch(&self, indices: &[usize], device: &Device) -> Result<Batch, TaskError> {
        Ok(self.dataset.batch(indices, device)?)
    }

    fn loss(&self, model: &BlockStack, batch: &Batch) -> Result<Tensor<1>, TaskError> {
        let logits = model.forward(batch.inputs.clone())?;
        Ok(model.loss(logits, batch.targets.clone())?)
    }

    fn blocks(&self) -> Option<&dyn BlockChain<BlockStack, Batch>> {
        Some(self)
    }
}

impl BlockChain<BlockStack, Batch> for BuiltIn {
    fn num_blocks(&self) -> usize {
        self.spec.num_blocks()
    }

    fn block_param_counts(&self) -> Vec<usize> {
        self.spec.block_param_counts()
    }

    fn model_range(&self, range: Range<usize>, device: &Device) -> Result<BlockStack, TaskError> {
        Ok(BlockStack::new_range(self.spec.clone(), range, self.seed, device)?)
    }

    fn input(&self, batch: &Batch) -> Result<Tensor<2>, TaskError> {
        Ok(batch.inputs.clone())
    }

    fn forward_range(&self, model: &BlockStack, x: Tensor<2>, range: Range<usize>) -> Result<Tensor<2>, TaskError> {
        Ok(model.forward_range(x, range)?)
    }

    fn loss_of_output(&self, output: Tensor<2>, batch: &Batch) -> Result<Tensor<1>, TaskError> {
        Ok(crate::models::cross_entropy(
            output,
            batch.targets.clone(),
            self.spec.classes(),
        )?)
    }

    fn activation_width(&self, block: usize) -> usize {
        // Invariant: the trainer asks only for blocks 0..=num_blocks, which the spec knows.
        self.spec
            .activation_width(block, self.dataset.input_width())
            .unwrap_or(0)
    }

    fn activation_values(&self, block: usize) -> usize {
        self.spec.activation_values(block, self.dataset.input_width())
    }
}
