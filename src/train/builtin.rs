//! The built-in models (MLP, CNN, GPT of `[model]`) on the built-in data (`[data]`), as one
//! [`Task`]: `burnrun train` is [`super::run`] with this task, the same path a user's own task
//! takes.

use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{Device, Tensor};

use crate::config::Resolved;
use crate::data::{Batch, Dataset};
use crate::models::{BlockStack, ModelSpec, TpTransformerBlock};
use crate::parallel::tensor::TensorSplit;

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
    /// This rank's tensor-parallel rank and the number of them (`(0, 1)`: none).
    tensor: (usize, usize),
}

impl BuiltIn {
    /// Opens the dataset of `resolved`'s `[data]` and plans the model of its `[model]`, sized by
    /// the data (input width, classes, vocabulary).
    pub fn new(resolved: &Resolved, rank: usize) -> Result<Self, TrainError> {
        let cfg = &resolved.config;
        let dataset = build::dataset(cfg, resolved.seq_len).map_err(|source| TrainError::Data { rank, source })?;
        let spec = build::model_spec(cfg, dataset.as_ref());
        spec.validate().map_err(|source| TrainError::Model { rank, source })?;
        let tensor = (resolved.mesh.coords(rank).tensor, resolved.mesh.tensor);
        Ok(Self {
            spec,
            dataset,
            seed: cfg.train.seed,
            tensor,
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
        let all = 0..self.spec.num_blocks();
        Ok(BlockStack::new_range_tp(
            self.spec.clone(),
            all,
            self.seed,
            device,
            self.tensor,
        )?)
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
        self.spec.block_param_counts_tp(self.tensor.1)
    }

    fn model_range(&self, range: Range<usize>, device: &Device) -> Result<BlockStack, TaskError> {
        Ok(BlockStack::new_range_tp(
            self.spec.clone(),
            range,
            self.seed,
            device,
            self.tensor,
        )?)
    }

    fn segments(&self, block: usize) -> usize {
        if self.tensor_parallel(block) {
            2
        } else {
            1
        }
    }

    fn forward_segment(
        &self,
        model: &BlockStack,
        x: Tensor<2>,
        block: usize,
        segment: usize,
    ) -> Result<Tensor<2>, TaskError> {
        Ok(model.forward_segment(x, block, segment)?)
    }

    fn tensor_parallel(&self, block: usize) -> bool {
        match &self.spec {
            ModelSpec::Gpt { n_layer, .. } => self.tensor.1 > 1 && (1..=*n_layer).contains(&block),
            _ => false,
        }
    }

    fn tensor_split(&self, name: &str, rank: usize) -> Option<TensorSplit> {
        // `blocks.<i>.<field>`: a transformer layer's sharded field.
        let ModelSpec::Gpt { n_embd, .. } = &self.spec else {
            return None;
        };
        let rest = name.strip_prefix("blocks.")?;
        let (index, field) = rest.split_once('.')?;
        let block: usize = index.parse().ok()?;
        if !self.tensor_parallel(block) {
            return None;
        }
        TpTransformerBlock::split(field, *n_embd, rank, self.tensor.1)
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
