//! [`Task`]: what the trainer needs to know about a user's model and data, and [`BlockChain`],
//! the optional view of the model as a chain of blocks (pipeline stages, gradient sync overlapped
//! with backward).
//!
//! A task is the model, the data and the loss, nothing about distribution: the trainer splits
//! batches over ranks, builds the model on the rank's device, synchronises gradients, steps the
//! optimizer, checkpoints and logs. torch users know the shape from Lightning's `LightningModule`
//! (`training_step` returns the loss) and torchtitan's train spec.

use std::ops::Range;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

/// A task's own error (a user's error type, boxed: the trainer reports it with the rank and what
/// it was doing).
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// A model, its training data and its loss.
///
/// ```ignore
/// struct MyTask { data: MyData }
/// impl burnrun::Task for MyTask {
///     type Model = MyModel;
///     type Batch = (Tensor<2>, Tensor<1, Int>);
///     fn describe(&self) -> String { "my model".into() }
///     fn len(&self) -> usize { self.data.len() }
///     fn model(&self, device: &Device) -> Result<MyModel, TaskError> { Ok(MyModel::new(device)) }
///     fn batch(&self, indices: &[usize], device: &Device) -> Result<Self::Batch, TaskError> { ... }
///     fn loss(&self, model: &MyModel, batch: &Self::Batch) -> Result<Tensor<1>, TaskError> { ... }
/// }
/// ```
///
/// Every rank calls these with its own indices; the trainer makes every rank start from rank 0's
/// parameters, so `model` need not be deterministic (it is, when it draws only from the device's
/// generator: the trainer seeds it with `train.seed` first).
pub trait Task: Send + Sync {
    /// The burn model. Its float parameters are trained; everything else (buffers such as
    /// BatchNorm's running statistics) is kept as the model computes it.
    type Model: Module;
    /// One micro-batch, on the device.
    type Batch;

    /// One line for the start-up report: what is trained, on what.
    fn describe(&self) -> String;

    /// Number of training samples; the sampler draws indices below it.
    fn len(&self) -> usize;

    /// Whether there is no sample (a run needs at least one global batch).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the model on `device`, an autodiff device (the trainer tracks gradients).
    fn model(&self, device: &Device) -> Result<Self::Model, TaskError>;

    /// The samples `indices`, in that order, as one batch on `device`.
    fn batch(&self, indices: &[usize], device: &Device) -> Result<Self::Batch, TaskError>;

    /// The mean loss of `batch` under `model`, shape `[1]`. The trainer averages the micro-batches
    /// of a step and the replicas, so the mean over the batch keeps every layout equivalent.
    fn loss(&self, model: &Self::Model, batch: &Self::Batch) -> Result<Tensor<1>, TaskError>;

    /// The model as a chain of blocks, if it is one: enables pipeline parallelism
    /// (`parallel.pipeline > 1`) and gradient all-reduce overlapped with backward. `None` (the
    /// default): the model is one piece, trained data parallel with the sync after backward.
    fn blocks(&self) -> Option<&dyn BlockChain<Self::Model, Self::Batch>> {
        None
    }
}

/// A model that is a chain of blocks `0..num_blocks`, each taking the previous one's activation
/// `[batch, width]`: the pipeline gives each stage a contiguous range, and the data-parallel step
/// runs backward block by block, all-reducing a block's gradients while the earlier blocks' backward
/// goes on.
///
/// Contract (the trainer checks what it can and names the block otherwise): the model's float
/// parameters, in burn's visit order, are those of block 0, then block 1, and so on, and
/// `block_param_counts` gives their numbers of values; a model built for a range holds only those
/// blocks, with the same parameter names as in the full model (checkpoints load across layouts by
/// name).
pub trait BlockChain<M, B>: Send + Sync {
    /// Number of blocks of the full model.
    fn num_blocks(&self) -> usize;

    /// Parameter values of each block of the full model (balances the pipeline's stages).
    fn block_param_counts(&self) -> Vec<usize>;

    /// Builds only the blocks `range` on `device`.
    fn model_range(&self, range: Range<usize>, device: &Device) -> Result<M, TaskError>;

    /// What enters block 0 for `batch`, `[batch, width]`.
    fn input(&self, batch: &B) -> Result<Tensor<2>, TaskError>;

    /// Runs the blocks `range` (all held by `model`) on `x`, the activation entering
    /// `range.start`; returns the activation leaving `range.end - 1`.
    fn forward_range(&self, model: &M, x: Tensor<2>, range: Range<usize>) -> Result<Tensor<2>, TaskError>;

    /// The mean loss of the last block's output for `batch`, shape `[1]`.
    fn loss_of_output(&self, output: Tensor<2>, batch: &B) -> Result<Tensor<1>, TaskError>;

    /// Values per sample of the activation entering `block` (`block == num_blocks`: the output);
    /// pipeline stages agree on shapes before the first step with it.
    fn activation_width(&self, block: usize) -> usize;

    /// Segments block `block` runs as: 1 (the default), or more for a block the trainer must
    /// cut inside, such as a tensor-parallel transformer layer (attention, then MLP: each
    /// segment's output is summed over the tensor-parallel group before the next one runs).
    fn segments(&self, _block: usize) -> usize {
        1
    }

    /// Runs segment `segment` of block `block` (held by `model`) on `x`. The default, for
    /// blocks of one segment, is [`Self::forward_range`] over the block.
    fn forward_segment(&self, model: &M, x: Tensor<2>, block: usize, segment: usize) -> Result<Tensor<2>, TaskError> {
        let _ = segment;
        self.forward_range(model, x, block..block + 1)
    }

    /// Whether block `block` is split over the tensor-parallel group (`parallel.tensor > 1`):
    /// each of its segments takes the replicated activation and returns this rank's PARTIAL
    /// output, whose sum over the group is the segment's output; the trainer sums the outputs in
    /// forward, and the gradients of the segment's input and of the block's replicated
    /// parameters (which must therefore be partial too) in backward. Default: no.
    fn tensor_parallel(&self, _block: usize) -> bool {
        false
    }

    /// Where tensor-parallel rank `rank`'s slice of parameter `name` (a full model's name)
    /// lies in the full parameter; `None`: replicated (the default). Checkpoints hold full
    /// parameters, assembled from and cut into these slices.
    fn tensor_split(&self, _name: &str, _rank: usize) -> Option<crate::parallel::tensor::TensorSplit> {
        None
    }

    /// Values per sample that `block` keeps for its backward (the memory check before anything is
    /// allocated). The default counts its output only; a block with wide insides (attention
    /// scores, an MLP's hidden layer) should say more.
    fn activation_values(&self, block: usize) -> usize {
        self.activation_width(block + 1)
    }
}
